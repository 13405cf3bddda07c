"""Apply VeLoRA to a model, and its plan for ``attach()``."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

from torch import nn
from transformers import Trainer

from hf_memopt.core.plan import MethodPlan
from hf_memopt.velora.config import VeLoRAConfig
from hf_memopt.velora.layer import BUFFER_NAME, install_velora_linear, is_velora_linear, uninstall_velora_linear
from hf_memopt.velora.targets import resolve_targets, warn_partial_groups

__all__ = ["apply_velora", "plan_velora", "remove_velora", "without_velora_buffers"]

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

    To only *save* a plain model and keep training, use ``with without_velora_buffers(model): model.save_pretrained(d)``
    (a trainer with VeLoRA attached does this on every user save).
    """
    layers = [m for m in model.modules() if is_velora_linear(m)]
    for module in layers:
        uninstall_velora_linear(module)
    return len(layers)


@contextlib.contextmanager
def without_velora_buffers(model: nn.Module, save_kwargs: dict[str, Any] | None = None) -> Iterator[nn.Module]:
    """Leave the ``velora_v`` buffers out of ``model.state_dict()`` (and out of ``save_kwargs["state_dict"]``, one
    the Trainer computed beforehand under FSDP or DeepSpeed) for the duration: the plain form of a VeLoRA model.

    v only shapes what is saved for backward (Sec. 3.2); the forward and the weights are those of the plain model, so
    the saved model loads into ``from_pretrained`` with no unexpected keys and predicts the same.
    """
    layers = [m for m in model.modules() if is_velora_linear(m)]
    if save_kwargs is not None and save_kwargs.get("state_dict") is not None:
        save_kwargs["state_dict"] = {
            k: v for k, v in save_kwargs["state_dict"].items() if k.rpartition(".")[2] != BUFFER_NAME
        }
    for module in layers:
        module.register_buffer(BUFFER_NAME, getattr(module, BUFFER_NAME), persistent=False)
    try:
        yield model
    finally:
        for module in layers:
            module.register_buffer(BUFFER_NAME, getattr(module, BUFFER_NAME), persistent=True)


def plan_velora(trainer: Trainer, config: VeLoRAConfig) -> MethodPlan:
    """Registry planner: a model transform done at ``attach()`` (:func:`apply_velora` validates every target before
    it changes one); the optimizer is left to the Trainer or another method, and so is the gradient averaging under
    DDP. Checkpoints carry the ``velora_v`` buffers (resume restores v exactly); user saves (``save_model``,
    ``save_pretrained``, ``push_to_hub``) leave them out (:func:`without_velora_buffers`), so the saved model is a
    plain transformers model."""

    def prepare(model: nn.Module) -> None:
        apply_velora(model, config)

    return MethodPlan(prepare_model=prepare, data_parallel="any", plain_save=without_velora_buffers)
