"""The LoQT linear layer: y = x (W_q + s P B)^T + bias, with W_q quantized and frozen, P frozen, B trained.

Shapes for a weight W of m x n (out x in): ``side="left"`` has P m x r and B r x n; ``side="right"`` has B m x r and
P r x n (the product is then B P; we still write "P B" for either). Everything that defines the layer is a parameter
or a persistent buffer, so ``state_dict`` / safetensors checkpoints carry it exactly:

* ``weight_q`` (uint8) + ``weight_absmax`` (float32): the quantized frozen weight (``base_weight`` with quant=None);
* ``proj`` (or ``proj_q`` + ``proj_absmax`` when P is quantized): the frozen projection P;
* ``B``: the trainable factor (a parameter; zero after a merge without error compensation);
* ``merges``: completed merges (0 means P has not been initialised from a gradient yet);
* ``pending_weight`` (non-persistent, so never in a checkpoint): the full-precision W kept until the initialising
  merge when ``init_weight="full_precision"``; a buffer so that memory reports count it and ``.to()`` moves it.

The layer's product runs through :class:`_LoQTProduct`, which dequantizes the weight again in backward instead of
saving it (no m x n tensor is kept per layer between forward and backward), adds the low-rank term into the frozen
product in place and, while the layer is collecting a gradient for a merge, forms that layer's weight gradient
G = grad_y^T x inside backward. G is reduced to its top-r
singular vectors there and then, so at most one layer's full gradient exists at a time (per micro-batch; with gradient
accumulation each layer keeps one running sum during the merge step's window).
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from hf_memopt.loqt.quant import dequantize, dequantize_rows, quantize, row_alignment
from hf_memopt.shared.faults import all_finite, out_of_memory_advice
from hf_memopt.shared.layerwise import accelerate_sync_gradients
from hf_memopt.shared.parallel import all_reduce_mean_, is_distributed
from hf_memopt.shared.projector import refresh_projector

__all__ = ["LoQTLinear", "quantize_with_error_compensation"]

logger = logging.getLogger(__name__)


def _times_frozen_transposed(x: torch.Tensor, layer: LoQTLinear) -> torch.Tensor:
    """x W^T for the layer's frozen weight W, a block of W's rows (y's columns) at a time where W comes in blocks."""
    blocks = layer.frozen_row_blocks(x.dtype)
    start, stop, rows = next(blocks)
    if stop == layer.out_features:  # the whole weight at once
        return F.linear(x, rows)
    y = x.new_empty(*x.shape[:-1], layer.out_features)
    flat_x, flat_y = x.reshape(-1, layer.in_features), y.view(-1, layer.out_features)
    torch.mm(flat_x, rows.t(), out=flat_y[:, start:stop])
    for start, stop, rows in blocks:
        torch.mm(flat_x, rows.t(), out=flat_y[:, start:stop])
    return y


def _times_frozen(grad_y: torch.Tensor, layer: LoQTLinear) -> torch.Tensor:
    """grad_y W for the layer's frozen weight W: the sum over W's row blocks of grad_y's matching columns times them,
    summed in at least float32 (a 16-bit running sum would round once per block) and cast once."""
    blocks = layer.frozen_row_blocks(grad_y.dtype)
    start, stop, rows = next(blocks)
    if stop == layer.out_features:
        return grad_y @ rows
    flat = grad_y.reshape(-1, layer.out_features)
    wide = torch.promote_types(grad_y.dtype, torch.float32)  # the 16-bit operands' values, multiplied and summed wide
    grad_x = flat[:, start:stop].to(wide) @ rows.to(wide)
    for start, stop, rows in blocks:
        grad_x.addmm_(flat[:, start:stop].to(wide), rows.to(wide))
    return grad_x.to(grad_y.dtype).view(*grad_y.shape[:-1], layer.in_features)


class _LoQTProduct(torch.autograd.Function):
    """y = x W^T + bias + s * a O^T for a :class:`LoQTLinear`: W its frozen (quantized) weight, ``a`` the rank-wide
    ``x I^T`` (I, O = B, P for ``side="left"``, P, B for ``"right"``; O is m x r), computed outside by autograd.

    One function rather than autograd's F.linear + matmul + scale + add: the low-rank term is added into the frozen
    product in place (one fused matmul-add), so forward makes one output-sized tensor instead of four, and backward
    none beyond the gradients it returns (an in-place add on a view of the output would cost two in backward). W is
    dequantized again in backward instead of being saved (no m x n tensor is kept per layer between the passes), a
    block of rows at a time where the layer has a ``dequantize_chunk_elements`` (no whole dequantized W exists).

    ``anchor`` is given while the layer collects its weight gradient: a fresh scalar leaf that requires grad, so
    backward runs even when nothing else needs a gradient (its own gradient is returned as None; it is not a
    parameter, so no parameter hook sees a None gradient). Backward then also forms G = grad_y^T x, the gradient of
    the layer's whole weight, and hands it to the layer.
    """

    @staticmethod
    def forward(ctx, x, a, outer, bias, layer: LoQTLinear, anchor: torch.Tensor | None) -> torch.Tensor:
        ctx.layer = layer
        ctx.collect = anchor is not None
        ctx.save_for_backward(x if ctx.collect else None, a, outer)
        # No bias in F.linear: with one it returns a view for 1-D / 3-D / 4-D inputs, and autograd refuses in-place
        # ops on a view a custom function returned (an in-place ReLU or residual add after this layer would fail).
        y = _times_frozen_transposed(x, layer)
        y.view(-1, layer.out_features).addmm_(a.reshape(-1, layer.rank), outer.t(), alpha=layer.scale)
        if bias is not None:
            y.add_(bias.to(y.dtype))
        return y

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        layer: LoQTLinear = ctx.layer
        x, a, outer = ctx.saved_tensors
        need_x, need_a, need_outer, need_bias = ctx.needs_input_grad[:4]
        flat = grad_out.reshape(-1, layer.out_features)
        grad_x = _times_frozen(grad_out, layer) if need_x else None
        grad_a = (flat @ outer).mul_(layer.scale).view(a.shape) if need_a else None
        grad_outer = (flat.t() @ a.reshape(-1, layer.rank)).mul_(layer.scale) if need_outer else None
        grad_bias = flat.sum(dim=0) if need_bias else None
        if ctx.collect:
            grad_w = flat.t().float() @ x.reshape(-1, layer.in_features).float()
            layer._add_weight_gradient(grad_w)
        return grad_x, grad_a, grad_outer, grad_bias, None, None


class LoQTLinear(nn.Module):
    """A LoQT layer replacing an ``nn.Linear`` (see the module docstring).

    Args:
        base: the ``nn.Linear`` to replace; its bias parameter is kept as is (same object, same ``requires_grad``).
        rank, scale, quant, quantize_projection, quant_block_size, init_weight: as in
            :class:`~hf_memopt.loqt.LoQTConfig`.
        side: ``"left"`` (P m x r) or ``"right"`` (P r x n).
        dequantize_chunk_elements: the most weight elements the product dequantizes at a time (whole rows, aligned
            to the quantization blocks); None: the whole weight at once. See :meth:`frozen_row_blocks`.
        name: the qualified module name, for messages and the per-layer SVD seed.
    """

    def __init__(
        self,
        base: nn.Linear,
        *,
        rank: int,
        scale: float,
        side: str,
        quant: str | None,
        quantize_projection: bool = False,
        quant_block_size: int = 64,
        init_weight: str = "full_precision",
        dequantize_chunk_elements: int | None = None,
        name: str = "",
    ):
        super().__init__()
        if side not in ("left", "right"):
            raise ValueError(f"side must be 'left' or 'right'; got {side!r}")
        if init_weight not in ("full_precision", "quantized"):
            raise ValueError(f"init_weight must be 'full_precision' or 'quantized'; got {init_weight!r}")
        weight = base.weight.detach()
        self.out_features, self.in_features = weight.shape
        if not 1 <= rank <= min(weight.shape):
            raise ValueError(f"rank must be in [1, {min(weight.shape)}] for {name or 'this layer'}; got {rank}")
        self.rank, self.scale, self.side, self.quant = rank, float(scale), side, quant
        self.quantize_projection, self.quant_block_size, self.name = quantize_projection, quant_block_size, name
        if dequantize_chunk_elements is not None and dequantize_chunk_elements < 1:
            raise ValueError(f"dequantize_chunk_elements must be >= 1 or None; got {dequantize_chunk_elements}")
        self.dequantize_chunk_elements = dequantize_chunk_elements
        self.weight_dtype = weight.dtype
        device = weight.device

        if quant is None:
            self.register_buffer("base_weight", weight.clone())
            pending = None
        else:
            data, absmax = quantize(weight, quant, quant_block_size)
            self.register_buffer("weight_q", data)
            self.register_buffer("weight_absmax", absmax)
            # The paper's initialisation (Sec. 3.1) quantizes against the original full-precision W, and the first
            # gradient is taken at W itself: keep it until the first merge. "quantized" drops it here, as the
            # official code (which quantizes the model when wrapping it): update 0 then computes with Q(W).
            pending = weight if init_weight == "full_precision" else None
        self.register_buffer("pending_weight", pending, persistent=False)
        proj_shape = (self.out_features, rank) if side == "left" else (rank, self.in_features)
        if quantize_projection:
            data, absmax = quantize(torch.zeros(proj_shape, device=device), quant, quant_block_size)
            self.register_buffer("proj_q", data)
            self.register_buffer("proj_absmax", absmax)
        else:
            self.register_buffer("proj", torch.zeros(proj_shape, dtype=weight.dtype, device=device))
        b_shape = (rank, self.in_features) if side == "left" else (self.out_features, rank)
        self.B = nn.Parameter(torch.zeros(b_shape, dtype=weight.dtype, device=device))
        self.bias = base.bias
        self.register_buffer("merges", torch.zeros((), dtype=torch.int64, device=device))

        self.collecting = False
        self._grad_sum: torch.Tensor | None = None
        self._next_proj: torch.Tensor | None = None
        self.gradient_nonfinite = False  # the collected weight gradient held NaN/Inf: no P from it, no merge
        self._svd_options: dict = {"method": "exact", "iterations": 2, "seed": 0}

    def _apply(self, fn, recurse=True):
        """Moves and casts as ``nn.Module`` does, except the quantization scales (``weight_absmax``,
        ``proj_absmax``), which stay float32 whatever dtype the model is cast to: bitsandbytes reads them as float32
        (an int8 weight with float64 or bfloat16 scales dequantized to garbage), and a scale cast down would lose
        precision for good (the Trainer casts the whole model for ``bf16_full_eval``)."""
        scales = {name: getattr(self, name, None) for name in ("weight_absmax", "proj_absmax")}
        scales = {name: scale for name, scale in scales.items() if scale is not None}
        super()._apply(fn, recurse)
        for name, before in scales.items():
            after = getattr(self, name)
            if after.dtype != torch.float32:  # assigning a tensor to a buffer's name replaces the buffer
                setattr(self, name, before.to(device=after.device, dtype=torch.float32))
        return self

    # ---- the three parts of the weight --------------------------------------------------------------------------

    @property
    def initialized(self) -> bool:
        """Whether P has been set from a gradient (at least one merge, the initialisation included)."""
        return int(self.merges) > 0

    def _pending(self) -> torch.Tensor | None:
        if self.pending_weight is not None and self.initialized:  # a checkpoint was loaded over the fresh layer
            self.pending_weight = None
        return self.pending_weight

    def frozen_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The frozen weight (dequantized), m x n."""
        pending = self._pending()
        if pending is not None:
            return pending.to(device=self.B.device, dtype=dtype)
        if self.quant is None:
            return self.base_weight.to(dtype)
        return dequantize(
            self.weight_q, self.weight_absmax, self.quant, (self.out_features, self.in_features), self.quant_block_size
        ).to(dtype)

    def frozen_row_blocks(self, dtype: torch.dtype):
        """``(start, stop, rows)`` over the frozen weight: ``rows`` is ``frozen_weight(dtype)[start:stop]``, made one
        block at a time so that no whole dequantized (or cast) m x n tensor exists at once.

        A block is as many whole rows as fit ``dequantize_chunk_elements``, rounded down to a multiple that starts
        every block on a quantization block (so each is dequantized from its own slice of the codes and absmax, the
        same values as the whole weight's); at least that multiple. The whole weight is one block where nothing is
        made (stored unquantized in ``dtype``), where ``dequantize_chunk_elements`` is None, or where it fits.
        """
        m, n = self.out_features, self.in_features
        pending = self._pending()
        stored = pending if pending is not None else self.base_weight if self.quant is None else None
        budget = self.dequantize_chunk_elements
        if budget is None or budget >= m * n or (stored is not None and stored.dtype == dtype):
            yield 0, m, self.frozen_weight(dtype)
            return
        align = row_alignment(n, self.quant_block_size) if stored is None else 1
        step = max(align, budget // n // align * align)
        for start in range(0, m, step):
            stop = min(m, start + step)
            if stored is not None:
                rows = stored[start:stop].to(device=self.B.device)
            else:
                rows = dequantize_rows(self.weight_q, self.weight_absmax, self.quant, (m, n), self.quant_block_size,
                                       start, stop)  # fmt: skip
            yield start, stop, rows.to(dtype)

    def projector(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """P (dequantized when stored quantized)."""
        if self.quantize_projection:
            return dequantize(self.proj_q, self.proj_absmax, self.quant, self.proj_shape, self.quant_block_size).to(
                dtype
            )
        return self.proj.to(dtype)

    @property
    def proj_shape(self) -> tuple[int, int]:
        """Shape of P: m x r (``side="left"``) or r x n."""
        return (self.out_features, self.rank) if self.side == "left" else (self.rank, self.in_features)

    def adapter_product(self, P: torch.Tensor | None = None, B: torch.Tensor | None = None) -> torch.Tensor:
        """scale * P B (m x n, float32)."""
        P = self.projector() if P is None else P.float()
        B = self.B.detach().float() if B is None else B.float()
        return self.scale * (P @ B if self.side == "left" else B @ P)

    @torch.no_grad()
    def effective_weight(self) -> torch.Tensor:
        """W_q + scale * P B, dequantized, float32: the weight this layer computes with."""
        return self.frozen_weight(torch.float32) + self.adapter_product()

    # ---- forward --------------------------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        device = x.device.type
        if torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device):
            # Autocast does not cast the operands of _LoQTProduct's in-place matmul-add: compute as it would (every
            # product in its dtype, as nn.Linear under autocast) by casting x here and running without it.
            with torch.autocast(device, enabled=False):
                return self._product(x.to(torch.get_autocast_dtype(device)))
        return self._product(x)

    def _product(self, x: torch.Tensor) -> torch.Tensor:
        collecting = self.collecting and torch.is_grad_enabled()
        # While collecting the merge gradient, B gets no gradient: its update would be in the basis being replaced.
        B = self.B.detach() if collecting else self.B
        anchor = torch.zeros((), device=x.device, requires_grad=True) if collecting else None
        P, B = self.projector(x.dtype), B.to(x.dtype)
        inner, outer = (B, P) if self.side == "left" else (P, B)  # s P B x = s * outer (inner x)
        return _LoQTProduct.apply(x, F.linear(x, inner), outer, self.bias, self, anchor)

    # ---- merge ----------------------------------------------------------------------------------------------------

    def _add_weight_gradient(self, grad_w: torch.Tensor) -> None:
        """Called from backward while collecting: accumulate G; on the last micro-batch reduce it to P at once."""
        if self._next_proj is not None:
            raise RuntimeError(
                f"LoQT: {self.name or 'a layer'} received a weight gradient after its new projection was computed; "
                "a Linear called more than once per forward pass cannot be targeted"
            )
        self._grad_sum = grad_w if self._grad_sum is None else self._grad_sum.add_(grad_w)
        if accelerate_sync_gradients():
            self._reduce_gradient()

    def _reduce_gradient(self) -> None:
        grad, self._grad_sum = self._grad_sum, None
        if grad is None:
            return
        if is_distributed():  # DDP never sees this gradient: average it, so every rank finds the same P
            all_reduce_mean_(grad)
        if not all_finite([grad]):  # P is never taken from a non-finite gradient; the callback skips the merge
            self.gradient_nonfinite = True
            return
        try:
            self._next_proj = self._projection_from(grad)
        except torch.OutOfMemoryError as err:
            if grad.device.type == "cpu":
                raise torch.OutOfMemoryError(
                    f"LoQT: out of memory finding the new projection of {self.name or 'a layer'} (merge "
                    f"{int(self.merges) + 1}); the layer is unchanged. {out_of_memory_advice()}"
                ) from err
            # the SVD of one m x n gradient fits in host memory when the accelerator is full
            logger.warning(
                "LoQT: out of memory finding P for %s on %s; computing it on the CPU", self.name, grad.device
            )
            self._next_proj = self._projection_from(grad.cpu()).to(grad.device)

    def _projection_from(self, grad: torch.Tensor) -> torch.Tensor:
        """The new P: top-``rank`` singular vectors of the collected gradient, on the gradient's device."""
        opts = self._svd_options
        generator = torch.Generator().manual_seed(opts["seed"] + 7919 * int(self.merges))
        previous = (None, None)
        if self.initialized:
            current = self.projector().to(grad.device)
            previous = (current, None) if self.side == "left" else (None, current)
        left, right = refresh_projector(
            grad,
            self.rank,
            (self.side == "left", self.side == "right"),
            method=opts["method"],
            previous=previous,
            iterations=opts["iterations"],
            generator=generator,
            name=self.name,
        )
        return left if self.side == "left" else right

    def discard_collected(self) -> None:
        """Forget the gradient collected for a merge that is not done (its update was skipped)."""
        self._grad_sum = self._next_proj = None
        self.gradient_nonfinite = False

    @torch.no_grad()
    def merge(self, error_compensation_steps: int = 0) -> None:
        """W <- Q(W_q + s P B) with the new P from the collected gradient; B <- 0 or the error compensation.

        Without a collected gradient (the layer was not used in the merge step) P is kept. All or nothing: the new
        W_q, P and B are computed first and written only when all exist, so an error (out of memory in the SVD or
        the quantization, or a non-finite W_q + s P B, which is refused) leaves the layer as it was.
        """
        if self._grad_sum is not None:
            self._reduce_gradient()
        if self.gradient_nonfinite:
            raise FloatingPointError(f"LoQT: {self.name or 'a layer'} collected a non-finite gradient; not merged")
        target = self.effective_weight()
        new_proj = self._next_proj if self._next_proj is not None else self.projector()
        if not all_finite([target, new_proj]):
            raise FloatingPointError(
                f"LoQT: W_q + s P B of {self.name or 'a layer'} is non-finite at merge {int(self.merges) + 1} (B "
                "diverged); not merged, the quantized weight keeps its last finite value. Lower the learning rate "
                "and resume from the last checkpoint"
            )
        if self.quantize_projection:
            proj_data, proj_absmax = quantize(new_proj, self.quant, self.quant_block_size)
            P = dequantize(proj_data, proj_absmax, self.quant, self.proj_shape, self.quant_block_size)
        else:
            P = new_proj.to(self.proj.dtype).float()
        if self.quant is not None:
            data, absmax, B = quantize_with_error_compensation(
                target, P, self.scale, self.side, error_compensation_steps, self.quant, self.quant_block_size
            )
        # commit: in-place copies into existing buffers, which allocate nothing
        self._next_proj = None
        if self.quantize_projection:
            self.proj_q.copy_(proj_data)
            self.proj_absmax.copy_(proj_absmax)
        else:
            self.proj.copy_(new_proj)
        if self.quant is None:
            self.base_weight.copy_(target)
            self.B.zero_()
        else:
            self.weight_q.copy_(data)
            self.weight_absmax.copy_(absmax)
            self.B.copy_(B)
        self.pending_weight = None
        self.merges += 1

    def extra_repr(self) -> str:
        quant = self.quant or "none"
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, side={self.side}, "
            f"quant={quant}, quantize_projection={self.quantize_projection}, scale={self.scale}, "
            f"bias={self.bias is not None}"
        )


def quantize_with_error_compensation(
    target: torch.Tensor,
    P: torch.Tensor,
    scale: float,
    side: str,
    steps: int,
    quant: str,
    block_size: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(data, absmax, B)`` with Q(data, absmax) + scale * P B close to ``target`` (paper Sec. 3.3).

    ``steps == 0``: quantize the target, B = 0. Otherwise alternate ``steps`` times: quantize the current weight,
    solve B by least squares on the quantization residual (B = P^+ R / s), and move the weight to target - s P B; the
    iterate with the smallest ||target - (Q + s P B)||_F is returned (as the official code does).
    """
    target = target.float()
    shape = tuple(target.shape)
    if steps == 0:
        data, absmax = quantize(target, quant, block_size)
        B_shape = (P.shape[1], shape[1]) if side == "left" else (shape[0], P.shape[0])
        return data, absmax, torch.zeros(B_shape, dtype=torch.float32, device=target.device)
    P = P.float()
    pinv = torch.linalg.pinv(P)  # P has orthonormal columns / rows unless it is quantized
    best, best_error = None, float("inf")
    current = target
    for _ in range(steps):
        data, absmax = quantize(current, quant, block_size)
        residual = target - dequantize(data, absmax, quant, shape, block_size)
        if side == "left":
            B = pinv @ residual / scale
            correction = scale * (P @ B)
        else:
            B = residual @ pinv / scale
            correction = scale * (B @ P)
        error = torch.linalg.matrix_norm(residual - correction).item()
        if best is None or error < best_error:
            best, best_error = (data, absmax, B), error
        current = target - correction
    return best
