"""ZO-SGD: the MeZO update as a ``torch.optim.Optimizer`` so the Trainer's LR scheduler drives it."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

from hf_memopt.shared.faults import DEFAULT_MAX_CONSECUTIVE_SKIPS
from hf_memopt.shared.optimizer_base import _MemoptOptimizer
from hf_memopt.shared.parallel import all_reduce_mean_, is_distributed
from hf_memopt.zo.perturb import apply_zo_update_, mix_seed

__all__ = ["ZOSGD"]


class ZOSGD(_MemoptOptimizer):
    """Zeroth-order SGD (MeZO, arXiv 2305.17333, Algorithm 1) driven by projected gradients, not ``.grad``.

    The training step perturbs the parameters with :meth:`sample_seed` and reports each SPSA sample's projected
    gradient through :meth:`accumulate` (summed over gradient-accumulation micro-batches, whose losses are already
    divided by the number of micro-batches). :meth:`step` applies ``p -= lr * (mean_k g_k z_k + wd * p)`` with each
    group's current (scheduler-controlled) ``lr``, regenerating every z from its seed.

    All state lives in ``state[first parameter]``: ``zo_step`` and ``zo_seed`` (ints) and ``zo_projected_grads``
    (float64 tensor, the current step's accumulators), so a checkpoint resumes with the same perturbations.

    Under data parallelism (``distributed``: by default, whether a multi-rank process group runs) :meth:`step` first
    averages the projected gradients across ranks: one all-reduce of ``n_samples`` numbers per update, the only
    communication ZO needs, since every rank draws the same z from the same seeds.

    Hyperparameter checks, the closure, the skip counter and state dtypes on load (the float64 accumulators of a
    lower-precision model stay float64) come from :class:`hf_memopt.shared.optimizer_base._MemoptOptimizer`.

    # NOTE: departs from the ``Optimizer`` contract: ``step()`` ignores ``.grad`` (there is none). Parameters listed
    # in ``deferred`` are not touched by ``step()``; their update is queued in ``pending`` and applied by the ZO2
    # offload engine when the block holding them is next uploaded (``apply_pending``).
    """

    fault_label = "ZO"

    def __init__(
        self,
        params: Iterable[torch.nn.Parameter] | Iterable[dict[str, Any]],
        lr: float = 1e-6,
        weight_decay: float = 0.0,
        *,
        n_samples: int = 1,
        seed: int = 0,
        distributed: bool | None = None,
        max_consecutive_skips: int = DEFAULT_MAX_CONSECUTIVE_SKIPS,
    ):
        if n_samples < 1:
            raise ValueError(f"n_samples must be >= 1; got {n_samples}")
        super().__init__(params, {"lr": lr, "weight_decay": weight_decay}, max_consecutive_skips=max_consecutive_skips)
        self.n_samples = n_samples
        ordered = [p for g in self.param_groups for p in g["params"]]
        if not ordered:
            raise ValueError("ZOSGD got no parameters to train")
        # z's index of each parameter: its position in the optimizer, fixed for the run
        self.param_index: dict[torch.nn.Parameter, int] = {p: i for i, p in enumerate(ordered)}
        self._anchor = ordered[0]
        self.state[self._anchor].update(
            zo_step=0,
            zo_seed=int(seed),
            zo_projected_grads=torch.zeros(n_samples, dtype=torch.float64),
        )
        self.deferred: set[torch.nn.Parameter] = set()
        self.pending: dict[torch.nn.Parameter, tuple[tuple[int, ...], tuple[float, ...], float, float]] = {}
        self.last_projected_grads: list[float] = []
        self.before_step: list[Callable[[], None]] = []
        self.distributed = is_distributed() if distributed is None else distributed

    @property
    def _zo_state(self) -> dict[str, Any]:
        return self.state[self._anchor]

    @property
    def zo_step(self) -> int:
        return int(self._zo_state["zo_step"])

    def sample_seed(self, sample: int) -> int:
        """Seed of SPSA sample ``sample`` of the current optimizer step."""
        return mix_seed(self._zo_state["zo_seed"], self._zo_state["zo_step"], sample)

    def accumulate(self, sample: int, projected_grad: float) -> None:
        self._zo_state["zo_projected_grads"][sample] += projected_grad

    def trainable(self) -> list[tuple[int, torch.nn.Parameter]]:
        """``(index, parameter)`` of every parameter not handled by the offload engine."""
        return [(i, p) for p, i in self.param_index.items() if p not in self.deferred]

    def _step(self) -> None:
        for hook in self.before_step:  # the offload engine flushes the previous step's queue first
            hook()
        state = self._zo_state
        grads = state["zo_projected_grads"]
        if self.distributed:
            self._average_across_ranks(grads)
        # A non-finite L+ or L- makes its projected gradient non-finite: skip the update. The parameters are already
        # back at theta (the training step undid its perturbations) and zo_step stays, so nothing changed.
        if self._skip_if_nonfinite([grads]):
            self.last_projected_grads = []
            grads.zero_()
            return
        seeds = tuple(self.sample_seed(k) for k in range(self.n_samples))
        coefficients = tuple(float(g) / self.n_samples for g in grads)
        for group in self.param_groups:
            lr, wd = float(group["lr"]), float(group["weight_decay"])
            for p in group["params"]:
                if p in self.deferred:
                    self.pending[p] = (seeds, coefficients, lr, wd)
                else:
                    apply_zo_update_(p, self.param_index[p], seeds, coefficients, lr, wd)
        self.last_projected_grads = [float(g) for g in grads]
        grads.zero_()
        state["zo_step"] = int(state["zo_step"]) + 1

    def _average_across_ranks(self, grads: torch.Tensor) -> None:
        """Average the projected gradients over ranks, on the parameters' device (NCCL reduces no CPU tensors)."""
        on_device = grads.to(self._anchor.device)
        all_reduce_mean_(on_device)
        grads.copy_(on_device)

    def apply_pending(self, p: torch.nn.Parameter, target: torch.Tensor | None = None) -> bool:
        """Apply ``p``'s queued update to ``target`` (default ``p``); returns whether there was one."""
        queued = self.pending.pop(p, None)
        if queued is None:
            return False
        seeds, coefficients, lr, wd = queued
        apply_zo_update_(p if target is None else target, self.param_index[p], seeds, coefficients, lr, wd)
        return True
