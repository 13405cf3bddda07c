"""Install LoQT on a Trainer: the model transform, the merge schedule callback, and plain-model saving.

Saving: the model's ``state_dict`` is always LoQT's true state (quantized weights, P, B, merge count), so a Trainer
checkpoint (``_save_checkpoint`` -> ``save_model`` -> ``save_pretrained``, safetensors) resumes exactly through the
Trainer's own ``load_state_dict``. Everything a *user* saves (``trainer.save_model``, ``model.save_pretrained``,
``push_to_hub``) is a plain Hugging Face model instead: the LoQT layers are swapped for ``nn.Linear`` layers holding
W_q + s P B, dequantized to the model's dtype, for the duration of the save. The switch is one wrapper on the model's
``save_pretrained`` and one on the trainer's ``_save_checkpoint`` (the only private Trainer name touched here), which
marks the save as a raw checkpoint.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Iterator

import torch
from torch import nn
from transformers import Trainer, TrainerCallback
from transformers.training_args import ParallelMode

from hf_memopt.galore.projector import projection_sides
from hf_memopt.loqt.config import LoQTConfig
from hf_memopt.loqt.layer import LoQTLinear
from hf_memopt.optim_state import unwrap_optimizer
from hf_memopt.targeting import ALL_LINEAR, match_target_modules
from hf_memopt.velora.layer import is_velora_linear

__all__ = [
    "LoQTCallback",
    "build_loqt",
    "convert_to_loqt",
    "loqt_layers",
    "loqt_target_modules",
    "plain_linear_modules",
    "save_plain_pretrained",
]

logger = logging.getLogger(__name__)
_RAW_SAVE = "_loqt_raw_save"


def loqt_target_modules(model: nn.Module, config: LoQTConfig) -> dict[str, nn.Linear]:
    """``{name: nn.Linear}`` that LoQT replaces; validates rank against every shape and refuses shared weights."""
    modules = match_target_modules(model, config.target_modules, allowed_types=(nn.Linear,))
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if isinstance(config.target_modules, str) and config.target_modules.replace("_", "-") == ALL_LINEAR:
        modules = {n: m for n, m in modules.items() if m is not head}  # as peft's "all-linear"
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
        if is_velora_linear(module):
            raise ValueError(
                f"target_modules: {name} is already compressed by VeLoRA; LoQT would replace it and drop the "
                "compression. Leave it out of one of the two methods' target_modules"
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
    return layers


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


def _install_save_hooks(trainer: Trainer, model: nn.Module) -> None:
    if not hasattr(trainer, "_save_checkpoint"):
        raise ImportError("LoQT needs Trainer._save_checkpoint (transformers 5.x) to keep checkpoints resumable")
    raw_save = type(model).save_pretrained

    @functools.wraps(raw_save)
    def save_pretrained(save_directory, *args, **kwargs):
        if getattr(model, _RAW_SAVE, False):
            return raw_save(model, save_directory, *args, **kwargs)
        return save_plain_pretrained(model, save_directory, *args, **kwargs)

    model.save_pretrained = save_pretrained
    save_checkpoint = trainer._save_checkpoint

    @functools.wraps(save_checkpoint)
    def _save_checkpoint(*args, **kwargs):
        object.__setattr__(model, _RAW_SAVE, True)
        try:
            return save_checkpoint(*args, **kwargs)
        finally:
            object.__setattr__(model, _RAW_SAVE, False)

    trainer._save_checkpoint = _save_checkpoint


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
    """

    def __init__(self, config: LoQTConfig, layers: dict[str, LoQTLinear]):
        self.config = config
        self.layers = layers
        self.collecting = False
        self.merges_done = 0

    def on_train_begin(self, args, state, control, **kwargs):
        for layer in self.layers.values():
            layer._pending()

    def on_step_begin(self, args, state, control, **kwargs):
        uninitialized = any(not layer.initialized for layer in self.layers.values())
        self.collecting = uninitialized or self.config.is_merge_step(state.global_step)
        for layer in self.layers.values():
            layer.collecting = self.collecting

    def on_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        if not self.collecting:
            return
        optimizer = unwrap_optimizer(optimizer)
        for layer in self.layers.values():
            layer.merge(self.config.error_compensation_steps)
            layer.collecting = False
            if self.config.optimizer_state_on_merge == "reset" and optimizer is not None:
                optimizer.state.pop(layer.B, None)
        self.collecting = False
        self.merges_done += 1
        logger.info("LoQT: merged %d layers at update %d", len(self.layers), state.global_step)


def build_loqt(trainer: Trainer, config: LoQTConfig) -> None:
    """Registry builder: convert the model now (B must exist before the Trainer builds its optimizer)."""
    if trainer.optimizer is not None:
        raise ValueError("attach LoQT before the optimizer is created: B must be among the optimized parameters")
    args = trainer.args
    if args.parallel_mode == ParallelMode.DISTRIBUTED or args.world_size > 1:
        raise NotImplementedError(
            "LoQT under distributed training is not implemented: each rank would find P from its local gradient"
        )
    model = trainer.model
    if loqt_layers(model):
        raise ValueError("this model already has LoQT layers")
    layers = convert_to_loqt(model, config)
    trainer.add_callback(LoQTCallback(config, layers))
    _install_save_hooks(trainer, model)
    frozen = sum(layer.in_features * layer.out_features for layer in layers.values())
    trainable = sum(layer.B.numel() for layer in layers.values())
    logger.info(
        "LoQT: %d layers, %.2fM frozen quantized weights, %.2fM trainable B entries",
        len(layers),
        frozen / 1e6,
        trainable / 1e6,
    )
