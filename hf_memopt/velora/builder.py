"""Apply VeLoRA to a model, and the Trainer builder."""

from __future__ import annotations

import logging

from torch import nn
from transformers import Trainer

from hf_memopt.velora.config import VeLoRAConfig
from hf_memopt.velora.layer import install_velora_linear, is_velora_linear, uninstall_velora_linear
from hf_memopt.velora.targets import resolve_targets, warn_partial_groups

__all__ = ["apply_velora", "build_velora", "remove_velora"]

logger = logging.getLogger(__name__)


def apply_velora(model: nn.Module, config: VeLoRAConfig) -> dict[str, nn.Linear]:
    """Install VeLoRA on the targeted Linear layers of ``model`` in place; returns ``{name: layer}``.

    Validates every target before changing any (so a ``ValueError`` leaves the model untouched). Layers whose weight
    is frozen are skipped: a frozen Linear saves no input for a weight gradient, so there is nothing to compress.
    """
    targets = resolve_targets(model, config.target_modules)
    targets = {n: m for n, m in targets.items() if m.weight.requires_grad}
    if not targets:
        raise ValueError(f"target_modules={config.target_modules!r} matches no Linear layer with a trainable weight")
    for name, module in targets.items():  # validate all first
        if is_velora_linear(module):
            raise ValueError(f"target_modules: {name} already has VeLoRA installed")
        if module.in_features % config.num_groups:
            raise ValueError(
                f"num_groups must divide the input width of every targeted layer; {name} has "
                f"in_features={module.in_features}, num_groups={config.num_groups}"
            )
        if type(module).forward is not nn.Linear.forward or "forward" in module.__dict__:
            raise ValueError(
                f"target_modules: {name} is a {type(module).__name__} with its own forward; VeLoRA targets plain "
                "nn.Linear layers (for LoRA adapters use peft's LoraConfig(velora_config=...))"
            )
    for i, (name, module) in enumerate(targets.items()):
        install_velora_linear(
            module,
            num_groups=config.num_groups,
            init=config.init,
            scale=config.scale,
            coefficient_dtype=config.coefficient_dtype,
            seed=config.seed + i,
            name=name,
        )
    warn_partial_groups(model, targets)
    logger.info("VeLoRA: compressing the inputs of %d Linear layers (num_groups=%d)", len(targets), config.num_groups)
    return targets


def remove_velora(model: nn.Module) -> int:
    """Undo :func:`apply_velora` (original forwards back, ``velora_v`` buffers dropped); returns the layer count.

    Use it before ``save_pretrained`` when the saved model should load into a plain ``from_pretrained``.
    """
    layers = [m for m in model.modules() if is_velora_linear(m)]
    for module in layers:
        uninstall_velora_linear(module)
    return len(layers)


def build_velora(trainer: Trainer, config: VeLoRAConfig) -> None:
    """Registry builder: a model transform done at ``attach()``; the optimizer is left to the Trainer or another
    method. The ``velora_v`` buffers are part of the model's state_dict, so checkpoints and resume carry them."""
    apply_velora(trainer.model, config)
