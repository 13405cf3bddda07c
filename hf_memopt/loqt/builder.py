"""Install LoQT on a Trainer: the model transform, the merge schedule callback, and plain-model saving.

Saving: the model's ``state_dict`` is always LoQT's true state (quantized weights, P, B, merge count), so a Trainer
checkpoint (``_save_checkpoint`` -> ``save_model`` -> ``save_pretrained``, safetensors) resumes exactly through the
Trainer's own ``load_state_dict``. Everything a *user* saves (``trainer.save_model``, ``model.save_pretrained``,
``push_to_hub``) is a plain Hugging Face model instead: the LoQT layers are swapped for ``nn.Linear`` layers holding
W_q + s P B, dequantized to the model's dtype, for the duration of the save (the plain form declared in the plan, ``MethodPlan.plain_save``, registered by ``attach()`` with
:func:`hf_memopt.shared.saving.register_plain_save`, shared with VeLoRA so both apply when the two are attached).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import torch
from torch import nn
from transformers import PreTrainedModel, Trainer, TrainerCallback

from hf_memopt.core import compat
from hf_memopt.core.plan import MethodPlan
from hf_memopt.loqt.config import LoQTConfig
from hf_memopt.loqt.layer import LoQTLinear
from hf_memopt.shared.faults import all_finite, install_skip_counter, out_of_memory_advice, skip_counter_of
from hf_memopt.shared.layerwise import OptimizerStepRule, PerParameterUpdates
from hf_memopt.shared.modules import rewritten_by
from hf_memopt.shared.optim_state import unwrap_optimizer
from hf_memopt.shared.parallel import broadcast_from_rank0_, is_distributed
from hf_memopt.shared.projector import projection_sides
from hf_memopt.shared.targeting import HEAD_NAMES, match_target_modules, refuse_peft_model

__all__ = [
    "LoQTCallback",
    "convert_to_loqt",
    "loqt_layers",
    "loqt_target_modules",
    "plain_linear_modules",
    "plan_loqt",
    "save_plain_pretrained",
]

logger = logging.getLogger(__name__)
_OWN_COUNTER = "_loqt_skip_counter"  # set when LoQT, not the optimizer, checks the gradients


def loqt_target_modules(model: nn.Module, config: LoQTConfig) -> dict[str, nn.Linear]:
    """``{name: nn.Linear}`` that LoQT replaces; validates rank against every shape and refuses shared weights."""
    refuse_peft_model(
        model,
        "LoQT",
        "LoQT trains its own low-rank factors on a quantized copy of each weight, so it replaces LoRA rather than "
        "stacking on it. Attach LoQTConfig to the plain model (before get_peft_model), or keep peft and use QLoRA "
        "(a bitsandbytes 4-bit base model with a LoraConfig)",
    )
    modules = match_target_modules(model, config.target_modules, allowed_types=(nn.Linear,))
    owners: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        weight = getattr(module, "weight", None)
        if isinstance(weight, torch.Tensor):
            owners.setdefault(id(weight), []).append(name)
    for name, module in modules.items():
        if type(module) is not nn.Linear:
            raise ValueError(f"target_modules: {name} is a {type(module).__name__}; LoQT replaces plain nn.Linear only")
        if len(set(owners.get(id(module.weight), []))) > 1:
            raise ValueError(
                f"target_modules: {name}.weight is shared with {owners[id(module.weight)]} (tied weights); "
                "LoQT cannot quantize a tied weight, leave this module out"
            )
        if config.rank > min(module.weight.shape):
            raise ValueError(
                f"rank must be in [1, {min(module.weight.shape)}] for {name}.weight of shape "
                f"{tuple(module.weight.shape)}; got {config.rank}. "
                "Lower rank or leave this module out of target_modules"
            )
    return modules


def convert_to_loqt(model: nn.Module, config: LoQTConfig) -> dict[str, LoQTLinear]:
    """Replace the targeted ``nn.Linear`` layers of ``model`` in place; returns ``{name: LoQTLinear}``."""
    targets = loqt_target_modules(model, config)
    layers: dict[str, LoQTLinear] = {}
    for index, (name, module) in enumerate(targets.items()):
        owner = rewritten_by(module)
        if owner is not None:
            raise ValueError(
                f"target_modules: {name} is already rewritten by {owner}; LoQT would replace it and drop that. "
                "Leave it out of one of the two methods' target_modules"
            )
        use_left, _ = projection_sides(config.proj_type, module.weight.shape)
        layer = LoQTLinear(
            module,
            rank=config.rank,
            scale=config.scale,
            side="left" if use_left else "right",
            quant=config.quant,
            quantize_projection=config.quantize_projection,
            quant_block_size=config.quant_block_size,
            init_weight=config.init_weight,
            dequantize_chunk_elements=None if config.dequantize_chunk_mib is None
            else max(1, int(config.dequantize_chunk_mib * 2**20) // 4),  # float32 elements
            name=name,
        )
        layer._svd_options = {
            "method": config.svd_method,
            "iterations": config.svd_iterations,
            "seed": config.seed * 1_000_003 + 1009 * index,
        }
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, layer)
        layers[name] = layer
    if config.train_only_factors:
        _train_only_factors_and_head(model, layers)
    return layers


def _train_only_factors_and_head(model: nn.Module, layers: dict[str, LoQTLinear]) -> None:
    """Freeze every parameter but the B factors and the task head's (``LoQTConfig.train_only_factors``)."""
    base = next((m for m in model.modules() if isinstance(m, PreTrainedModel)), model)
    heads = [h for h in (getattr(base, name, None) for name in HEAD_NAMES) if isinstance(h, nn.Module)]
    kept = {id(layer.B) for layer in layers.values()} | {id(p) for head in heads for p in head.parameters()}
    for param in model.parameters():
        if id(param) not in kept:
            param.requires_grad_(False)


def loqt_layers(model: nn.Module) -> dict[str, LoQTLinear]:
    """``{name: LoQTLinear}`` of a converted model."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LoQTLinear)}


@contextlib.contextmanager
def plain_linear_modules(model: nn.Module) -> Iterator[nn.Module]:
    """Temporarily put back ``nn.Linear`` layers holding W_q + s P B (in the original dtype) for every LoQT layer."""
    swapped: list[tuple[nn.Module, str, LoQTLinear]] = []
    try:
        for name, layer in list(loqt_layers(model).items()):
            linear = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta")
            linear.weight = nn.Parameter(layer.effective_weight().to(layer.weight_dtype), requires_grad=False)
            if layer.bias is not None:
                linear.bias = layer.bias
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, linear)
            swapped.append((parent, child, layer))
        yield model
    finally:
        for parent, child, layer in swapped:
            setattr(parent, child, layer)


def save_plain_pretrained(model: nn.Module, save_directory, *args, **kwargs):
    """``model.save_pretrained`` of the plain merged model (what users get from ``save_model``)."""
    if kwargs.get("state_dict") is not None:
        raise ValueError("a LoQT model saves its merged weights itself; do not pass state_dict to save_pretrained")
    kwargs.pop("state_dict", None)
    original = type(model).save_pretrained
    with plain_linear_modules(model):
        return original(model, save_directory, *args, **kwargs)


def _plain_form(model: nn.Module, save_kwargs: dict) -> contextlib.AbstractContextManager:
    """LoQT's plain form for :func:`~hf_memopt.shared.saving.register_plain_save`: merged ``nn.Linear`` layers."""
    if save_kwargs.get("state_dict") is not None:
        raise ValueError("a LoQT model saves its merged weights itself; do not pass state_dict to save_pretrained")
    save_kwargs.pop("state_dict", None)
    return plain_linear_modules(model)


class LoQTCallback(TrainerCallback):
    """Runs LoQT's merge schedule inside the stock training loop.

    * ``on_step_begin`` (start of each accumulation window, before its first forward): on a merge update, every LoQT
      layer starts collecting its weight gradient (and B is held out of the update, as its gradient is in the basis
      being replaced). The schedule is a function of ``state.global_step`` (completed optimizer updates), so gradient
      accumulation is respected and a resumed run continues it without extra state.
    * ``on_optimizer_step`` (after ``optimizer.step()``, which updated every other parameter and skipped B): each layer
      merges W <- Q(W_q + s P B), takes its new P, sets B (zero or error compensation); B's optimizer state is dropped
      (``optimizer_state_on_merge="reset"``) or kept.
    * ``on_train_begin``: drops the full-precision copies kept for the initialisation when a checkpoint was loaded.
    * ``on_pre_optimizer_step`` (faults, ``hf_memopt.shared.faults``): when a gradient is non-finite (B's, another trained
      parameter's, or a layer's collected weight gradient) the update is skipped whole: every gradient is dropped, so
      the stock optimizer leaves parameters and moments alone, and a merge due at this update is not done (W_q and P
      never see the non-finite values) but retried at the next update. A retry pending across a checkpoint is not
      saved: the resumed run merges at the next scheduled update instead.
    * ``layerwise=True``: the parameters were already updated inside backward (``self.layerwise``, installed when the
      Trainer creates its optimizer), so ``on_pre_optimizer_step`` only ends the update there: the update counts as
      skipped when a hook saw a non-finite gradient (that parameter was left alone; the others, updated before it
      was seen, keep their update) or a layer collected one, and the merge then waits as above. The Trainer's own
      ``optimizer.step()`` finds no gradient and changes nothing; its LR scheduler steps as usual.
    """

    def __init__(self, config: LoQTConfig, layers: dict[str, LoQTLinear]):
        self.config = config
        self.layers = layers
        self.collecting = False
        self.merges_done = 0
        self.merge_pending = False
        self.layerwise: PerParameterUpdates | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        for layer in self.layers.values():
            layer._pending()
        if is_distributed():
            _broadcast_frozen_state(self.layers)

    def on_step_begin(self, args, state, control, **kwargs):
        uninitialized = any(not layer.initialized for layer in self.layers.values())
        self.collecting = uninitialized or self.merge_pending or self.config.is_merge_step(state.global_step)
        for layer in self.layers.values():
            layer.collecting = self.collecting

    def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        if self.layerwise is not None:
            self.layerwise.finish_step(finite=not self._collected_nonfinite())
            return
        optimizer = unwrap_optimizer(optimizer)
        counter = getattr(optimizer, _OWN_COUNTER, None)
        if counter is None:  # an hf_memopt optimizer checks its own gradients
            return
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        finite = all_finite(p.grad for p in params) and not self._collected_nonfinite()
        if counter.record(finite, "LoQT"):
            for p in params:
                p.grad = None  # torch optimizers leave a parameter without a gradient (and its state) untouched

    def _collected_nonfinite(self) -> bool:
        return any(layer.gradient_nonfinite for layer in self.layers.values())

    def on_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        if not self.collecting:
            return
        optimizer = unwrap_optimizer(optimizer)
        self.collecting = False
        counter = skip_counter_of(optimizer)
        if self._collected_nonfinite() or (counter is not None and counter.last_skipped):
            for layer in self.layers.values():
                layer.discard_collected()
                layer.collecting = False
            self.merge_pending = True
            logger.warning("LoQT: merge of update %d postponed: non-finite gradient", state.global_step + 1)
            return
        self._merge_all(optimizer, state.global_step + 1)
        self.merge_pending = False
        self.merges_done += 1
        logger.info("LoQT: merged %d layers at update %d", len(self.layers), state.global_step + 1)

    def _merge_all(self, optimizer, update: int) -> None:
        """Merge layer by layer; each merge is all or nothing, so an error leaves a model that computes the same
        function (merged layers hold W_q + s P B in W_q, the others keep W_q, P, B) and names what to do."""
        merged: list[str] = []
        for name, layer in self.layers.items():
            try:
                layer.merge(self.config.error_compensation_steps)
            except torch.OutOfMemoryError as err:
                raise torch.OutOfMemoryError(
                    f"LoQT: out of memory merging layer {name} at update {update}; {len(merged)} of "
                    f"{len(self.layers)} layers were merged before it, {name} and the later ones are unchanged (every "
                    f"layer still computes W_q + s P B). {out_of_memory_advice()}"
                ) from err
            merged.append(name)
            layer.collecting = False
            if self.config.optimizer_state_on_merge == "reset" and optimizer is not None:
                optimizer.state.pop(layer.B, None)


def _ddp_finds_no_unused_parameters(trainer: Trainer) -> ValueError | None:
    """DDP must expect missing gradients: on a merge update B gets none (its update would be in the old basis)."""
    handler = trainer.accelerator.ddp_handler  # None: DDP's own default, find_unused_parameters=False
    if handler is None or not handler.find_unused_parameters:
        return ValueError(
            "LoQT under distributed training needs ddp_find_unused_parameters=True (the Trainer's default without "
            "activation checkpointing): B gets no gradient on merge updates, and DDP would wait for it"
        )
    return None


def _keep_frozen_buffers_out_of_ddp(model: nn.Module, layers: dict[str, LoQTLinear]) -> None:
    """Tell DDP not to broadcast W_q, P and their tables at every forward (``broadcast_buffers``): every rank computes
    the same merges from the same averaged gradients, so after :func:`_broadcast_frozen_state` they stay equal."""
    names = [f"{name}.{buffer}" for name, layer in layers.items() for buffer, _ in layer.named_buffers(recurse=False)]
    compat.ignore_in_ddp(model, names)


def _broadcast_frozen_state(layers: dict[str, LoQTLinear]) -> None:
    """Start every rank from rank 0's frozen weights, projections and the full-precision W kept for initialisation."""
    broadcast_from_rank0_(layer_buffer for layer in layers.values() for layer_buffer in layer.buffers(recurse=False))


def _on_optimizer_created(config: LoQTConfig, callback: LoQTCallback):
    """The plan's ``on_optimizer_created``: give the optimizer the Trainer creates a skip counter (and, with
    ``layerwise=True``, the per-parameter hooks), before a checkpoint is loaded into it.

    LoQT trains B with the Trainer's own optimizer; the counter travels in its ``state_dict``, so it must exist
    before ``_load_optimizer_and_scheduler``, which runs before any callback event. An optimizer that already has one
    (an hf_memopt optimizer) keeps it and checks its own gradients; it cannot be stepped per parameter, since its own
    ``step()`` would then record every update as finite.
    """

    def created(optimizer: torch.optim.Optimizer) -> None:
        inner = unwrap_optimizer(optimizer)
        if skip_counter_of(inner) is None:
            setattr(inner, _OWN_COUNTER, install_skip_counter(inner, config.max_consecutive_skips))
        elif config.layerwise:
            raise ValueError(
                f"layerwise=True steps the Trainer's optimizer one parameter at a time; {type(inner).__name__} checks "
                "its own gradients in step() and cannot be stepped so. Use a torch / bitsandbytes optimizer (optim=...)"
            )
        if config.layerwise:
            if callback.layerwise is not None:
                callback.layerwise.remove()
            params = [p for group in inner.param_groups for p in group["params"]]
            callback.layerwise = PerParameterUpdates(OptimizerStepRule(inner, "LoQT"), params)

    return created


def _check_layerwise_supported(args) -> None:
    """Refuse layer-wise LoQT where it would be silently wrong."""
    if args.max_grad_norm:
        raise ValueError(
            "LoQT with layerwise=True updates each parameter inside backward, before the global gradient norm is "
            f"known, so it cannot clip: set max_grad_norm=0 (TrainingArguments); got max_grad_norm={args.max_grad_norm}"
        )
    if args.fp16:
        raise ValueError("LoQT with layerwise=True cannot run with fp16=True (the gradients are loss-scaled); use bf16")


def plan_loqt(trainer: Trainer, config: LoQTConfig) -> MethodPlan:
    """Registry planner: validate now, convert the model at ``attach`` (B must exist before the Trainer builds its
    optimizer), run the merge schedule from a callback. Layer-wise mode steps each parameter inside backward: the
    hooks measure the true gradient norm and, under DDP, average each gradient themselves (the model stays out of
    DDP); otherwise DDP averages B's gradients and the merges average the weight gradients they collect."""
    if trainer.optimizer is not None:
        raise ValueError("attach LoQT before the optimizer is created: B must be among the optimized parameters")
    if loqt_layers(trainer.model):
        raise ValueError("this model already has LoQT layers")
    if config.layerwise:
        _check_layerwise_supported(trainer.args)
    loqt_target_modules(trainer.model, config)  # rank, shared weights, peft: refused before the model changes
    distributed = trainer.args.world_size > 1
    layers: dict[str, LoQTLinear] = {}  # filled by prepare(); the callback holds the same dict
    callback = LoQTCallback(config, layers)

    def prepare(model: nn.Module) -> None:
        layers.update(convert_to_loqt(model, config))
        if distributed and not config.layerwise:
            _keep_frozen_buffers_out_of_ddp(model, layers)
        frozen = sum(layer.in_features * layer.out_features for layer in layers.values())
        trainable = sum(layer.B.numel() for layer in layers.values())
        logger.info(
            "LoQT: %d layers, %.2fM frozen quantized weights, %.2fM trainable B entries",
            len(layers),
            frozen / 1e6,
            trainable / 1e6,
        )

    def grad_norm() -> float | None:
        return None if callback.layerwise is None else callback.layerwise.last_grad_norm

    return MethodPlan(
        prepare_model=prepare,
        on_optimizer_created=_on_optimizer_created(config, callback),
        callbacks=(callback,),
        data_parallel="own" if config.layerwise else "any",
        distributed_error=None if config.layerwise or not distributed else _ddp_finds_no_unused_parameters(trainer),
        grad_norm=grad_norm if config.layerwise else None,
        plain_save=_plain_form,
    )
