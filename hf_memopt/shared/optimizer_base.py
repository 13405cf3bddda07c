"""The private base of hf_memopt's own optimizers (GaLore, BlockLLM, ZO): what every one of them does the same way.

Like torchao's ``_AdamBase`` (``torchao/optim/adam.py``), one base holds the contract and each method keeps its math
(state, update direction, extras) in its own file:

* **Hyperparameter checks.** ``lr`` and ``weight_decay`` >= 0, ``betas`` a pair in [0, 1), ``eps`` >= 0 (a number,
  or Adafactor's pair ``(eps1, eps2)``), each checked when it is among the defaults and failing with a ``ValueError``
  that names the argument and the allowed range, as ``torch.optim.AdamW`` does. NaN fails every check.
* **The step.** :meth:`_MemoptOptimizer.step` runs the closure with gradients enabled (``torch.optim`` convention),
  then the method's :meth:`_MemoptOptimizer._step` without autograd, and returns the closure's loss.
* **Non-finite updates** (:mod:`hf_memopt.shared.faults`): a :class:`~hf_memopt.shared.faults.SkipCounter` as
  ``nonfinite_skips``, saved in the ``state_dict``; :meth:`_MemoptOptimizer._skip_if_nonfinite` is the check a method
  runs before it touches any state, labelled with the method's ``fault_label``.
* **State dtypes on load** (:func:`hf_memopt.shared.optim_state.keep_state_dtypes_on_load`): 8-bit codes, bool masks
  and float32/float64 statistics of lower-precision weights keep their dtype when a checkpoint is loaded. Every state
  holds only tensors, ints, floats and bools, so ``optimizer.pt`` loads with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch

from hf_memopt.shared.faults import DEFAULT_MAX_CONSECUTIVE_SKIPS, install_skip_counter
from hf_memopt.shared.optim_state import keep_state_dtypes_on_load

__all__ = ["check_hyperparameters"]


def check_hyperparameters(defaults: Mapping[str, Any]) -> dict[str, Any]:
    """``defaults`` with ``betas`` (and a pair ``eps``) as tuples; raises ``ValueError`` naming the first of ``lr``,
    ``weight_decay``, ``betas``, ``eps`` that is out of range. Written as ``not x >= 0`` so NaN is refused too."""
    defaults = dict(defaults)
    for name in ("lr", "weight_decay"):
        if name in defaults and not defaults[name] >= 0.0:
            raise ValueError(f"{name} must be >= 0; got {defaults[name]}")
    if "betas" in defaults:
        betas = defaults["betas"] = tuple(defaults["betas"])
        if len(betas) != 2 or not all(0.0 <= beta < 1.0 for beta in betas):
            raise ValueError(f"betas must be a pair (beta1, beta2), each in [0, 1); got {betas}")
    if isinstance(defaults.get("eps"), tuple | list):
        defaults["eps"] = tuple(defaults["eps"])
    if "eps" in defaults:
        eps = defaults["eps"]
        if not all(e >= 0.0 for e in (eps if isinstance(eps, tuple) else (eps,))):
            raise ValueError(f"eps must be >= 0 (each of them, for a pair); got {eps}")
    return defaults


class _MemoptOptimizer(torch.optim.Optimizer):
    """Base of the GaLore, BlockLLM and ZO optimizers (see the module docstring).

    Subclasses implement :meth:`_step` (one update, under ``torch.no_grad()``) and set ``fault_label``.

    Args:
        params: parameters or parameter groups, as for any ``torch.optim.Optimizer``.
        defaults: the group defaults; ``lr``, ``weight_decay``, ``betas`` and ``eps`` are checked when present
            (``betas`` and a pair ``eps`` are stored as tuples).
        max_consecutive_skips: updates with a non-finite gradient are skipped whole; after this many in a row the next
            one raises (``hf_memopt.shared.faults``), >= 0.
    """

    fault_label: str  # set by each subclass: names the method in skip warnings and NonFiniteError

    def __init__(
        self,
        params: Iterable[Any],
        defaults: dict[str, Any],
        *,
        max_consecutive_skips: int = DEFAULT_MAX_CONSECUTIVE_SKIPS,
    ):
        super().__init__(params, check_hyperparameters(defaults))
        keep_state_dtypes_on_load(self)
        self.nonfinite_skips = install_skip_counter(self, max_consecutive_skips)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._step()
        return loss

    def _step(self) -> None:
        """One optimizer update from the current gradients (``step()`` has run the closure already)."""
        raise NotImplementedError

    def _skip_if_nonfinite(self, tensors: Iterable[torch.Tensor | None]) -> bool:
        """Count this update; True when it must be skipped because ``tensors`` hold a NaN or Inf (raises
        :class:`~hf_memopt.shared.faults.NonFiniteError` past ``max_consecutive_skips``)."""
        return self.nonfinite_skips.skip_if_nonfinite(tensors, self.fault_label)

    def _refuse_sparse(self, grads: Iterable[torch.Tensor]) -> None:
        """Raise ``RuntimeError`` if a gradient is sparse: the methods' updates are written for dense ones."""
        if any(g.is_sparse for g in grads):
            raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
