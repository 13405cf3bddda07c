"""Build BlockLLM from a config: blocks, the optimizer, and the Trainer wiring (loss capture and re-selection)."""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn
from transformers import Trainer, TrainerCallback

from hf_memopt.blockllm.blocks import build_blocks, selection_budget
from hf_memopt.blockllm.config import BlockLLMConfig
from hf_memopt.blockllm.optimizer import (
    BlockLLMAdamW,
    BlockLLMAdamW8bit,
    _BlockLLMOptimizer,
    unwrap_blockllm_optimizer,
)
from hf_memopt.core.attach import no_decay_parameter_names
from hf_memopt.core.plan import MethodPlan, OptimizerHyperparameters
from hf_memopt.shared.faults import out_of_memory_advice

__all__ = ["BlockLLMCallback", "create_blockllm_optimizer", "plan_blockllm", "prepare_blockllm_model"]

logger = logging.getLogger(__name__)
_CACHE = "_hf_memopt_blockllm_blocks"


def prepare_blockllm_model(model: nn.Module, config: BlockLLMConfig):
    """Find the blocks and freeze what can never be selected (embeddings / head unless ``train_embeddings``).

    Returns ``(blocks, budget, trainable)`` (``trainable``: the parameters trainable before freezing); raises
    ``ValueError`` when no selection can fit the budget. Idempotent: the blocks and the trainable count are remembered
    on the model, so a later call (the Trainer builds the optimizer after ``attach``, when embeddings and unselected
    blocks may already be frozen) sees the same blocks and budget.
    """
    key = (config.block_granularity, config.train_embeddings)
    cached = model.__dict__.get(_CACHE)
    fresh = cached is None or cached[0] != key
    if fresh:
        cached = model.__dict__[_CACHE] = (key, *build_blocks(model, *key))
    _, blocks, trainable = cached
    if not blocks:
        raise ValueError("BlockLLM selection would be empty: the model has no selectable trainable parameter")
    budget = selection_budget(config.sparsity, blocks)
    smallest = min(b.numel for b in blocks)
    if budget < smallest:
        raise ValueError(
            f"BlockLLM selection would be empty: sparsity={config.sparsity} leaves a budget of {budget} of "
            f"{sum(b.numel for b in blocks)} selectable parameters, and the smallest block holds {smallest}; lower "
            "sparsity or use block_granularity='parameter'"
        )
    if fresh:
        _warn_unselectable_blocks(blocks, budget, config.sparsity)
    in_blocks = {id(p) for b in blocks for p in b.params}
    for p in model.parameters():
        if id(p) not in in_blocks:
            p.requires_grad_(False)
    return blocks, budget, trainable


def _warn_unselectable_blocks(blocks: list, budget: int, sparsity: float) -> None:
    """Say once which blocks are larger than the whole budget: no selection can ever hold them (SelectParam skips a
    block that overflows the budget), so they stay frozen for the whole run although they count as selectable."""
    too_large = [b for b in blocks if b.numel > budget]
    if not too_large:
        return
    share = sum(b.numel for b in too_large) / sum(b.numel for b in blocks)
    names = ", ".join(f"{b.name} ({b.numel})" for b in too_large[:5]) + (" ..." if len(too_large) > 5 else "")
    logger.warning(
        "BlockLLM: %d of %d blocks hold more parameters than the budget of %d (sparsity=%s) and can never be "
        "selected, so they stay frozen: %s; %.1f%% of the selectable parameters. Lower sparsity to train them",
        len(too_large), len(blocks), budget, sparsity, names, 100 * share,
    )  # fmt: skip


def create_blockllm_optimizer(
    model: nn.Module,
    config: BlockLLMConfig,
    hparams: OptimizerHyperparameters,
    *,
    no_decay_names: set[str] | None = None,
) -> _BlockLLMOptimizer:
    """The BlockLLM optimizer over every selectable parameter of ``model`` (biases and norms without decay).

    Nothing is selected yet: ``BlockLLMCallback`` starts with a scoring step (``selection="full_backward"``) or a
    random selection (``"stored_norms"``); in a custom loop call ``begin_scoring()`` / ``finish_scoring()`` around a
    backward pass, or ``select_at_random(seed)``, yourself.
    """
    blocks, budget, trainable = prepare_blockllm_model(model, config)
    no_decay_names = no_decay_parameter_names(model) if no_decay_names is None else no_decay_names
    decay, no_decay = [], []
    for block in blocks:
        for name, p in zip(block.names, block.params):
            (no_decay if name in no_decay_names else decay).append(p)
    groups = [g for g in ({"params": decay}, {"params": no_decay, "weight_decay": 0.0}) if g["params"]]
    kwargs: dict[str, Any] = dict(
        lr=hparams.lr,
        betas=hparams.betas,
        eps=hparams.eps,
        weight_decay=hparams.weight_decay,
        blocks=blocks,
        budget=budget,
        patience=config.patience,
        mask_fraction=config.mask_fraction,
        visit_penalty=config.visit_penalty,
        selection=config.selection,
        explore_blocks=config.explore_blocks,
        stall_check_interval=config.stall_check_interval,
        trainable_numel=trainable,
        max_consecutive_skips=config.max_consecutive_skips,
    )
    if config.optimizer == "adamw_8bit":
        return BlockLLMAdamW8bit(groups, min_8bit_size=config.min_8bit_size, **kwargs)
    return BlockLLMAdamW(groups, **kwargs)


class BlockLLMCallback(TrainerCallback):
    """Drives selection and re-selection from the Trainer loop.

    Events used (the loop runs backward -> on_pre_optimizer_step -> step -> on_optimizer_step -> scheduler ->
    zero_grad -> on_step_end, then saves checkpoints):

    * ``on_train_begin``: the optimizer exists and a checkpoint, if any, is loaded; a fresh run starts with a scoring
      step (Alg. 1 selects at t = 1) or, with ``selection="stored_norms"``, a random selection seeded with
      ``args.seed`` (no norm is stored yet; the official code shuffles); gradient checkpointing gets input gradients
      (frozen embeddings would otherwise cut the graph of re-entrant checkpointing);
    * ``on_step_end``: gradients are zeroed and the step is complete, so the selection can change before the next
      forward (``end_step``): a scoring step ends with the new selection; otherwise the step's loss feeds the stall
      test, which may make the next step a scoring step or re-select from the stored norms. Running here, before
      ``_maybe_log_save_evaluate``, makes every checkpoint hold the state the next step needs;
    * ``on_log``: adds the selection's share of the selectable parameters (``blockllm_selected_of_selectable``,
      at most ``1 - sparsity``) and of every trainable one (``blockllm_selected_of_trainable``) to training logs;
    * ``on_train_end``: leave only the selected blocks trainable and remove the scoring hooks.

    The step's loss is the sum of ``training_step``'s return values over its micro-batches (what the Trainer logs),
    gathered by :meth:`add_micro_batch_loss`. Those are this rank's losses: under data parallelism the stall test
    reads their mean over the ranks (the Trainer averages the logged loss too, but only on logging steps).
    """

    def __init__(self) -> None:
        self._loss: torch.Tensor | None = None

    def add_micro_batch_loss(self, loss: torch.Tensor) -> None:
        loss = loss.detach().float()
        self._loss = loss if self._loss is None else self._loss + loss

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        opt = unwrap_blockllm_optimizer(optimizer)
        if opt is None:
            return
        if args.gradient_checkpointing and hasattr(model, "enable_input_require_grads"):
            model.disable_input_require_grads()  # public and idempotent: hooks installed before are replaced, not doubled
            model.enable_input_require_grads()
        self._loss = None
        if opt.num_selections == 0 and not opt.scoring:
            if opt.selection == "stored_norms":
                opt.select_at_random(args.seed)
                _log_selection(opt, state.global_step)
            else:
                opt.begin_scoring()
        else:
            opt.apply_selection()

    def on_step_end(self, args, state, control, optimizer=None, **kwargs):
        opt = unwrap_blockllm_optimizer(optimizer)
        if opt is None:
            return
        loss, self._loss = self._loss, None
        if opt.end_step(loss):
            _log_selection(opt, state.global_step)

    def on_log(self, args, state, control, logs=None, optimizer=None, **kwargs):
        opt = unwrap_blockllm_optimizer(optimizer)
        if opt is None or logs is None or "loss" not in logs:
            return
        figures = {
            "blockllm_selected_of_selectable": opt.selected_fraction,
            "blockllm_selected_of_trainable": opt.selected_fraction_of_trainable,
        }
        logs.update(figures)
        if state.log_history and "loss" in state.log_history[-1]:
            state.log_history[-1].update(figures)

    def on_train_end(self, args, state, control, optimizer=None, **kwargs):
        opt = unwrap_blockllm_optimizer(optimizer)
        if opt is not None:
            opt.apply_selection(scoring=False)


def _log_selection(opt: _BlockLLMOptimizer, step: int) -> None:
    logger.info(
        f"BlockLLM step {step}: selection {opt.num_selections} ({opt.selection}) holds {int(opt.selected.sum())} of "
        f"{len(opt.blocks)} blocks, {opt.selected_numel} parameters (budget {opt.budget}): "
        f"{opt.selected_fraction:.4f} of the {opt.selectable_numel} selectable parameters, "
        f"{opt.selected_fraction_of_trainable:.4f} of the {opt.trainable_numel} trainable ones"
    )


def plan_blockllm(trainer: Trainer, config: BlockLLMConfig) -> MethodPlan:
    """Registry planner: freeze the unselectable parameters at ``attach`` (so an impossible budget fails there), build
    the optimizer when training starts, and wrap ``training_step`` to read each micro-batch's loss and, under data
    parallelism, average the gradients after the update's last backward (so the Trainer clips the averaged one).
    DDP fixes its buckets from ``requires_grad`` at wrap time, which every re-selection changes: the optimizer
    averages the selected gradients itself (``data_parallel="own"``, hf_memopt/shared/parallel.py)."""
    if trainer.is_model_parallel:
        raise NotImplementedError("BlockLLM under model-parallel training is not implemented")
    callback = BlockLLMCallback()

    def create(model: nn.Module, hparams: OptimizerHyperparameters, no_decay_names: set[str]) -> _BlockLLMOptimizer:
        return create_blockllm_optimizer(model, config, hparams, no_decay_names=no_decay_names)

    def prepare(model: nn.Module) -> None:
        prepare_blockllm_model(model, config)

    return MethodPlan(
        prepare_model=prepare,
        create_optimizer=create,
        # first in line, so the printer and the loggers see the selection fractions it adds on_log
        first_callbacks=(callback,),
        wrap_training_step=lambda original: _training_step(trainer, callback, original),
        data_parallel="own",
    )


def _training_step(trainer: Trainer, callback: BlockLLMCallback, original_training_step):
    """``training_step`` around the trainer's own: starts an update, adds each micro-batch's loss to the stall test
    (callbacks see the loss only on logging steps), and ends the update's last micro-batch by averaging the gradients
    across ranks and recording their norms, before the Trainer clips them."""
    first_micro_batch = True  # of the current update

    def training_step(*args: Any, **kwargs: Any) -> torch.Tensor:
        nonlocal first_micro_batch
        opt = unwrap_blockllm_optimizer(trainer.optimizer)
        if opt is not None and first_micro_batch:
            opt.begin_update()
        try:
            loss = original_training_step(*args, **kwargs)
        except torch.OutOfMemoryError as err:
            if opt is None or not opt.scoring:
                raise
            # the scoring pass is BlockLLM's memory peak: every block gets a gradient (Sec. 3)
            raise torch.OutOfMemoryError(
                f"BlockLLM: out of memory in the scoring pass of re-selection {opt.num_selections + 1} (update "
                f"{trainer.state.global_step + 1}), which computes the gradient of every block; the last checkpoint "
                "holds a consistent state. BlockLLMConfig(selection='stored_norms') selects without this pass. "
                f"{out_of_memory_advice()}"
            ) from err
        callback.add_micro_batch_loss(loss)
        first_micro_batch = trainer.accelerator.sync_gradients  # the last micro-batch: the next call starts an update
        if opt is not None and first_micro_batch:
            opt.average_gradients()  # before the Trainer's clipping, which sees the gradients next
            opt.record_gradient_norms()  # stored_norms: unclipped, and the exploring gradients leave before the clip
        return loss

    return training_step
