"""Every change ``attach()`` makes to a ``Trainer`` or its ``Accelerator``, in one module.

Each function changes one attribute of one *instance* (never a class, never a library module), is idempotent where
it can be called once per method, and says why no public hook suffices. The plan fields they serve are in
:class:`hf_memopt.core.plan.MethodPlan`. Two more instance attributes are wrapped outside this module, by the tools
that own them: ``save_model`` / ``create_model_card`` (the model card, :mod:`hf_memopt.tools.modelcard`) and
``_save_checkpoint`` / the model's ``save_pretrained`` (plain user saves, :mod:`hf_memopt.shared.saving`). Where a
replacement relies on another library's private name or signature, it goes through :mod:`hf_memopt.core.compat`.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from transformers import TrainerCallback

from hf_memopt.core import compat
from hf_memopt.shared.parallel import broadcast_from_rank0_, is_distributed

if TYPE_CHECKING:
    from transformers import Trainer

    from hf_memopt.core.plan import TrainingStepWrapper

__all__ = [
    "GradNormCallback",
    "ModelOptimizerFactory",
    "add_optimizer_created_hook",
    "keep_model_out_of_ddp",
    "put_callbacks_first",
    "set_optimizer_factory",
    "wrap_training_step",
]

logger = logging.getLogger(__name__)

_STOCK_OPTIMS = {"adamw_torch", "adamw_torch_fused"}
_CREATED_HOOKS = "_hf_memopt_optimizer_created_hooks"  # on the trainer: the plans' on_optimizer_created, in order


class ModelOptimizerFactory:
    """Adapter for the factory form of ``Trainer(optimizer_cls_and_kwargs=...)`` and of an ``optim`` handler's result.

    transformers calls ``factory()(model, **kwargs)``; the zero-argument call returns the model-taking builder.
    """

    def __init__(self, build: Callable[[nn.Module], torch.optim.Optimizer]):
        self._build = build

    def __call__(self) -> Callable[..., torch.optim.Optimizer]:
        return lambda model, **_: self._build(model)


def check_optimizer_can_be_set(trainer: Trainer) -> None:
    """Refuse a trainer that already has an optimizer: one of the two would otherwise be silently ignored."""
    if trainer.optimizer is not None:
        raise ValueError(
            "this trainer already has an optimizer (passed through `optimizers=` or created by a previous train()); "
            "create the Trainer without one before attach()"
        )
    if trainer.optimizer_cls_and_kwargs is not None:
        raise ValueError(
            "this trainer was given `optimizer_cls_and_kwargs`; remove it, attach() supplies the optimizer"
        )


def set_optimizer_factory(trainer: Trainer, build: Callable[[nn.Module], torch.optim.Optimizer]) -> None:
    """Make ``trainer`` build its optimizer with ``build(model)`` when training starts.

    Sets ``trainer.optimizer_cls_and_kwargs``, a public constructor argument, in its factory form (transformers 5.x
    calls ``factory()(model, **kwargs)`` inside ``create_optimizer``), so the optimizer is built from the model the
    Trainer actually trains. It is set after construction because ``attach()`` runs on a built Trainer.
    """
    check_optimizer_can_be_set(trainer)
    optim = str(getattr(trainer.args.optim, "value", trainer.args.optim))
    if optim not in _STOCK_OPTIMS:
        logger.warning("hf_memopt supplies the optimizer: TrainingArguments.optim=%r is not used", optim)
    trainer.optimizer_cls_and_kwargs = (ModelOptimizerFactory(build), {})


def add_optimizer_created_hook(trainer: Trainer, hook: Callable[[torch.optim.Optimizer], None]) -> None:
    """Call ``hook(optimizer)`` on every optimizer ``trainer.create_optimizer`` returns, hooks in attach order.

    # NOTE: ``trainer.create_optimizer`` is wrapped on this instance (once; later hooks join a list). No callback
    # event sees the optimizer before ``_load_optimizer_and_scheduler`` loads a checkpoint into it (``on_train_begin``
    # comes after), so state a hook adds that travels in the optimizer's ``state_dict`` (LoQT's skip counter) would
    # miss the checkpoint's values. Subclasses' own ``create_optimizer`` (TRL's) stays in place under the wrapper.
    """
    hooks: list[Callable[[torch.optim.Optimizer], None]] | None = trainer.__dict__.get(_CREATED_HOOKS)
    if hooks is None:
        hooks = trainer.__dict__[_CREATED_HOOKS] = []
        create_optimizer = trainer.create_optimizer

        @functools.wraps(create_optimizer)
        def create(*args: Any, **kwargs: Any) -> torch.optim.Optimizer:
            optimizer = create_optimizer(*args, **kwargs)
            for h in hooks:
                h(optimizer)
            return optimizer

        trainer.create_optimizer = create
    hooks.append(hook)


def wrap_training_step(trainer: Trainer, wrap: TrainingStepWrapper) -> None:
    """Replace ``trainer.training_step`` by ``wrap(trainer.training_step)`` (so several wrappers compose in order).

    # NOTE: replaced on this instance; the bound original (a subclass's own, TRL's included) is handed to ``wrap``.
    # No callback suffices for what the methods do here: ``on_pre_optimizer_step`` runs after the Trainer clipped
    # the gradients, so BlockLLM's own all-reduce, which the clipping must see, happens at the end of the update's
    # last micro-batch; callbacks see the loss only on logging steps, and BlockLLM's stall test needs every one; ZO
    # has no backward at all, so its step is two forwards instead of the stock forward + backward.
    """
    trainer.training_step = wrap(trainer.training_step)


def keep_model_out_of_ddp(trainer: Trainer) -> None:
    """Make ``trainer`` prepare its model without wrapping it in DDP (mixed precision and compilation still apply),
    and start every rank from rank 0's parameters and buffers there, as DDP's wrap would. Idempotent.

    # NOTE: the Trainer offers no switch for this; accelerate's ``prepare_model(evaluation_mode=True)`` is the path
    # transformers itself takes for models that own their gradient reduction (``is_distributed_loading_by_transformers``
    # in ``Trainer._prepare_for_training``). The accelerator's ``prepare_model`` is replaced on this instance only,
    # through :func:`hf_memopt.core.compat.wrap_prepare_model`, which checks it still takes ``evaluation_mode``.
    # DDP cannot instead be told to ignore every trainable parameter (``_set_params_and_buffers_to_ignore_for_model``):
    # its constructor then raises "DistributedDataParallel is not needed when a module doesn't have any parameter that
    # requires a gradient" (torch 2.13).
    """
    accelerator = trainer.accelerator
    if getattr(accelerator.prepare_model, "hf_memopt_keeps_out_of_ddp", False):
        return

    def without_ddp(prepare_model):
        def prepare_without_ddp(model, device_placement=None, evaluation_mode=False):
            model = prepare_model(model, device_placement=device_placement, evaluation_mode=True)
            if is_distributed():
                broadcast_from_rank0_([*model.parameters(), *model.buffers()])
            return model

        prepare_without_ddp.hf_memopt_keeps_out_of_ddp = True
        return prepare_without_ddp

    compat.wrap_prepare_model(accelerator, without_ddp)


def put_callbacks_first(trainer: Trainer, callbacks: list[TrainerCallback]) -> None:
    """Put ``callbacks`` (in this order) before the trainer's other callbacks; a callback already there is moved.

    # NOTE: ``Trainer.add_callback`` only appends; ``CallbackHandler.call_event`` calls ``on_log`` on the callbacks
    # in list order with one ``logs`` dict, and the printer and reporting integrations write it when they see it, so
    # a callback that adds or corrects a logged value must come before them: it is inserted into the public
    # ``trainer.callback_handler.callbacks`` list.
    """
    existing = trainer.callback_handler.callbacks
    for callback in reversed(callbacks):
        if any(cb is callback for cb in existing):
            existing.remove(callback)
        existing.insert(0, callback)


class GradNormCallback(TrainerCallback):
    """Logs the true ``grad_norm`` of methods whose updates happen inside backward or without one.

    Uses ``on_log``: the Trainer computes ``grad_norm`` from ``.grad`` after backward, when layer-wise hooks have
    already freed every gradient (and a zeroth-order step never formed one), so it would log 0. ``source()`` returns
    the norm the method measured, or None when it is unknown (compressed gradients accumulated over micro-batches;
    no gradient at all): the value is then removed rather than shown as 0. Put first among the callbacks, so the
    printer and loggers see the corrected value; the Trainer's copy in ``state.log_history`` is corrected too.

    Args:
        source: returns the true norm of the last update's gradient, or None.
    """

    def __init__(self, source: Callable[[], float | None]):
        self.source = source

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None or "grad_norm" not in logs:
            return
        norm = self.source()
        last = state.log_history[-1] if state.log_history else {}
        if norm is None:
            logs.pop("grad_norm")
            last.pop("grad_norm", None)
        else:
            logs["grad_norm"] = last["grad_norm"] = norm
