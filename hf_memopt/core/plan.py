"""What a method asks of the Trainer: the :class:`MethodPlan` its planner returns, which ``attach()`` alone applies.

A method's planner (``plan_<name>(trainer, config) -> MethodPlan``, registered with
:func:`hf_memopt.core.registry.register_method`) validates the config against the trainer's model and arguments and
*declares* what the method needs; it changes nothing itself. ``attach()`` then checks the plan against the methods
already attached (one optimizer, one source of the true ``grad_norm``, one data-parallel strategy), transforms the
model, and installs the rest. The pieces every method shares (the engine check, the ``skipped_updates`` log, keeping
the model out of DDP, the ``grad_norm`` correction, the model card, the memory report) are installed by ``attach()``
once per trainer, whatever the method or combination, so no planner installs them by hand.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    import torch
    from torch import nn
    from transformers import TrainerCallback

    from hf_memopt.shared.saving import PlainForm

__all__ = [
    "DataParallel",
    "MethodPlan",
    "OptimizerFactory",
    "OptimizerHyperparameters",
    "TrainingStepWrapper",
]

# ``create_optimizer(model, hparams, no_decay_names)``: the model the Trainer trains (built when training starts),
# ``TrainingArguments``' optimizer settings read at that moment, and the names of the parameters the Trainer's rule
# exempts from weight decay (biases, normalisation weights).
OptimizerFactory = Callable[["nn.Module", "OptimizerHyperparameters", set[str]], "torch.optim.Optimizer"]
# given the trainer's current (bound) ``training_step``, return the one to use; wrappers compose in attach order
TrainingStepWrapper = Callable[[Callable[..., "torch.Tensor"]], Callable[..., "torch.Tensor"]]
DataParallel = Literal["ddp", "own", "any"]


@dataclass(frozen=True)
class OptimizerHyperparameters:
    """The optimizer settings of ``TrainingArguments`` that every hf_memopt optimizer honours."""

    lr: float
    weight_decay: float
    betas: tuple[float, float]
    eps: float
    max_grad_norm: float
    gradient_accumulation_steps: int

    @classmethod
    def from_args(cls, args: Any) -> OptimizerHyperparameters:
        return cls(
            lr=args.learning_rate,
            weight_decay=args.weight_decay,
            betas=(args.adam_beta1, args.adam_beta2),
            eps=args.adam_epsilon,
            max_grad_norm=args.max_grad_norm or 0.0,
            gradient_accumulation_steps=args.gradient_accumulation_steps,
        )


@dataclass(frozen=True)
class MethodPlan:
    """What one method needs installed on a ``transformers.Trainer``; ``attach()`` applies it (in this field order).

    Args:
        prepare_model: transforms ``trainer.model`` in place (replaces or freezes layers, adds buffers). ``attach()``
            calls it after every check passed and before anything else is installed, so a refusal leaves the trainer
            untouched; it should itself validate before it changes anything. None: the model is used as it is.
        create_optimizer: builds the optimizer when training starts (:data:`OptimizerFactory`). None: the Trainer's
            own optimizer (``TrainingArguments.optim``) is used; must be set exactly when the method is registered
            with ``sets_optimizer=True``.
        on_optimizer_created: called with every optimizer the Trainer creates (its own or another method's), before
            a checkpoint is loaded into it, e.g. to give it state that travels in its ``state_dict``.
        callbacks: added after the trainer's callbacks (``trainer.add_callback``), in order.
        first_callbacks: put before every other callback, so the printer and loggers see what their ``on_log`` adds.
        wrap_training_step: replaces ``trainer.training_step`` by ``wrap(current)``; for what the Trainer offers no
            callback for (each micro-batch's loss, work between the last backward and clipping, no backward at all).
        data_parallel: what the method needs under DDP. ``"ddp"``: its optimizer steps on the gradients DDP
            averaged (the default, what any stock optimizer needs); ``"own"``: it averages what it uses itself, so
            the model must stay out of DDP (once any attached plan says so, it does); ``"any"``: it has no gradient
            averaging of its own (a model transform, or parameters another method's optimizer steps). ``"ddp"``
            and ``"own"`` on one trainer under DDP are refused.
        distributed_error: raised by ``attach()`` when the trainer runs on more than one process: the method, so
            configured, cannot train correctly there (the message names what to change).
        grad_norm: for updates done inside backward, or without a backward: the Trainer measures ``grad_norm``
            from ``.grad`` after backward, which such methods have freed (or never formed), and would log 0.
            Returns the true norm of the last update's gradient, or None when it is unknown (then ``grad_norm`` is
            removed from the logs rather than shown wrong). At most one attached plan may have one.
        plain_save: the plain form of the model for user saves (:func:`hf_memopt.shared.saving.register_plain_save`):
            checkpoints keep the method's state, ``save_model`` / ``save_pretrained`` write a plain model.
    """

    prepare_model: Callable[[nn.Module], None] | None = None
    create_optimizer: OptimizerFactory | None = None
    on_optimizer_created: Callable[[torch.optim.Optimizer], None] | None = None
    callbacks: tuple[TrainerCallback, ...] = ()
    first_callbacks: tuple[TrainerCallback, ...] = ()
    wrap_training_step: TrainingStepWrapper | None = None
    data_parallel: DataParallel = "ddp"
    distributed_error: Exception | None = None
    grad_norm: Callable[[], float | None] | None = None
    plain_save: PlainForm | None = None

    def __post_init__(self) -> None:
        if self.data_parallel not in ("ddp", "own", "any"):
            raise ValueError(f"data_parallel must be one of 'ddp', 'own', 'any'; got {self.data_parallel!r}")
        if self.distributed_error is not None and not isinstance(self.distributed_error, Exception):
            raise TypeError(f"distributed_error must be an Exception; got {type(self.distributed_error).__name__}")
