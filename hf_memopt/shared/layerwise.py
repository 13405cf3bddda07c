"""Per-parameter updates inside backward: each parameter is updated as soon as its gradient is complete, and that
gradient is freed at once, so the gradients of the whole model never exist together.

Used by GaLore's layer-wise mode (GaLore paper Sec. 4.3) and LoQT's ``layerwise=True`` (the LoQT paper trains a 13B
model on a 24 GB GPU "using per-layer gradient updates"; official script ``scripts/13b_loqt8bit_per_layer.sh`` with
``loqt/optimizer_utils.py: register_hooks``). A method supplies a :class:`LayerwiseRule` (how one parameter is
updated, and optionally how a micro-batch's gradient may be reduced before it is accumulated); this module owns the
hooks and everything around them:

* A post-accumulate-grad hook on every parameter runs as soon as the parameter's gradient for the micro-batch is
  complete. On the micro-batch that ends an accumulation window the gradient is taken out of ``.grad`` and handed to
  the rule; before that, autograd keeps accumulating it in ``.grad``, so accumulation is exact.
* A rule may give a *compressor* for a parameter (GaLore between refreshes: R = P^T G is linear in G): then every
  micro-batch's gradient is compressed and added to a small accumulator, and the full gradient is freed at once.
* Gradient clipping needs the global norm before any update. With clipping on, the last micro-batch's hooks record
  each parameter's exact squared norm and set the gradients aside; :meth:`PerParameterUpdates.finish_step` then clips
  and applies them. The full norm of a compressed gradient accumulated over several micro-batches is not available,
  so clipping then raises.
* Non-finite gradients: without clipping a hook sees one parameter while others may already be updated, so a
  non-finite gradient skips this parameter (before any state is touched) and ``finish_step`` counts the whole update
  as skipped in the optimizer's :class:`~hf_memopt.shared.faults.SkipCounter`. With clipping every update waits for
  ``finish_step``, which skips them all.
* Under data parallelism (``distributed``: by default, whether a multi-rank process group runs; the caller keeps the
  model out of DDP) each hook averages across ranks what its update uses, once per update: the compressed gradient
  (compression is linear, so the mean of P^T G_r is P^T of the mean gradient) or the full gradient. Clipping is
  refused: the norm of the averaged full gradient of a compressed parameter is never formed.

The caller calls ``finish_step`` once per optimizer update, after backward (GaLore from ``optimizer.step()``, LoQT from
``on_pre_optimizer_step``), so the Trainer's LR scheduler steps once per update as usual.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch.utils.weak import WeakIdKeyDictionary

from hf_memopt.shared.faults import SkipCounter, all_finite, skip_counter_of
from hf_memopt.shared.parallel import all_reduce_mean_, is_distributed

__all__ = [
    "LayerwiseRule",
    "OptimizerStepRule",
    "PerParameterUpdates",
    "accelerate_sync_gradients",
]

# One layer-wise rule may own a parameter at a time: a new one (e.g. a second Trainer on the same model) removes the
# previous one's hook instead of stepping the parameter twice.
_OWNER_HOOKS: WeakIdKeyDictionary = WeakIdKeyDictionary()


def accelerate_sync_gradients() -> bool:
    """True on the micro-batch that ends an accumulation window (``Trainer`` sets it; outside it, always True)."""
    from accelerate.state import GradientState

    return GradientState().sync_gradients


class LayerwiseRule:
    """How a method updates one parameter from its gradient. Holds its optimizer weakly: once the optimizer is
    garbage, the hooks do nothing (and no reference cycle keeps it alive through the parameters' hooks).

    Args:
        optimizer: the optimizer whose parameters are updated and whose skip counter records the updates.
        name: the method's name, for messages (``"layer-wise <name>"``).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, name: str):
        self._optimizer = weakref.ref(optimizer)
        self.name = name

    @property
    def optimizer(self) -> Any:
        """The optimizer, or None once it is gone."""
        return self._optimizer()

    def skip_counter(self) -> SkipCounter:
        counter = skip_counter_of(self.optimizer)
        if counter is None:
            raise RuntimeError(f"layer-wise {self.name}: the optimizer has no skip counter (hf_memopt.shared.faults)")
        return counter

    def compressor(self, p: torch.nn.Parameter) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """A linear map applied to each micro-batch's gradient of ``p`` before accumulation, or None (full)."""
        return None

    def apply(self, p: torch.nn.Parameter, grad: torch.Tensor, compressed: bool) -> None:
        """Update ``p`` from its gradient of the whole update (``compressed``: the compressor's image of it)."""
        raise NotImplementedError


class OptimizerStepRule(LayerwiseRule):
    """Update one parameter with a stock ``torch.optim.Optimizer``: its ``step()`` runs on a view of the optimizer
    holding only that parameter (in its own group's settings), so any optimizer works unchanged and its
    ``state_dict`` (what the Trainer checkpoints) is the one whole-model training writes.

    # NOTE: ``param_groups`` is swapped for the duration of the step; keys the step writes into the group are copied
    # back. Optimizers that index per-parameter settings by position (bitsandbytes' ``GlobalOptimManager``
    # overrides) see position (0, 0). The class's ``step`` is called, not a wrapper patched onto the instance (the
    # LR scheduler's step counter, a caller's own end-of-update step): those belong to the once-per-update call.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, name: str):
        super().__init__(optimizer, name)
        self._group_index = {p: i for i, g in enumerate(optimizer.param_groups) for p in g["params"]}

    def apply(self, p: torch.nn.Parameter, grad: torch.Tensor, compressed: bool) -> None:
        optimizer = self.optimizer
        groups = optimizer.param_groups
        index = self._group_index[p]
        single = {**groups[index], "params": [p]}
        optimizer.param_groups = [single]
        p.grad = grad
        try:
            type(optimizer).step(optimizer)
        finally:
            optimizer.param_groups = groups
            p.grad = None
        groups[index].update((k, v) for k, v in single.items() if k != "params")


class PerParameterUpdates:
    """The hooks and bookkeeping of layer-wise updates for ``params`` under ``rule`` (see the module docstring).

    Args:
        rule: the method's per-parameter update.
        params: the parameters to update inside backward (those without ``requires_grad`` are left alone).
        max_grad_norm: clip the global gradient norm at ``finish_step``, 0 disables.
        is_accumulation_boundary: returns True on the micro-batch that ends an accumulation window; defaults to
            accelerate's ``GradientState().sync_gradients``, which ``Trainer`` sets per micro-batch.
        distributed: average across ranks inside the hooks (default: whether a multi-rank process group runs).
    """

    def __init__(
        self,
        rule: LayerwiseRule,
        params: Iterable[torch.nn.Parameter],
        max_grad_norm: float = 0.0,
        is_accumulation_boundary: Callable[[], bool] | None = None,
        distributed: bool | None = None,
    ):
        if not max_grad_norm >= 0.0:
            raise ValueError(f"max_grad_norm must be >= 0; got {max_grad_norm}")
        distributed = is_distributed() if distributed is None else distributed
        if distributed and max_grad_norm > 0.0:
            raise ValueError(
                f"layer-wise {rule.name} under distributed training cannot clip gradients (the norm of the averaged "
                "full gradient of a projected weight is never formed): set max_grad_norm=0"
            )
        self.rule = rule
        self.distributed = distributed
        # bytes this rank sent to all-reduces in the hooks, and what DDP would have all-reduced (every full gradient)
        self.communicated_bytes = 0
        self.ddp_equivalent_bytes = 0
        self.max_grad_norm = max_grad_norm
        self.is_boundary = is_accumulation_boundary or accelerate_sync_gradients
        self.last_grad_norm: float | None = None
        self._accumulated: dict[torch.nn.Parameter, torch.Tensor] = {}
        self._pending: list[tuple[torch.nn.Parameter, torch.Tensor, bool]] = []
        self._reset_window()
        self._handles: dict[torch.nn.Parameter, Any] = {}
        for p in params:
            if p.requires_grad and p not in self._handles:
                previous = _OWNER_HOOKS.pop(p, None)
                if previous is not None:
                    previous.remove()
                self._handles[p] = _OWNER_HOOKS[p] = p.register_post_accumulate_grad_hook(self._on_gradient)

    def _reset_window(self) -> None:
        self._squared_norm: torch.Tensor | None = None
        self._norm_exact = True
        self._nonfinite = False

    def _add_squared_norm(self, grad: torch.Tensor) -> None:
        # float32 for half and single precision, float64 stays float64
        squared = torch.linalg.vector_norm(grad, dtype=torch.promote_types(grad.dtype, torch.float32)).square()
        if self._squared_norm is None:
            self._squared_norm = squared
        else:
            self._squared_norm = self._squared_norm + squared.to(self._squared_norm.device)

    @torch.no_grad()
    def _on_gradient(self, p: torch.nn.Parameter) -> None:
        if self.rule.optimizer is None or p.grad is None:
            return
        boundary = self.is_boundary()
        compress = self.rule.compressor(p)
        if compress is not None:
            grad, p.grad = p.grad, None
            accumulated = self._accumulated.pop(p, None)
            if boundary and accumulated is None and not self.distributed:
                self._add_squared_norm(grad)
            elif boundary:  # the full gradient here is one micro-batch's, or one rank's
                self._norm_exact = False
            full_bytes = grad.numel() * grad.element_size()
            low = compress(grad)
            del grad
            if accumulated is not None:
                low.add_(accumulated)
            if not boundary:
                self._accumulated[p] = low
                return
            self._average_across_ranks(low, full_bytes)
            self._finish(p, low, compressed=True)
        elif boundary:  # full gradient: accumulated in .grad by autograd until the window's last micro-batch
            grad, p.grad = p.grad, None
            self._average_across_ranks(grad, grad.numel() * grad.element_size())
            self._add_squared_norm(grad)
            self._finish(p, grad, compressed=False)

    def _average_across_ranks(self, grad: torch.Tensor, full_bytes: int) -> None:
        """Distributed mode: average ``grad`` (compressed or full) over the ranks; count the bytes against DDP's."""
        if self.distributed:
            self.communicated_bytes += all_reduce_mean_(grad)
            self.ddp_equivalent_bytes += full_bytes

    def _finish(self, p: torch.nn.Parameter, grad: torch.Tensor, compressed: bool) -> None:
        if self.max_grad_norm == 0.0 and not all_finite([grad]):
            self._nonfinite = True
            return
        if self.max_grad_norm > 0.0:
            self._pending.append((p, grad, compressed))
        else:
            self.rule.apply(p, grad, compressed)

    @torch.no_grad()
    def finish_step(self, finite: bool = True) -> None:
        """End of an update: clip and apply set-aside gradients, record the norm and the update in the skip counter.

        ``finite=False`` marks the update as non-finite for a reason the hooks cannot see (e.g. a gradient a method
        collects outside the parameters).
        """
        norm = None
        if self._squared_norm is not None and self._norm_exact:
            norm = math.sqrt(float(self._squared_norm))
        finite = finite and not self._nonfinite and (norm is None or math.isfinite(norm))
        if self.rule.skip_counter().record(finite, f"{self.rule.name} (layer-wise)"):
            self._pending.clear()
        if self._pending:
            if norm is None:
                raise RuntimeError(
                    f"layer-wise {self.rule.name} cannot clip: the full gradient norm of projected weights "
                    "accumulated over several micro-batches is unknown; set max_grad_norm=0 or "
                    "gradient_accumulation_steps=1"
                )
            coefficient = min(1.0, self.max_grad_norm / (norm + 1e-6))
            for p, grad, compressed in self._pending:
                if coefficient < 1.0:
                    grad.mul_(coefficient)
                self.rule.apply(p, grad, compressed)
            self._pending.clear()
        self.last_grad_norm = norm
        self._reset_window()

    def remove(self) -> None:
        """Detach the hooks (updates stop happening inside backward)."""
        for p, handle in self._handles.items():
            handle.remove()
            if _OWNER_HOOKS.get(p) is handle:
                del _OWNER_HOOKS[p]
        self._handles.clear()
