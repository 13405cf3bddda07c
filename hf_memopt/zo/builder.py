"""MeZO / ZO2 on a Trainer: the optimizer, the replaced training step, a small callback, and the plan of all three."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from transformers import Trainer, TrainerCallback

from hf_memopt.core import compat
from hf_memopt.core.attach import no_decay_parameter_names, trainable_parameters
from hf_memopt.core.plan import MethodPlan, OptimizerHyperparameters
from hf_memopt.shared.optim_state import unwrap_optimizer
from hf_memopt.zo.blocks import find_block_list
from hf_memopt.zo.config import ZOConfig
from hf_memopt.zo.offload import ZO2Engine
from hf_memopt.zo.optimizer import ZOSGD
from hf_memopt.zo.perturb import perturb_

__all__ = ["ZOCallback", "create_zo_optimizer", "perturbed_losses", "plan_zo", "zo_engine", "zo_training_step"]

_ENGINE = "hf_memopt_zo_engine"


def create_zo_optimizer(
    model: nn.Module,
    config: ZOConfig,
    hparams: OptimizerHyperparameters,
    *,
    seed: int,
    no_decay_names: set[str] | None = None,
) -> ZOSGD:
    """ZO-SGD over the trainable parameters; biases and normalisation weights get no weight decay."""
    no_decay_names = no_decay_parameter_names(model) if no_decay_names is None else no_decay_names
    weight_decay = hparams.weight_decay if config.weight_decay is None else config.weight_decay
    decay, plain = [], []
    for name, p in trainable_parameters(model):
        (plain if name in no_decay_names else decay).append(p)
    groups = [{"params": ps, "weight_decay": wd} for ps, wd in ((decay, weight_decay), (plain, 0.0)) if ps]
    return ZOSGD(
        groups, lr=hparams.lr, weight_decay=weight_decay, n_samples=config.n_samples, seed=seed,
        max_consecutive_skips=config.max_consecutive_skips,
    )  # fmt: skip


def _unwrap_optimizer(optimizer: Any) -> ZOSGD:
    optimizer = unwrap_optimizer(optimizer)
    if not isinstance(optimizer, ZOSGD):
        raise RuntimeError(f"the ZO training step needs the ZOSGD optimizer attach() installs; got {type(optimizer)}")
    return optimizer


@contextmanager
def _inference_forward(model: nn.Module) -> Iterator[None]:
    """Dropout off (MeZO runs both forwards in eval mode), no autograd graph, no KV cache."""
    was_training = model.training
    configs = [m.config for m in model.modules() if getattr(getattr(m, "config", None), "use_cache", None)]
    model.eval()
    for c in configs:
        c.use_cache = False
    try:
        with torch.no_grad():
            yield
    finally:
        for c in configs:
            c.use_cache = True
        model.train(was_training)


def perturbed_losses(
    optimizer: ZOSGD, engine: ZO2Engine | None, loss_fn: Callable[[], torch.Tensor], seed: int, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """L(theta + eps z) and L(theta - eps z) for the noise z of ``seed`` (MeZO, Alg. 1), theta restored afterwards:
    by the ZO2 engine when blocks are offloaded, else in place (+eps z, -2 eps z, +eps z, regenerating z each time)."""
    if engine is not None:
        return engine.perturbed_losses(loss_fn, seed)
    params = optimizer.trainable()
    perturb_(params, seed, eps)
    loss_plus = loss_fn()
    perturb_(params, seed, -2 * eps)
    loss_minus = loss_fn()
    perturb_(params, seed, eps)
    return loss_plus, loss_minus


def zo_training_step(
    trainer: Trainer,
    model: nn.Module,
    inputs: dict[str, Any],
    num_items_in_batch: torch.Tensor | int | None = None,
    *,
    config: ZOConfig,
    engine: ZO2Engine | None = None,
) -> torch.Tensor:
    """Replaces ``Trainer.training_step``: two perturbed forwards per SPSA sample, no backward.

    Each micro-batch adds its projected gradients to the optimizer's accumulators; the loss of a micro-batch is
    scaled for gradient accumulation exactly as the stock step scales it before backward, so the accumulated
    projected gradient is that of the whole batch under the same z. Returns the mean of L+ and L- (a second-order
    estimate of L(theta)) for logging.
    """
    optimizer = _unwrap_optimizer(trainer.optimizer)
    inputs = compat.prepare_inputs(trainer, inputs)
    scaled = getattr(trainer, "loss_is_scaled_for_ga", None)
    if scaled is None:
        scaled = (trainer.model_accepts_loss_kwargs and num_items_in_batch is not None) or (
            trainer.compute_loss_func is not None
        )

    def loss_fn() -> torch.Tensor:
        with trainer.compute_loss_context_manager():
            loss = trainer.compute_loss(model, inputs, num_items_in_batch=num_items_in_batch)
        if trainer.args.n_gpu > 1:
            loss = loss.mean()
        if not scaled:
            loss = loss / trainer.current_gradient_accumulation_steps
        return loss.detach()

    eps = config.eps
    total = torch.zeros((), dtype=torch.float64)
    with _inference_forward(model):
        for k in range(optimizer.n_samples):
            loss_plus, loss_minus = perturbed_losses(optimizer, engine, loss_fn, optimizer.sample_seed(k), eps)
            lp, lm = float(loss_plus), float(loss_minus)
            optimizer.accumulate(k, (lp - lm) / (2 * eps))
            total += (lp + lm) / 2
    return (total / optimizer.n_samples).to(torch.float32).to(trainer.args.device)


class ZOCallback(TrainerCallback):
    """Keeps the stock loop honest about a gradient-free method.

    * ``on_train_begin``: puts offloaded blocks back in CPU memory if the Trainer moved the model afterwards.
    * ``on_step_end`` (last step) and ``on_train_end``: applies the queued block updates so the model holds the
      final weights when training returns (saves flush through a ``state_dict`` hook on their own).
    * ``on_log``: adds the mean absolute projected gradient of the last step, ``zo_projected_grad``, in place of
      the Trainer's ``grad_norm`` (the norm of absent gradients, 0), which ``attach()`` removes (the plan's
      ``grad_norm`` source says it is unknown).
    """

    def __init__(self, engine: ZO2Engine | None):
        self.engine = engine

    def on_train_begin(self, args, state, control, **kwargs):
        if self.engine is not None:
            self.engine.ensure_offloaded()

    def on_step_end(self, args, state, control, **kwargs):
        if self.engine is not None and control.should_training_stop:
            self.engine.flush()

    def on_train_end(self, args, state, control, **kwargs):
        if self.engine is not None:
            self.engine.flush()

    def on_log(self, args, state, control, logs=None, optimizer=None, **kwargs):
        if logs is None or optimizer is None or "loss" not in logs:
            return
        try:
            zo = _unwrap_optimizer(optimizer)
        except RuntimeError:
            return
        last = state.log_history[-1] if state.log_history else {}
        if zo.last_projected_grads:
            value = sum(abs(g) for g in zo.last_projected_grads) / len(zo.last_projected_grads)
            logs["zo_projected_grad"] = last["zo_projected_grad"] = value


def zo_engine(trainer: Trainer) -> ZO2Engine | None:
    """The ZO2 offload engine attached to ``trainer`` (``None`` without offloading)."""
    return trainer.__dict__.get(_ENGINE)


def plan_zo(trainer: Trainer, config: ZOConfig) -> MethodPlan:
    """Registry planner: supply ZO-SGD, replace the training step (two forwards, no backward), and set up offloading
    if asked. There are no gradients for DDP to average (the ranks average their projected-gradient scalars), so the
    model stays out of DDP, whose wrap would only allocate its gradient buckets."""
    args = trainer.args
    if config.offload == "cpu":
        find_block_list(trainer.model, config.blocks_attr)  # refused at attach, before the model changes
    seed = args.seed if config.seed is None else config.seed
    callback = ZOCallback(None)  # its engine is set by prepare()

    def prepare(model: nn.Module) -> None:
        engine = None
        if config.offload == "cpu":
            _, blocks = find_block_list(model, config.blocks_attr)
            engine = ZO2Engine(
                model, blocks, eps=config.eps, device=args.device, offload_dtype=config.offload_dtype,
                overlap=config.overlap,
            )  # fmt: skip
        trainer.__dict__[_ENGINE] = callback.engine = engine

    def create(model: nn.Module, hparams: OptimizerHyperparameters, no_decay_names: set[str]) -> ZOSGD:
        optimizer = create_zo_optimizer(model, config, hparams, seed=seed, no_decay_names=no_decay_names)
        if zo_engine(trainer) is not None:
            zo_engine(trainer).bind(optimizer)
        return optimizer

    def wrap_training_step(original):  # replaced, not wrapped: the stock step's backward is what ZO does without
        def training_step(model: nn.Module, inputs: dict[str, Any], num_items_in_batch=None) -> torch.Tensor:
            return zo_training_step(trainer, model, inputs, num_items_in_batch, config=config, engine=callback.engine)

        return training_step

    distributed_error = None
    if config.offload == "cpu":
        distributed_error = NotImplementedError(
            "ZO2 offloading (offload='cpu') under distributed training is not implemented: the offloaded blocks live "
            "in CPU memory, which the initial broadcast from rank 0 would need a CPU (gloo) process group for. Use "
            "offload=None with DDP"
        )
    return MethodPlan(
        prepare_model=prepare,
        create_optimizer=create,
        # first in line, so the printer and loggers see the projected gradient
        first_callbacks=(callback,),
        wrap_training_step=wrap_training_step,
        data_parallel="own",
        distributed_error=distributed_error,
        grad_norm=lambda: None,  # no gradient is formed: the Trainer's grad_norm (0) is removed
    )
