"""Training on more than one process: what data parallelism (DDP) and the sharding engines (FSDP, DeepSpeed ZeRO)
do to a method, in one place.

**Data parallelism**, for methods that do (some of) their own gradient communication.
DDP all-reduces full gradients in buckets after backward and keeps a bucket copy of every gradient. Layer-wise GaLore
updates each weight inside backward (before DDP's all-reduce) and only needs the small projected gradient averaged;
ZO has no gradients at all and only needs its projected-gradient scalars averaged. Both declare it in their plan
(``MethodPlan.data_parallel="own"``), so ``attach()`` keeps the model out of DDP
(:func:`hf_memopt.core.trainer_hooks.keep_model_out_of_ddp`, which also starts every rank from rank 0's weights), and
average what they need themselves (:func:`all_reduce_mean_`). BlockLLM does the same: DDP fixes its buckets from
``requires_grad`` at wrap time, which every re-selection changes; its optimizer averages the selected blocks' gradients
(every block's on a scoring step) and the loss of its stall test. LoQT stays under DDP and uses
:func:`all_reduce_mean_` for the weight gradient its merges collect, which DDP never sees.

**Sharding engines**: which one (FSDP, DeepSpeed ZeRO) a ``Trainer`` runs under, and the refusal of methods that cannot.
Plain data parallelism (DDP) gives the optimizer every whole parameter and its averaged gradient, so each method's
plan declares what it needs there (``MethodPlan.data_parallel``). The sharding engines change what the optimizer sees:

* FSDP (1 and 2) gives each rank a shard of rows of every parameter and gradient (a ``DTensor`` under FSDP2);
* DeepSpeed ZeRO-1/2/3 hands the optimizer flat 1-D partitions of all parameters concatenated (ZeRO-3 also
  partitions the model's parameters between forwards); ZeRO-0 in fp32 steps the optimizer on the model's own
  parameters after an all-reduce, like DDP; ZeRO-0 with fp16/bf16 wraps it in DeepSpeed's mixed-precision optimizer.

A method that needs whole matrices (an SVD of the gradient, quantized weights, masks of whole blocks) cannot run on
these pieces, so :func:`check_engine_supported` refuses it at ``attach()``, before any work is lost. Each method
declares the engines it runs under in its registration (``MethodSpec.engines``).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import torch

from hf_memopt.core.registry import ENGINES

if TYPE_CHECKING:
    pass

__all__ = [
    "all_reduce_mean_",
    "broadcast_from_rank0_",
    "check_engine_supported",
    "detect_engine",
    "is_distributed",
    "supported_engines",
]


def is_distributed() -> bool:
    """Whether a process group with more than one rank is running."""
    dist = torch.distributed
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_mean_(tensor: torch.Tensor) -> int:
    """Average ``tensor`` over all ranks in place; returns the bytes this rank contributed to the all-reduce."""
    torch.distributed.all_reduce(tensor)
    tensor.div_(torch.distributed.get_world_size())
    return tensor.numel() * tensor.element_size()


@torch.no_grad()
def broadcast_from_rank0_(tensors: Iterable[torch.Tensor | None]) -> None:
    """Copy rank 0's values of ``tensors`` to every rank, in place (``None`` entries are skipped)."""
    for tensor in tensors:
        if tensor is not None:
            torch.distributed.broadcast(tensor.data, src=0)


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
