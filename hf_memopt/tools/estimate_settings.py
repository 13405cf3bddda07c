"""Training-side settings of the memory estimate that belong to no method: what the min-memory recipe sets besides
its method (``recipes/instruct/smollm2_min_memory.yaml``, ``docs/min_memory.md``).

``hf-memopt estimate ... --set KEY=VALUE`` passes them with the method's fields; :func:`split_training_settings`
takes them out before the method config is built, :func:`apply_training_settings` applies them to the meta model
before the method's transform, and :func:`stock_optimizer_state` recounts the state of the Trainer's own optimizer
when the method trains with it (LoQT's B, VeLoRA's layers) and ``optim`` is bitsandbytes' 8-bit AdamW.

* ``freeze_modules`` / ``frozen_dtype`` / ``loss_chunk_size`` / ``recompute_swiglu``: the recipe's ``memory:`` section
  (:class:`hf_memopt.tools.recipes.recipe.MemorySettings`);
* ``gradient_checkpointing``: ``TrainingArguments.gradient_checkpointing`` (the trace then sees what the checkpointed
  layers keep, as the measurement does);
* ``optim``: ``TrainingArguments.optim`` for methods that do not supply the optimizer: ``adamw_torch`` (default) or
  ``adamw_bnb_8bit``.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from hf_memopt.core.registry import METHODS

__all__ = ["OPTIMS", "TRAINING_SETTINGS", "apply_training_settings", "split_training_settings", "stock_optimizer_state"]

MEMORY_SETTINGS = ("freeze_modules", "frozen_dtype", "loss_chunk_size", "recompute_swiglu")  # the recipe's memory:
TRAINING_SETTINGS = (*MEMORY_SETTINGS, "gradient_checkpointing", "optim")
OPTIMS = ("adamw_torch", "adamw_bnb_8bit")


def _supplies_optimizer(method: str) -> bool:
    """Whether ``method`` fixes the optimizer: a registered method that brings its own, or a baseline (``adamw``,
    ``adamw_8bit``), which is the optimizer."""
    return method not in METHODS or METHODS[method].sets_optimizer


def split_training_settings(method: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    """Remove the training-side settings from ``kwargs`` (in place) and return them, validated."""
    from hf_memopt.tools.recipes.recipe import MemorySettings

    settings = {k: kwargs.pop(k) for k in TRAINING_SETTINGS if k in kwargs}
    MemorySettings(**{k: v for k, v in settings.items() if k in MEMORY_SETTINGS})
    if not isinstance(settings.get("gradient_checkpointing", False), bool):
        raise ValueError(f"gradient_checkpointing must be true or false; got {settings['gradient_checkpointing']!r}")
    optim = settings.get("optim", "adamw_torch")
    if optim not in OPTIMS:
        raise ValueError(f"optim must be one of {OPTIMS}; got {optim!r}")
    if optim != "adamw_torch" and _supplies_optimizer(method):
        stock = ", ".join(name for name in METHODS if not METHODS[name].sets_optimizer)
        raise ValueError(
            f"optim={optim!r} applies to methods that train with the Trainer's optimizer ({stock}); "
            f"{method!r} supplies its own (use --method adamw_8bit for the plain 8-bit baseline)"
        )
    return settings


def apply_training_settings(model: nn.Module, settings: dict[str, Any]) -> None:
    """Freeze / cast modules, chunk the loss and turn on gradient checkpointing on the meta model, as training would."""
    from hf_memopt.tools.recipes.recipe import MemorySettings

    memory = {k: v for k, v in settings.items() if k in MEMORY_SETTINGS}
    if memory:
        MemorySettings(**memory).prepare(model)
    if settings.get("gradient_checkpointing"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()


def stock_optimizer_state(result: dict[str, Any], model: nn.Module, settings: dict[str, Any]) -> None:
    """With ``optim="adamw_bnb_8bit"``, recount the optimizer state of the trainable parameters as bitsandbytes keeps
    it (block-wise 8-bit moments, 32-bit for embeddings and small tensors)."""
    if settings.get("optim", "adamw_torch") == "adamw_torch":
        return
    from hf_memopt.shared.estimate import unique_parameters
    from hf_memopt.tools.estimate import _bnb_adamw8bit_state

    trainable = [(n, p) for n, p in unique_parameters(model) if p.requires_grad]
    result["optimizer_state"] = _bnb_adamw8bit_state(model, trainable)
    result["notes"].append("optimizer state: bitsandbytes AdamW8bit (optim=adamw_bnb_8bit)")
