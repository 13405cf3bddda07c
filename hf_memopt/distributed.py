"""Which sharding engine (FSDP, DeepSpeed ZeRO) a ``Trainer`` runs under, and the refusal of methods that cannot.

Plain data parallelism (DDP) gives the optimizer every whole parameter and its averaged gradient, so each method's
builder decides there on its own. The sharding engines change what the optimizer sees:

* FSDP (1 and 2) gives each rank a shard of rows of every parameter and gradient (a ``DTensor`` under FSDP2);
* DeepSpeed ZeRO-1/2/3 hands the optimizer flat 1-D partitions of all parameters concatenated (ZeRO-3 also
  partitions the model's parameters between forwards); ZeRO-0 in fp32 steps the optimizer on the model's own
  parameters after an all-reduce, like DDP; ZeRO-0 with fp16/bf16 wraps it in DeepSpeed's mixed-precision optimizer.

A method that needs whole matrices (an SVD of the gradient, quantized weights, masks of whole blocks) cannot run on
these pieces, so :func:`check_engine_supported` refuses it at ``attach()``, before any work is lost. Each method
declares the engines it runs under in its registration (``MethodSpec.engines``).
"""

from __future__ import annotations

from typing import Any

__all__ = ["ENGINES", "check_engine_supported", "detect_engine", "supported_engines"]

# engine key -> (what the message calls it, what it does to the optimizer's view of the parameters)
ENGINES: dict[str, tuple[str, str]] = {
    "fsdp": ("FSDP", "FSDP gives each rank a shard of rows of every parameter and gradient"),
    "zero0": (
        "DeepSpeed ZeRO-0",
        "DeepSpeed ZeRO-0 all-reduces the gradients after the whole backward, inside its own engine step",
    ),
    "zero0_lowp": (
        "DeepSpeed ZeRO-0 with fp16/bf16",
        "DeepSpeed wraps the optimizer in its own mixed-precision optimizer, which steps flat fp32 master copies",
    ),
    "zero1": ("DeepSpeed ZeRO-1", "DeepSpeed ZeRO-1 steps the optimizer on flat 1-D partitions of all parameters"),
    "zero2": ("DeepSpeed ZeRO-2", "DeepSpeed ZeRO-2 steps the optimizer on flat 1-D partitions of all parameters"),
    "zero3": (
        "DeepSpeed ZeRO-3",
        "DeepSpeed ZeRO-3 partitions the parameters themselves and steps the optimizer on flat 1-D partitions",
    ),
}


def detect_engine(trainer: Any) -> str | None:
    """The key in :data:`ENGINES` of the sharding engine ``trainer`` runs under, or ``None`` (one process or DDP).

    Read from the accelerator the Trainer built in its constructor, not from ``TrainingArguments``: on CPU
    accelerate 1.15 keeps ``fsdp=...`` out of its multi-CPU state and trains with DDP, and then DDP is what runs.
    """
    if getattr(trainer, "is_fsdp_enabled", False):
        return "fsdp"
    if not getattr(trainer, "is_deepspeed_enabled", False):
        return None
    plugin = trainer.accelerator.state.deepspeed_plugin
    stage = int(plugin.zero_stage)
    if stage == 0 and _deepspeed_low_precision(plugin.deepspeed_config, trainer.args):
        return "zero0_lowp"
    return f"zero{stage}"


def _deepspeed_low_precision(ds_config: dict[str, Any], args: Any) -> bool:
    """Whether a DeepSpeed config enables fp16 or bf16 (``"auto"`` follows ``TrainingArguments``, as transformers)."""
    for key in ("fp16", "bf16"):
        enabled = ds_config.get(key, {}).get("enabled", False)
        if enabled == "auto":
            enabled = bool(getattr(args, key, False))
        if enabled:
            return True
    return False


def supported_engines(spec: Any, config: Any) -> frozenset[str]:
    """The engines ``spec``'s method runs under with this ``config`` (``spec.engines`` may depend on the config)."""
    return spec.engines(config) if callable(spec.engines) else spec.engines


def check_engine_supported(trainer: Any, spec: Any, config: Any) -> None:
    """Raise ``NotImplementedError`` when ``trainer`` shards with an engine the method cannot run under.

    The message names the method, the engine, what the method needs and what the engine does instead, and the
    sharding engines that do work. One process and DDP pass here (the builders check DDP themselves).
    """
    engine = detect_engine(trainer)
    supported = supported_engines(spec, config)
    if engine is None or engine in supported:
        return
    label, effect = ENGINES[engine]
    need = spec.engine_requirement or f"{spec.name} was not written for sharded parameters"
    works = ", ".join(ENGINES[e][0] for e in ENGINES if e in supported) or "none"
    raise NotImplementedError(
        f"{spec.name} under {label} is not implemented: {need}, but {effect}. Sharding engines {spec.name} runs "
        f"under: {works}. Remove `fsdp` / `deepspeed` from TrainingArguments to train it without sharding."
    )
