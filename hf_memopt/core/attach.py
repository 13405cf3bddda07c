"""``attach(trainer, config)``: the single entry point that installs a method on a ``transformers.Trainer``.

It works on any ``Trainer`` subclass (TRL's ``SFTTrainer`` included) because it only uses public extension points:

* ``trainer.optimizer_cls_and_kwargs`` in its *factory* form (transformers 5.x calls ``factory()(model, **kwargs)``
  inside ``create_optimizer``), so the optimizer is built lazily from the model the Trainer actually trains;
* ``trainer.add_callback`` for anything that reacts to the training loop;
* in-place model transforms done by the method's builder before training starts.

Methods compose: any number of model-transforming methods (VeLoRA) plus at most one that supplies the optimizer.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import Trainer

from hf_memopt.core.registry import METHODS, attached_configs, method_name_of
from hf_memopt.shared.parallel import check_engine_supported
from hf_memopt.tools.memory import MemoryReportCallback, add_memory_report
from hf_memopt.tools.modelcard import install_model_card

__all__ = [
    "OptimizerHyperparameters",
    "attach",
    "install_method_optimizer",
    "install_optimizer_factory",
    "warn_ignored_fp16",
]

logger = logging.getLogger(__name__)

_STOCK_OPTIMS = {"adamw_torch", "adamw_torch_fused"}


def attach(trainer: Trainer, config: Any) -> Trainer:
    """Install the method configured by ``config`` on ``trainer`` and return the trainer.

    Call it after constructing the trainer and before ``trainer.train()``. ``config`` is an instance of one of the
    registered config classes (see ``hf_memopt.METHODS``).
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
    check_engine_supported(trainer, spec, config)
    if not attached:
        warn_ignored_fp16(trainer.args)
    spec.builder(trainer, config)
    if any(isinstance(cb, MemoryReportCallback) for cb in trainer.callback_handler.callbacks):
        add_memory_report(trainer)  # its mem/*_mb figures must reach the reporters (they read the logs first)
    attached.append(config)
    install_model_card(trainer)
    logger.info("hf_memopt: attached %s", spec.name)
    return trainer


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


class _ModelOptimizerFactory:
    """Adapter for the factory form of ``Trainer(optimizer_cls_and_kwargs=...)``.

    transformers calls ``factory()(model, **kwargs)``; the zero-argument call returns the model-taking builder.
    """

    def __init__(self, build: Callable[[nn.Module], torch.optim.Optimizer]):
        self._build = build

    def __call__(self) -> Callable[..., torch.optim.Optimizer]:
        return lambda model, **_: self._build(model)


def install_optimizer_factory(trainer: Trainer, build: Callable[[nn.Module], torch.optim.Optimizer]) -> None:
    """Make ``trainer`` build its optimizer with ``build(model)`` when training starts.

    Raises ``ValueError`` when the user already passed an optimizer (``optimizers=`` or ``optimizer_cls_and_kwargs=``),
    since one of the two would otherwise be silently ignored.
    """
    if trainer.optimizer is not None:
        raise ValueError(
            "this trainer already has an optimizer (passed through `optimizers=` or created by a previous train()); "
            "create the Trainer without one before attach()"
        )
    if trainer.optimizer_cls_and_kwargs is not None:
        raise ValueError("this trainer was given `optimizer_cls_and_kwargs`; remove it, attach() supplies the optimizer")
    optim = str(getattr(trainer.args.optim, "value", trainer.args.optim))
    if optim not in _STOCK_OPTIMS:
        logger.warning("hf_memopt supplies the optimizer: TrainingArguments.optim=%r is not used", optim)
    trainer.optimizer_cls_and_kwargs = (_ModelOptimizerFactory(build), {})


def install_method_optimizer(trainer: Trainer, create: Callable[..., torch.optim.Optimizer], config: Any) -> None:
    """:func:`install_optimizer_factory` for a method's ``create(model, config, hparams, no_decay_names=...)``.

    The hyperparameters are read from ``trainer.args`` when training starts, so later edits of the arguments count.
    """

    def build(model: nn.Module) -> torch.optim.Optimizer:
        hparams = OptimizerHyperparameters.from_args(trainer.args)
        return create(model, config, hparams, no_decay_names=no_decay_parameter_names(model, trainer))

    install_optimizer_factory(trainer, build)


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
