"""``attach(trainer, config)``: the single entry point that installs a method on a ``transformers.Trainer``.

The method's planner (registered in :mod:`hf_memopt.core.registry`) validates the config and returns a
:class:`~hf_memopt.core.plan.MethodPlan`; ``attach()`` alone applies it, and installs the pieces every method shares
once per trainer, whatever the method or combination: the sharding-engine check, the ``skipped_updates`` log
(:class:`~hf_memopt.shared.faults.SkippedUpdatesCallback`), keeping the model out of DDP when a method averages its
own gradients, the true ``grad_norm``, the model card and the memory report.

It works on any ``Trainer`` subclass (TRL's ``SFTTrainer`` included). What it touches on the trainer, all on that
instance only:

* public attributes: ``optimizer_cls_and_kwargs`` (set in its factory form, so the optimizer is built from the model
  the Trainer actually trains) and the ``callback_handler.callbacks`` list (``add_callback``, and inserts at its
  front for callbacks that must see the logs first);
* methods replaced by wrappers, each only when an attached plan needs it, each explained where it is done
  (:mod:`hf_memopt.core.trainer_hooks`): ``training_step`` (BlockLLM, ZO), ``create_optimizer`` (LoQT),
  ``accelerator.prepare_model`` (methods kept out of DDP); and, by the tools that own them, ``save_model`` and
  ``create_model_card`` (the model card, :mod:`hf_memopt.tools.modelcard`), ``_save_checkpoint`` and the model's
  ``save_pretrained`` (plain user saves of LoQT and VeLoRA models, :mod:`hf_memopt.shared.saving`);
* the model, transformed in place by the method (layers replaced or frozen, buffers added).

Methods compose: any number of methods that keep the Trainer's optimizer (VeLoRA, LoQT) plus at most one that
supplies it.
"""

from __future__ import annotations

import logging
from typing import Any

from torch import nn
from transformers import Trainer

from hf_memopt.core.plan import MethodPlan, OptimizerHyperparameters
from hf_memopt.core.registry import METHODS, MethodSpec, attached_configs, method_name_of
from hf_memopt.core.trainer_hooks import (
    GradNormCallback,
    add_optimizer_created_hook,
    check_optimizer_can_be_set,
    keep_model_out_of_ddp,
    put_callbacks_first,
    set_optimizer_factory,
    wrap_training_step,
)
from hf_memopt.shared.faults import install_fault_reporting
from hf_memopt.shared.parallel import check_engine_supported
from hf_memopt.tools.memory import MemoryReportCallback, add_memory_report
from hf_memopt.tools.modelcard import install_model_card

__all__ = [
    "applied_plans",
    "attach",
    "check_data_parallel",
    "no_decay_parameter_names",
    "trainable_parameters",
    "warn_ignored_fp16",
]

logger = logging.getLogger(__name__)

_PLANS = "_hf_memopt_plans"  # on the trainer: (method name, plan) applied so far, in attach order


def applied_plans(trainer: Any) -> list[tuple[str, MethodPlan]]:
    """``(method name, plan)`` of every method ``attach()`` applied to ``trainer``, in attach order."""
    return trainer.__dict__.setdefault(_PLANS, [])


def attach(trainer: Trainer, config: Any) -> Trainer:
    """Install the method configured by ``config`` on ``trainer`` and return the trainer.

    Call it after constructing the trainer and before ``trainer.train()``. ``config`` is an instance of one of the
    registered config classes (see ``hf_memopt.METHODS``). Every check (the config against the model, the
    combination with the methods already attached, the engine, the number of processes) runs before the trainer or
    its model is changed.
    """
    if not isinstance(trainer, Trainer):
        raise TypeError(f"attach() needs a transformers.Trainer (or subclass); got {type(trainer).__name__}")
    spec = METHODS[method_name_of(config)]
    attached = attached_configs(trainer)
    if any(type(c) is type(config) for c in attached):
        raise ValueError(f"{spec.name} is already attached to this trainer")
    if spec.sets_optimizer:
        other = [method_name_of(c) for c in attached if METHODS[method_name_of(c)].sets_optimizer]
        if other:
            raise ValueError(
                f"{spec.name} supplies the optimizer, and {other[0]} already does; attach at most one optimizer method"
            )
        check_optimizer_can_be_set(trainer)
    check_engine_supported(trainer, spec, config)
    plan = spec.planner(trainer, config)
    _check_plan(trainer, spec, plan)
    if not attached:
        warn_ignored_fp16(trainer.args)
    _apply(trainer, spec.name, plan)
    attached.append(config)
    install_model_card(trainer)
    logger.info("hf_memopt: attached %s", spec.name)
    return trainer


def _check_plan(trainer: Trainer, spec: MethodSpec, plan: MethodPlan) -> None:
    """Refuse a plan that contradicts its registration, or that cannot run beside the plans already applied."""
    if not isinstance(plan, MethodPlan):
        raise TypeError(f"the planner of {spec.name} must return a MethodPlan; got {type(plan).__name__}")
    if (plan.create_optimizer is not None) != spec.sets_optimizer:
        raise TypeError(
            f"{spec.name} is registered with sets_optimizer={spec.sets_optimizer}, but its plan "
            f"{'has no' if spec.sets_optimizer else 'has a'} create_optimizer"
        )
    others = applied_plans(trainer)
    if plan.grad_norm is not None:
        measuring = [name for name, p in others if p.grad_norm is not None]
        if measuring:
            raise ValueError(
                f"{spec.name} and {measuring[0]} both update the parameters outside the Trainer's backward + step "
                "(inside backward, or without one); they cannot be combined"
            )
    check_data_parallel(trainer.args, [*others, (spec.name, plan)])


def check_data_parallel(
    args: Any, plans: list[tuple[str, MethodPlan]], *, cannot_keep_out_of_ddp: str | None = None
) -> None:
    """Refuse plans that cannot train together on ``args.world_size`` > 1 processes: a plan's own
    ``distributed_error``, and a method that averages its own gradients (the model kept out of DDP) beside one that
    steps on the gradients DDP averages. ``cannot_keep_out_of_ddp``: the refusal for a caller that cannot keep the
    model out of DDP (the stock ``optim=`` handler, which has no Trainer), raised when a plan needs it.
    """
    if args.world_size <= 1:
        return
    for _, plan in plans:
        if plan.distributed_error is not None:
            raise plan.distributed_error
    own = [name for name, plan in plans if plan.data_parallel == "own"]
    ddp = [name for name, plan in plans if plan.data_parallel == "ddp"]
    if own and ddp:
        raise ValueError(
            f"{ddp[0]} steps on gradients DDP averages, but {own[0]} averages its own and keeps the model out of "
            f"DDP: the two cannot be combined under distributed training (world_size={args.world_size})"
        )
    if own and cannot_keep_out_of_ddp is not None:
        raise ValueError(cannot_keep_out_of_ddp)


def _apply(trainer: Trainer, name: str, plan: MethodPlan) -> None:
    """Apply a checked plan (in :class:`MethodPlan`'s field order), then the shared pieces, once per trainer."""
    if plan.prepare_model is not None:
        plan.prepare_model(trainer.model)
    if plan.create_optimizer is not None:
        create = plan.create_optimizer

        def build(model: nn.Module):
            hparams = OptimizerHyperparameters.from_args(trainer.args)  # read now: later edits of the args count
            return create(model, hparams, no_decay_parameter_names(model, trainer))

        set_optimizer_factory(trainer, build)
    if plan.on_optimizer_created is not None:
        add_optimizer_created_hook(trainer, plan.on_optimizer_created)
    for callback in plan.callbacks:
        trainer.add_callback(callback)
    if plan.first_callbacks:
        put_callbacks_first(trainer, list(plan.first_callbacks))
    if plan.wrap_training_step is not None:
        wrap_training_step(trainer, plan.wrap_training_step)
    if plan.data_parallel == "own" and trainer.args.world_size > 1:
        keep_model_out_of_ddp(trainer)
    if plan.grad_norm is not None:
        put_callbacks_first(trainer, [GradNormCallback(plan.grad_norm)])
    if plan.plain_save is not None:
        from hf_memopt.shared.saving import register_plain_save

        register_plain_save(trainer, trainer.model, plan.plain_save)
    applied_plans(trainer).append((name, plan))
    install_fault_reporting(trainer)
    if any(isinstance(cb, MemoryReportCallback) for cb in trainer.callback_handler.callbacks):
        add_memory_report(trainer)  # its mem/*_mb figures must reach the reporters (they read the logs first)


def warn_ignored_fp16(args: Any) -> bool:
    """Warn that ``fp16=True`` does nothing on CPU; returns whether it did. Called once per trainer: at the first
    ``attach``, by the stock ``optim="galore_*"`` handler, and by the recipe runners for a run with no method.

    transformers accepts ``fp16=True`` on CPU but accelerate then runs without autocast or loss scaling: the weights,
    losses and checkpoints are bit for bit those of float32 training. ``bf16=True`` does run CPU autocast, and
    transformers itself refuses it on a machine without a GPU unless ``use_cpu=True`` is set.
    """
    if args.fp16 and args.device.type == "cpu":
        logger.warning(
            "fp16=True has no effect on CPU (transformers trains in float32 there); for mixed precision on CPU set "
            "bf16=True with use_cpu=True"
        )
        return True
    return False


def trainable_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """``(name, parameter)`` for every trainable parameter, each shared parameter once."""
    seen: set[int] = set()
    named = []
    for name, param in model.named_parameters():
        if param.requires_grad and id(param) not in seen:
            seen.add(id(param))
            named.append((name, param))
    return named


def no_decay_parameter_names(model: nn.Module, trainer: Trainer | None = None) -> set[str]:
    """Names of parameters that get no weight decay: biases and normalisation weights, as the Trainer decides.

    Without a trainer (the stock ``optim=`` path) the Trainer's rule is applied directly; it reads no instance state.
    """
    decay = trainer.get_decay_parameter_names(model) if trainer else Trainer.get_decay_parameter_names(None, model)
    return {n for n, _ in model.named_parameters()} - set(decay)
