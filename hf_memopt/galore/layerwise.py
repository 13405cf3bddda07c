"""Layer-wise GaLore updates (paper Sec. 4.3): update each weight inside backward and free its gradient at once.

The hooks, accumulation, clipping, non-finite skipping and data-parallel averaging are the shared per-parameter
machinery of :mod:`hf_memopt.shared.layerwise`; this module only says how GaLore updates one parameter:

* Between projector refreshes a projected weight only needs R = P^T G, which is linear in G: each micro-batch's
  gradient is projected and added to a small (r x n) accumulator, and the full gradient is freed at once.
* On a refresh update (and for parameters without projection) the projector needs the full accumulated gradient, so
  ``.grad`` is kept across the window's micro-batches and used on the last one.

The result equals the non-layer-wise optimizer on the same data (tests pin this), and the Trainer's LR scheduler
steps once per update as usual, because ``step()`` is still called once per update.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from hf_memopt.shared.layerwise import LayerwiseRule, PerParameterUpdates

if TYPE_CHECKING:
    from hf_memopt.galore.optimizer import _GaLoreOptimizer

__all__ = ["LayerwiseUpdates"]


class _GaLoreRule(LayerwiseRule):
    """GaLore's update of one parameter: projected (or not) as its parameter group says."""

    def __init__(self, optimizer: _GaLoreOptimizer):
        super().__init__(optimizer, "GaLore")
        self._group_of = {p: g for g in optimizer.param_groups for p in g["params"]}

    def compressor(self, p: torch.nn.Parameter) -> Callable[[torch.Tensor], torch.Tensor] | None:
        optimizer, group = self.optimizer, self._group_of[p]
        if optimizer.is_projected(group) and not optimizer.is_refresh_step(p, group):
            return lambda grad: optimizer.project_gradient(p, grad, group)
        return None

    def apply(self, p: torch.nn.Parameter, grad: torch.Tensor, compressed: bool) -> None:
        self.optimizer.apply_update(p, self._group_of[p], grad, projected=compressed)


class LayerwiseUpdates(PerParameterUpdates):
    """The hooks and bookkeeping of layer-wise mode for one GaLore optimizer (see the module docstring)."""

    def __init__(
        self,
        optimizer: _GaLoreOptimizer,
        max_grad_norm: float = 0.0,
        is_accumulation_boundary: Callable[[], bool] | None = None,
        distributed: bool | None = None,
    ):
        rule = _GaLoreRule(optimizer)
        super().__init__(rule, list(rule._group_of), max_grad_norm, is_accumulation_boundary, distributed)
