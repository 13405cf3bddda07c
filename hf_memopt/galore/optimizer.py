"""GaLore optimizers: AdamW, 8-bit AdamW and Adafactor whose states live in a projected subspace.

One private base class holds the GaLore mechanics (projection, refresh, weight decay, layer-wise mode); each public
class only supplies the base optimizer's rule on a (possibly projected) gradient: its state and its update direction.
Parameter groups carrying ``rank`` are projected; other groups get the same rule on the full gradient.

The optimizer state holds only tensors and ints (moments, 8-bit codes and absmax tables, projectors, step counts), so
``optimizer.pt`` reloads with ``torch.load(weights_only=True)``.

Memory and time: parameters are updated one at a time, and the element-wise Adam rules (32-bit and 8-bit) run over
slices of ``_SLICE_ELEMENTS`` values of each (projected or full) gradient, so the temporaries of an update (the
direction, and on CPU the float32 copies bitsandbytes' 8-bit kernel makes of both moments and the gradient) are a few
MiB whatever the tensor's size, instead of several copies of the largest tensor (the embedding and the output head,
which stay unprojected). On CPU the slices also stay in cache. Slicing changes no value: every operation is
element-wise, and slices start on 8-bit block boundaries (tested bit for bit against whole-tensor updates).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch

from hf_memopt.galore.layerwise import LayerwiseUpdates
from hf_memopt.shared.adam8bit import BLOCK_SIZE, adam_8bit_direction, adam_32bit_direction, init_8bit_moments
from hf_memopt.shared.faults import DEFAULT_MAX_CONSECUTIVE_SKIPS
from hf_memopt.shared.optimizer_base import _MemoptOptimizer
from hf_memopt.shared.projector import project, project_back, projection_sides, refresh_projector

__all__ = ["GaLoreAdafactor", "GaLoreAdamW", "GaLoreAdamW8bit"]

_PROJECTION_DEFAULTS = {
    "rank": None,
    "update_proj_gap": 200,
    "scale": 0.25,
    "proj_type": "std",
    "svd_method": "subspace",
    "svd_iterations": 2,
    "seed": 0,
}

# Values per slice of an element-wise update: a multiple of the 8-bit block size. On CPU 2^18 float32 values (1 MiB)
# keep a slice's temporaries in a core's L2 cache; on accelerators a slice costs kernel launches, and the fused 8-bit
# kernel makes no temporaries, so slices are larger there.
_SLICE_ELEMENTS = {"cpu": 1 << 18}
_DEFAULT_SLICE_ELEMENTS = 1 << 24


def _slices(numel: int, device: torch.device) -> list[tuple[int, int]]:
    size = _SLICE_ELEMENTS.get(device.type, _DEFAULT_SLICE_ELEMENTS)
    return [(start, min(start + size, numel)) for start in range(0, numel, size)]


class _GaLoreOptimizer(_MemoptOptimizer):
    """GaLore mechanics around a base rule (see module docstring); hyperparameter checks, the closure, the skip counter
    and state dtypes on load come from :class:`hf_memopt.shared.optimizer_base._MemoptOptimizer`.

    Args:
        params: parameters or groups; groups with ``rank`` set are projected (keys: ``rank``, ``update_proj_gap``,
            ``scale``, ``proj_type``, ``svd_method``, ``svd_iterations``, ``seed``).
        lr, weight_decay: as in AdamW; weight decay is decoupled, p <- p (1 - lr wd), applied before the update.
        layerwise: update each parameter inside backward (post-accumulate-grad hook) and free its gradient.
        max_grad_norm: layer-wise mode only: clip the global gradient norm (the Trainer cannot, the gradients are gone
            by then). 0 disables.
        is_accumulation_boundary: layer-wise mode only: returns True on the micro-batch that ends an accumulation
            window. Defaults to accelerate's ``GradientState().sync_gradients``, which ``Trainer`` sets per micro-batch.
        parameter_names: ``{parameter: name}``, used in messages.
        max_consecutive_skips: updates with a non-finite gradient are skipped whole (no moment, projector, step
            counter or parameter changes); after this many in a row the next one raises (``hf_memopt.shared.faults``).
    """

    fault_label = "GaLore"

    def __init__(
        self,
        params: Iterable[Any],
        lr: float,
        defaults: dict[str, Any],
        *,
        weight_decay: float = 0.0,
        layerwise: bool = False,
        max_grad_norm: float = 0.0,
        is_accumulation_boundary: Callable[[], bool] | None = None,
        parameter_names: dict[torch.nn.Parameter, str] | None = None,
        max_consecutive_skips: int = DEFAULT_MAX_CONSECUTIVE_SKIPS,
    ):
        super().__init__(
            params,
            {"lr": lr, "weight_decay": weight_decay, **_PROJECTION_DEFAULTS, **defaults},
            max_consecutive_skips=max_consecutive_skips,
        )
        self._names = parameter_names or {}
        self._index = {p: i for i, p in enumerate(p for g in self.param_groups for p in g["params"])}
        for group in self.param_groups:
            if group["rank"] is not None:
                for p in group["params"]:
                    if p.dim() != 2:
                        raise ValueError(
                            f"GaLore projects 2-D weights only; {self._name(p)} has shape {tuple(p.shape)}"
                        )
                    if not 1 <= group["rank"] <= min(p.shape):
                        raise ValueError(
                            f"rank must be in [1, {min(p.shape)}] for {self._name(p)} of shape {tuple(p.shape)}; "
                            f"got {group['rank']}"
                        )
        self.layerwise: LayerwiseUpdates | None = None
        if layerwise:
            self.layerwise = LayerwiseUpdates(self, max_grad_norm, is_accumulation_boundary)

    # ---- the base rule: implemented by the public classes -------------------------------------------------------
    def _init_rule_state(self, state: dict[str, Any], grad: torch.Tensor, group: dict[str, Any]) -> None:
        raise NotImplementedError

    def _direction(
        self, state: dict[str, Any], grad: torch.Tensor, group: dict[str, Any]
    ) -> tuple[torch.Tensor, float]:
        """``(direction, step_size)`` with update = -step_size * direction; ``state["step"]`` is already t.

        ``grad`` is the projected gradient R (float32, or float64 for float64 weights) or, in groups without ``rank``,
        the raw gradient. The step size carries the learning rate, so a rule may keep lr-scaled state (Adafactor's
        first moment averages lr-scaled updates, as in transformers and galore-torch).
        """
        raise NotImplementedError

    def _state_slice(self, state: dict[str, Any], start: int, stop: int) -> dict[str, Any] | None:
        """The rule's state for flat elements ``[start, stop)`` of its tensor, as views (``start`` is a multiple of
        the 8-bit block size), or None when the rule is not element-wise and steps whole tensors."""
        return None

    def _slice_views(self, state: dict[str, Any], grad: torch.Tensor) -> list[tuple[int, int, dict[str, Any]]] | None:
        """``(start, stop, state view)`` for the slices of the flattened ``grad``, or None when one update of the
        whole tensor is needed (a single slice, a rule that is not element-wise, a non-contiguous layout)."""
        slices = _slices(grad.numel(), grad.device)
        if len(slices) == 1 or not grad.is_contiguous():
            return None
        views = [(start, stop, self._state_slice(state, start, stop)) for start, stop in slices]
        return None if views[0][2] is None else views

    def _low_rank_direction(
        self, state: dict[str, Any], grad: torch.Tensor, group: dict[str, Any]
    ) -> tuple[torch.Tensor, float]:
        """The rule's ``(direction, step_size)`` for the whole (projected) gradient, computed slice by slice."""
        views = self._slice_views(state, grad)
        if views is None:
            return self._direction(state, grad, group)
        flat, direction = grad.view(-1), None
        for start, stop, view in views:
            part, step_size = self._direction(view, flat[start:stop], group)
            if direction is None:
                direction = torch.empty(grad.shape, dtype=part.dtype, device=part.device)
            direction.view(-1)[start:stop].copy_(part)
        return direction, step_size

    # ---- GaLore mechanics ----------------------------------------------------------------------------------------
    def _name(self, p: torch.nn.Parameter) -> str:
        return self._names.get(p, f"parameter #{self._index.get(p, '?')} {tuple(p.shape)}")

    def is_projected(self, group: dict[str, Any]) -> bool:
        return group["rank"] is not None

    def is_refresh_step(self, p: torch.nn.Parameter, group: dict[str, Any]) -> bool:
        """Whether the next update of ``p`` re-finds its projector (needs the full gradient)."""
        state = self.state[p]
        return "proj_left" not in state and "proj_right" not in state or state["step"] % group["update_proj_gap"] == 0

    def project_gradient(self, p: torch.nn.Parameter, grad: torch.Tensor, group: dict[str, Any]) -> torch.Tensor:
        """R = P^T G, refreshing P from ``grad`` first when this update is a refresh step."""
        state = self.state[p]
        state.setdefault("step", 0)
        if self.is_refresh_step(p, group):
            generator = torch.Generator().manual_seed(group["seed"] + 1_000_003 * state["step"] + self._index[p])
            left, right = refresh_projector(
                grad,
                group["rank"],
                projection_sides(group["proj_type"], p.shape),
                method=group["svd_method"],
                previous=(state.get("proj_left"), state.get("proj_right")),
                iterations=group["svd_iterations"],
                generator=generator,
                name=self._name(p),
            )
            for key, value in (("proj_left", left), ("proj_right", right)):
                if value is not None:
                    state[key] = value
        return project(grad, state.get("proj_left"), state.get("proj_right"))

    @torch.no_grad()
    def apply_update(
        self, p: torch.nn.Parameter, group: dict[str, Any], grad: torch.Tensor, *, projected: bool = False
    ) -> None:
        """One optimizer update of ``p`` from its gradient (``projected=True``: ``grad`` is already R = P^T G)."""
        state = self.state[p]
        state.setdefault("step", 0)
        low = grad
        if self.is_projected(group) and not projected:
            low = self.project_gradient(p, grad, group)
        if state["step"] == 0:
            self._init_rule_state(state, low, group)
        state["step"] += 1
        if group["weight_decay"] > 0.0:
            p.mul_(1.0 - group["lr"] * group["weight_decay"])
        if self.is_projected(group):
            direction, step_size = self._low_rank_direction(state, low, group)
            # 8-bit kernels return float32 directions; the projector is float64 for float64 weights
            direction = direction.to(low.dtype)
            direction = project_back(direction, state.get("proj_left"), state.get("proj_right"), group["scale"])
            p.add_(direction.to(p.dtype), alpha=-step_size)
            return
        # unprojected (the embedding and head, usually the largest tensors): each slice's direction goes straight
        # into the parameter, so no full-size direction exists
        views = self._slice_views(state, grad) if p.is_contiguous() else None
        if views is None:
            direction, step_size = self._direction(state, grad, group)
            p.add_(direction.to(p.dtype), alpha=-step_size)
            return
        flat_p, flat_grad = p.view(-1), grad.view(-1)
        for start, stop, view in views:
            direction, step_size = self._direction(view, flat_grad[start:stop], group)
            flat_p[start:stop].add_(direction.to(p.dtype), alpha=-step_size)

    def _step(self) -> None:
        if self.layerwise is not None:
            self.layerwise.finish_step()
            return
        grads = [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]
        self._refuse_sparse(grads)
        # checked before any update, so a skipped step leaves moments, projectors and step counters untouched
        if self._skip_if_nonfinite(grads):
            return
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self.apply_update(p, group, p.grad)

    @property
    def last_grad_norm(self) -> float | None:
        """Layer-wise mode: the global gradient norm of the last update (None when it could not be known)."""
        return self.layerwise.last_grad_norm if self.layerwise is not None else None


def _state_dtype(grad: torch.Tensor) -> torch.dtype:
    """float32 moments for half-precision and float32 gradients; float64 gradients keep float64 moments."""
    return torch.promote_types(grad.dtype, torch.float32)


def _moment_slice(state: dict[str, Any], start: int, stop: int) -> dict[str, Any] | None:
    """Views of Adam's element-wise state (float moments, or 8-bit codes with their per-block absmax) for flat
    elements ``[start, stop)``; None when a moment is not contiguous."""
    view: dict[str, Any] = {"step": state["step"]}
    for key in ("exp_avg", "exp_avg_sq", "state1", "state2"):
        if key in state:
            if not state[key].is_contiguous():
                return None
            view[key] = state[key].view(-1)[start:stop]
    for key in ("absmax1", "absmax2"):
        if key in state:
            view[key] = state[key][start // BLOCK_SIZE : -(-stop // BLOCK_SIZE)]
    return view


class GaLoreAdamW(_GaLoreOptimizer):
    """AdamW with GaLore projection (paper Alg. 2). Bias correction as in the reference: step size lr sqrt(1-b2^t) /
    (1-b1^t), eps added to sqrt(v) before it. Moments have the (projected) gradient's dtype."""

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-6, weight_decay=0.0, **kwargs):
        super().__init__(params, lr, {"betas": betas, "eps": eps}, weight_decay=weight_decay, **kwargs)

    def _init_rule_state(self, state, grad, group):
        state["exp_avg"] = torch.zeros_like(grad)
        state["exp_avg_sq"] = torch.zeros_like(grad)

    def _direction(self, state, grad, group):
        beta1, beta2 = group["betas"]
        exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
        exp_avg.mul_(beta1).add_(grad, alpha=1.0 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
        step = state["step"]
        direction = exp_avg_sq.sqrt().add_(group["eps"])
        torch.div(exp_avg, direction, out=direction)  # m / (sqrt(v) + eps) in one temporary
        return direction, group["lr"] * math.sqrt(1.0 - beta2**step) / (1.0 - beta1**step)

    def _state_slice(self, state, start, stop):
        return _moment_slice(state, start, stop)


class GaLoreAdamW8bit(_GaLoreOptimizer):
    """AdamW with GaLore projection and bitsandbytes block-wise 8-bit moments (Dettmers et al. 2022).

    Tensors (projected or not) with at least ``min_8bit_size`` elements keep uint8 moments with one absmax per
    256-element block, updated by bitsandbytes' fused kernel (CPU and CUDA). Smaller ones keep full-precision moments
    (float32; float64 for float64 weights) and take bitsandbytes' own 32-bit Adam update (``optimizer_update_32bit``),
    whose eps convention differs from GaLoreAdamW's (``hf_memopt.shared.adam8bit.adam_32bit_direction``: eps is added to
    sqrt(v_hat), not sqrt(v)). Groups without ``rank`` therefore step as ``bitsandbytes.optim.AdamW8bit`` does, large
    and small tensors alike (tested).
    """

    def __init__(
        self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay=0.0,
        *, min_8bit_size: int = 4096, **kwargs,
    ):  # fmt: skip
        super().__init__(params, lr, {"betas": betas, "eps": eps}, weight_decay=weight_decay, **kwargs)
        self.min_8bit_size = min_8bit_size

    def _init_rule_state(self, state, grad, group):
        if grad.numel() < self.min_8bit_size:
            state["exp_avg"] = torch.zeros_like(grad, dtype=_state_dtype(grad))
            state["exp_avg_sq"] = torch.zeros_like(grad, dtype=_state_dtype(grad))
        else:
            init_8bit_moments(state, grad)

    def _direction(self, state, grad, group):
        if "state1" in state:
            return adam_8bit_direction(state, grad, group["betas"], group["eps"], state["step"]), group["lr"]
        direction, multiplier = adam_32bit_direction(state, grad, group["betas"], group["eps"], state["step"])
        return direction, group["lr"] * multiplier

    def _state_slice(self, state, start, stop):
        return _moment_slice(state, start, stop)


class GaLoreAdafactor(_GaLoreOptimizer):
    """Adafactor (Shazeer & Stern 2018) with GaLore projection: factored second moment of the (projected) gradient,
    update clipping and a fixed learning rate (``relative_step=False``, ``scale_parameter=False``, as the Trainer
    configures Adafactor). Statistics are float32 (float64 for float64 weights).

    ``beta1=None`` keeps no first moment (the Trainer's Adafactor). With ``beta1`` set, the first moment is an
    exponential average of the lr-scaled, clipped updates, in the projected space, and that average is the update, as
    in transformers' and galore-torch's ``Adafactor(beta1=...)``; the GaLore paper runs Adafactor this way, with
    first-order statistics, when it combines GaLore with memory-efficient optimizers.
    """

    def __init__(
        self, params, lr: float = 1e-3, eps=(1e-30, 1e-3), clip_threshold: float = 1.0, decay_rate: float = -0.8,
        weight_decay=0.0, *, beta1: float | None = None, **kwargs,
    ):  # fmt: skip
        if beta1 is not None and not 0.0 <= beta1 < 1.0:
            raise ValueError(f"beta1 must be None (no first moment) or in [0, 1); got {beta1}")
        if not clip_threshold > 0.0:
            raise ValueError(f"clip_threshold must be > 0; got {clip_threshold}")
        if not decay_rate <= 0.0:
            raise ValueError(f"decay_rate must be <= 0 (beta2_t = 1 - t^decay_rate); got {decay_rate}")
        defaults = {"eps": tuple(eps), "clip_threshold": clip_threshold, "decay_rate": decay_rate, "beta1": beta1}
        super().__init__(params, lr, defaults, weight_decay=weight_decay, **kwargs)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("beta1", None)  # checkpoints written before beta1 existed had no first moment

    def _init_rule_state(self, state, grad, group):
        dtype, device = _state_dtype(grad), grad.device
        if grad.dim() >= 2:
            state["exp_avg_sq_row"] = torch.zeros(grad.shape[:-1], dtype=dtype, device=device)
            state["exp_avg_sq_col"] = torch.zeros(grad.shape[:-2] + grad.shape[-1:], dtype=dtype, device=device)
        else:
            state["exp_avg_sq"] = torch.zeros_like(grad, dtype=dtype)
        if group["beta1"] is not None:
            state["exp_avg"] = torch.zeros_like(grad, dtype=dtype)

    def _direction(self, state, grad, group):
        grad = grad.to(_state_dtype(grad))
        beta2t = 1.0 - math.pow(state["step"], group["decay_rate"])
        squared = grad.square().add_(group["eps"][0])
        if "exp_avg_sq_row" in state:
            row, col = state["exp_avg_sq_row"], state["exp_avg_sq_col"]
            row.mul_(beta2t).add_(squared.mean(dim=-1), alpha=1.0 - beta2t)
            col.mul_(beta2t).add_(squared.mean(dim=-2), alpha=1.0 - beta2t)
            r_factor = (row / row.mean(dim=-1, keepdim=True)).rsqrt_().unsqueeze(-1)
            c_factor = col.unsqueeze(-2).rsqrt()
            update = torch.mul(r_factor, c_factor).mul_(grad)
        else:
            state["exp_avg_sq"].mul_(beta2t).add_(squared, alpha=1.0 - beta2t)
            update = state["exp_avg_sq"].rsqrt().mul_(grad)
        rms = update.norm(2) / math.sqrt(update.numel())
        update.div_((rms / group["clip_threshold"]).clamp_(min=1.0))
        if group["beta1"] is None:
            return update, group["lr"]
        # the average is taken over lr-scaled updates (transformers' Adafactor), so a changing lr enters it per step
        update.mul_(group["lr"])
        state["exp_avg"].mul_(group["beta1"]).add_(update, alpha=1.0 - group["beta1"])
        return state["exp_avg"], 1.0
