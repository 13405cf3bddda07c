"""Layer-wise GaLore updates (paper Sec. 4.3): update each weight inside backward and free its gradient at once.

A post-accumulate-grad hook on every parameter runs as soon as the parameter's gradient for the micro-batch is
complete. Unlike the anchors, gradient accumulation and clipping are supported exactly:

* Between projector refreshes a projected weight only needs R = P^T G, which is linear in G: each micro-batch's
  gradient is projected and added to a small (r x n) accumulator, and the full gradient is freed at once.
* On a refresh update (and for parameters without projection) the projector needs the full accumulated gradient, so
  ``.grad`` is kept across the window's micro-batches and used on the last one.
* Gradient clipping needs the global norm before any update. With clipping on, the last micro-batch's hooks record
  each parameter's exact squared norm and set the (projected, so small) gradients aside; ``optimizer.step()`` then
  clips and applies them. The full norm of a projected gradient accumulated over several micro-batches is not
  available, so clipping with accumulation is refused when the builder sees both.
* Under data parallelism (``distributed``: by default, whether a multi-rank process group runs; the builder keeps
  the model out of DDP, see ``hf_memopt/ddp.py``) each hook averages across ranks what its update uses, once per
  update: the r x n projected gradient between refreshes (projection is linear, so the mean of P^T G_r is P^T of the
  mean gradient), and the full gradient on a refresh update (so every rank computes the same projector) and for
  parameters without projection. Clipping is refused: the norm of the averaged full gradient of a projected weight
  is never formed.

The result equals the non-layer-wise optimizer on the same data (tests pin this), and the Trainer's LR scheduler
steps once per update as usual, because ``step()`` is still called once per update.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch.utils.weak import WeakIdKeyDictionary

from hf_memopt.ddp import all_reduce_mean_, is_distributed
from hf_memopt.faults import all_finite

if TYPE_CHECKING:
    from hf_memopt.galore.optimizer import _GaLoreOptimizer

__all__ = ["LayerwiseUpdates", "accelerate_sync_gradients"]

# One layer-wise optimizer may own a parameter at a time: a new one (e.g. a second Trainer on the same model)
# removes the previous optimizer's hook instead of stepping the parameter twice.
_OWNER_HOOKS: WeakIdKeyDictionary = WeakIdKeyDictionary()


def accelerate_sync_gradients() -> bool:
    """True on the micro-batch that ends an accumulation window (``Trainer`` sets it; outside it, always True)."""
    from accelerate.state import GradientState

    return GradientState().sync_gradients


class LayerwiseUpdates:
    """The hooks and bookkeeping of layer-wise mode for one GaLore optimizer."""

    def __init__(
        self,
        optimizer: _GaLoreOptimizer,
        max_grad_norm: float = 0.0,
        is_accumulation_boundary: Callable[[], bool] | None = None,
        distributed: bool | None = None,
    ):
        if not max_grad_norm >= 0.0:
            raise ValueError(f"max_grad_norm must be >= 0; got {max_grad_norm}")
        distributed = is_distributed() if distributed is None else distributed
        if distributed and max_grad_norm > 0.0:
            raise ValueError(
                "layer-wise GaLore under distributed training cannot clip gradients (the norm of the averaged full "
                "gradient of a projected weight is never formed): set max_grad_norm=0"
            )
        self.distributed = distributed
        # bytes this rank sent to all-reduces in the hooks, and what DDP would have all-reduced (every full gradient)
        self.communicated_bytes = 0
        self.ddp_equivalent_bytes = 0
        self._optimizer = weakref.ref(optimizer)
        self.max_grad_norm = max_grad_norm
        self.is_boundary = is_accumulation_boundary or accelerate_sync_gradients
        self.last_grad_norm: float | None = None
        self._group_of = {p: g for g in optimizer.param_groups for p in g["params"]}
        self._pending: list[tuple[torch.nn.Parameter, dict[str, Any], torch.Tensor, bool]] = []
        self._reset_window()
        self._handles: dict[torch.nn.Parameter, Any] = {}
        for p in self._group_of:
            if p.requires_grad:
                previous = _OWNER_HOOKS.pop(p, None)
                if previous is not None:
                    previous.remove()
                self._handles[p] = _OWNER_HOOKS[p] = p.register_post_accumulate_grad_hook(self._on_gradient)

    def _reset_window(self) -> None:
        self._squared_norm: torch.Tensor | None = None
        self._norm_exact = True
        self._nonfinite = False

    def _add_squared_norm(self, grad: torch.Tensor) -> None:
        squared = torch.linalg.vector_norm(grad, dtype=torch.float32).square()
        if self._squared_norm is None:
            self._squared_norm = squared
        else:
            self._squared_norm = self._squared_norm + squared.to(self._squared_norm.device)

    @torch.no_grad()
    def _on_gradient(self, p: torch.nn.Parameter) -> None:
        optimizer = self._optimizer()
        if optimizer is None or p.grad is None:
            return
        group = self._group_of[p]
        boundary = self.is_boundary()
        if optimizer.is_projected(group) and not optimizer.is_refresh_step(p, group):
            grad, p.grad = p.grad, None
            state = optimizer.state[p]
            accumulated = state.pop("grad_accum", None)
            if boundary and accumulated is None and not self.distributed:
                self._add_squared_norm(grad)
            elif boundary:  # the full gradient here is one micro-batch's, or one rank's
                self._norm_exact = False
            full_bytes = grad.numel() * grad.element_size()
            low = optimizer.project_gradient(p, grad, group)
            del grad
            if accumulated is not None:
                low.add_(accumulated)
            if not boundary:
                state["grad_accum"] = low
                return
            self._average_across_ranks(low, full_bytes)
            self._finish(optimizer, p, group, low, projected=True)
        elif boundary:  # full gradient: accumulated in .grad by autograd until the window's last micro-batch
            grad, p.grad = p.grad, None
            self._average_across_ranks(grad, grad.numel() * grad.element_size())
            self._add_squared_norm(grad)
            self._finish(optimizer, p, group, grad, projected=False)

    def _average_across_ranks(self, grad: torch.Tensor, full_bytes: int) -> None:
        """Distributed mode: average ``grad`` (projected or full) over the ranks; count the bytes against DDP's."""
        if self.distributed:
            self.communicated_bytes += all_reduce_mean_(grad)
            self.ddp_equivalent_bytes += full_bytes

    def _finish(self, optimizer, p, group, grad: torch.Tensor, projected: bool) -> None:
        # A hook sees one parameter: without clipping, the others may already be updated, so a non-finite gradient
        # skips this parameter (before any state is touched) and ``finish_step`` counts the update as skipped. With
        # clipping every update waits for ``finish_step``, which skips them all (the global norm is non-finite).
        if self.max_grad_norm == 0.0 and not all_finite([grad]):
            self._nonfinite = True
            return
        if self.max_grad_norm > 0.0:
            self._pending.append((p, group, grad, projected))
        else:
            optimizer.apply_update(p, group, grad, projected=projected)

    @torch.no_grad()
    def finish_step(self) -> None:
        """End of an update (called by ``optimizer.step()``): clip and apply set-aside gradients, record the norm."""
        norm = None
        if self._squared_norm is not None and self._norm_exact:
            norm = math.sqrt(float(self._squared_norm))
        finite = not self._nonfinite and (norm is None or math.isfinite(norm))
        if self._optimizer().nonfinite_skips.record(finite, "GaLore (layer-wise)"):
            self._pending.clear()
        if self._pending:
            if norm is None:
                raise RuntimeError(
                    "layer-wise GaLore cannot clip: the full gradient norm of projected weights accumulated over "
                    "several micro-batches is unknown; set max_grad_norm=0 or gradient_accumulation_steps=1"
                )
            coefficient = min(1.0, self.max_grad_norm / (norm + 1e-6))
            optimizer = self._optimizer()
            for p, group, grad, projected in self._pending:
                if coefficient < 1.0:
                    grad.mul_(coefficient)
                optimizer.apply_update(p, group, grad, projected=projected)
            self._pending.clear()
        self.last_grad_norm = norm
        self._reset_window()

    def remove(self) -> None:
        """Detach the hooks (the optimizer stops updating inside backward)."""
        for p, handle in self._handles.items():
            handle.remove()
            if _OWNER_HOOKS.get(p) is handle:
                del _OWNER_HOOKS[p]
        self._handles.clear()
