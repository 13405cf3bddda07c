"""Non-finite gradients and losses: detect them cheaply, skip the update, stop after too many in a row.

The policy, shared by every method that owns an update path (GaLore, BlockLLM, LoQT, ZO):

* An optimizer update whose gradient (for ZO: whose perturbed loss, hence projected gradient) holds NaN or Inf is
  skipped whole: no parameter, moment, projector, step counter, quantized weight or block selection changes, and a
  warning names the update. This is what ``torch.amp.GradScaler`` does for an overflowed fp16 step. The one
  exception is layer-wise GaLore without clipping: its hooks update each parameter during backward, before later
  gradients exist, so a non-finite gradient skips only that parameter's update (one host sync per parameter); with
  clipping the whole update is checked first.
* After ``max_consecutive_skips`` skipped updates in a row, the next non-finite one raises :class:`NonFiniteError`
  telling the user what to try; ``0`` stops at the first. A finite update resets the streak.
* The Trainer still counts a skipped update as a step and its LR scheduler still advances (as with GradScaler): the
  step is lost, not postponed.

The policy is one field of each method config (``max_consecutive_skips``), like ``seed``: it travels with the config
through recipes, the CLI and the model card, and two trainers in one process can differ. The counters live on the
optimizer (:func:`install_skip_counter`) and travel in its ``state_dict`` under ``"nonfinite_skips"`` as plain ints,
so a resumed run continues a streak; :class:`SkippedUpdatesCallback` logs the total as ``skipped_updates``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import torch
from transformers import Trainer, TrainerCallback

from hf_memopt.shared.optim_state import unwrap_optimizer
from hf_memopt.shared.validation import check_int

__all__ = [
    "DEFAULT_MAX_CONSECUTIVE_SKIPS",
    "NonFiniteError",
    "SkipCounter",
    "SkippedUpdatesCallback",
    "all_finite",
    "install_fault_reporting",
    "install_skip_counter",
    "out_of_memory_advice",
    "skip_counter_of",
]

logger = logging.getLogger(__name__)

DEFAULT_MAX_CONSECUTIVE_SKIPS = 5
_STATE_KEY = "nonfinite_skips"
_ATTRIBUTE = "nonfinite_skips"


class NonFiniteError(RuntimeError):
    """Too many optimizer updates in a row had a non-finite gradient or loss."""


def all_finite(tensors: Iterable[torch.Tensor | None]) -> bool:
    """Whether every element of every tensor is finite, with one host synchronisation.

    The max-norm over all tensors (``torch.nn.utils.get_total_norm(..., inf)``: one fused reduction per device and
    dtype, as ``clip_grad_norm_`` computes it) is NaN or Inf exactly when a tensor holds a NaN or Inf, and unlike a
    sum it cannot overflow on large finite values. On CPU, where the fused norm loops over the tensors anyway and its
    max-norm costs about 10x a plain reduction, each tensor's ``aminmax`` (one pass, NaN-propagating, no overflow
    either) answers the same question.
    """
    tensors = [t for t in tensors if t is not None and t.numel() > 0]
    if not tensors:
        return True
    device = tensors[0].device
    if device.type == "cpu":
        extrema = [x for t in tensors for x in torch.aminmax(t)]
    else:
        extrema = [torch.nn.utils.get_total_norm(tensors, float("inf"))]
    return bool(torch.isfinite(torch.stack([x.float().to(device) for x in extrema])).all())


def out_of_memory_advice() -> str:
    """What a user can do after an out-of-memory error (appended to every re-raised message)."""
    return (
        "Lower per_device_train_batch_size (raise gradient_accumulation_steps to keep the batch), shorten the "
        "sequences or enable gradient_checkpointing, then resume from the last complete checkpoint "
        "(trainer.train(resume_from_checkpoint=hf_memopt.last_complete_checkpoint(args.output_dir)))"
    )


class SkipCounter:
    """Consecutive and total skipped updates of one optimizer, and the stop rule (see module docstring).

    Args:
        max_consecutive_skips: updates that may be skipped in a row; the next non-finite one raises, >= 0.
    """

    def __init__(self, max_consecutive_skips: int = DEFAULT_MAX_CONSECUTIVE_SKIPS):
        self.max_consecutive_skips = check_int("max_consecutive_skips", max_consecutive_skips, 0)
        self.updates = 0  # optimizer updates seen, skipped ones included
        self.consecutive = 0
        self.total = 0
        self.last_skipped = False

    def record(self, finite: bool, what: str) -> bool:
        """Count one update; returns True when it must be skipped. Raises :class:`NonFiniteError` past the limit."""
        self.updates += 1
        self.last_skipped = not finite
        if finite:
            self.consecutive = 0
            return False
        self.consecutive += 1
        self.total += 1
        if self.consecutive > self.max_consecutive_skips:
            raise NonFiniteError(
                f"{what}: non-finite (NaN/Inf) gradient or loss at optimizer update {self.updates} "
                f"({self.consecutive} in a row, max_consecutive_skips={self.max_consecutive_skips}); training "
                "stopped. The skipped updates changed nothing, so the model and optimizer state are those of the last "
                "finite update. Lower the learning rate, enable clipping (max_grad_norm > 0), use bf16 instead of "
                "fp16, or look for bad samples in the data; then resume from the last checkpoint"
            )
        logger.warning(
            "%s: non-finite (NaN/Inf) gradient or loss at optimizer update %d; update skipped (%d in a row, %d in "
            "total; training stops after %d in a row)",
            what, self.updates, self.consecutive, self.total, self.max_consecutive_skips,
        )  # fmt: skip
        return True

    def skip_if_nonfinite(self, tensors: Iterable[torch.Tensor | None], what: str) -> bool:
        """:meth:`record` for an update whose inputs are ``tensors`` (gradients, projected gradients)."""
        return self.record(all_finite(tensors), what)

    def state_dict(self) -> dict[str, int]:
        return {"updates": self.updates, "consecutive": self.consecutive, "total": self.total}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.updates = int(state["updates"])
        self.consecutive = int(state["consecutive"])
        self.total = int(state["total"])


def install_skip_counter(optimizer: torch.optim.Optimizer, max_consecutive_skips: int) -> SkipCounter:
    """Give ``optimizer`` a :class:`SkipCounter` (``optimizer.nonfinite_skips``) saved in its ``state_dict``.

    Idempotent: an optimizer that already has one keeps it. Works on any ``torch.optim.Optimizer`` (the stock one
    LoQT trains with included) through the state-dict hooks, so nothing else about the optimizer changes.
    """
    existing = getattr(optimizer, _ATTRIBUTE, None)
    if isinstance(existing, SkipCounter):
        return existing
    counter = SkipCounter(max_consecutive_skips)
    setattr(optimizer, _ATTRIBUTE, counter)

    def save(opt: torch.optim.Optimizer, state_dict: dict[str, Any]) -> dict[str, Any]:
        state_dict[_STATE_KEY] = counter.state_dict()
        return state_dict

    def load(opt: torch.optim.Optimizer, state_dict: dict[str, Any]) -> dict[str, Any]:
        state_dict = dict(state_dict)
        saved = state_dict.pop(_STATE_KEY, None)
        if saved is not None:
            counter.load_state_dict(saved)
        return state_dict

    optimizer.register_state_dict_post_hook(save)
    optimizer.register_load_state_dict_pre_hook(load, prepend=True)
    if type(optimizer).load_state_dict is not torch.optim.Optimizer.load_state_dict:
        # NOTE: bitsandbytes' 8-bit optimizers (``optim="adamw_bnb_8bit"``) replace ``load_state_dict`` without
        # running the load hooks, so the counter would silently restart at a resume: read it before theirs runs.
        own_load = optimizer.load_state_dict

        def load_state_dict(state_dict: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
            return own_load(load(optimizer, state_dict), *args, **kwargs)

        optimizer.load_state_dict = load_state_dict
    return counter


def skip_counter_of(optimizer: Any) -> SkipCounter | None:
    """The :class:`SkipCounter` of ``optimizer`` (accelerate's wrapper looked through), or None."""
    counter = getattr(unwrap_optimizer(optimizer), _ATTRIBUTE, None)
    return counter if isinstance(counter, SkipCounter) else None


class SkippedUpdatesCallback(TrainerCallback):
    """Logs ``skipped_updates``: the optimizer updates skipped for a non-finite gradient or loss since the start of
    training (a resumed run included).

    Uses ``on_log``, whose ``logs`` the printer and the integrations read; the Trainer has already appended a copy to
    ``state.log_history``, which is updated too so the count lands in ``trainer_state.json``.
    """

    def on_log(self, args, state, control, logs=None, optimizer=None, **kwargs):
        counter = skip_counter_of(optimizer)
        if logs is None or counter is None or "loss" not in logs:
            return
        logs["skipped_updates"] = counter.total
        if state.log_history and "loss" in state.log_history[-1]:
            state.log_history[-1]["skipped_updates"] = counter.total


def install_fault_reporting(trainer: Trainer) -> None:
    """Add one :class:`SkippedUpdatesCallback` to ``trainer`` (first in line, so the printer sees the count)."""
    if not any(isinstance(cb, SkippedUpdatesCallback) for cb in trainer.callback_handler.callbacks):
        trainer.callback_handler.callbacks.insert(0, SkippedUpdatesCallback())
