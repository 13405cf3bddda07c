"""Which Linear layers VeLoRA should compress so that memory is really freed.

Autograd saves a storage once, however many ops save it: the q, k and v projections of one attention block all
save the same normalised hidden state, gate and up the same post-attention one. Compressing the input of v_proj
while q_proj still saves it frees nothing. The ``"auto"`` targets below compress every reader of each such storage
(measured with :func:`compression_report`; figures in ``docs/methods/velora.md``). The output head is left out (its
weight gradient is the one most hurt by rank-1 sub-tokens, and its input is a single B x N x D tensor).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from hf_memopt.core import compat
from hf_memopt.shared.targeting import match_target_modules, refuse_peft_model
from hf_memopt.velora.config import AUTO

__all__ = [
    "AUTO_TARGETS",
    "AUTO_TARGETS_EAGER",
    "PEFT_VELORA",
    "SHARED_INPUT_GROUPS",
    "CompressionReport",
    "compression_report",
    "resolve_targets",
    "warn_partial_groups",
]

logger = logging.getLogger(__name__)

# The auto targets are the layers whose input is the MLP's (feed-forward's) widest activation and is read by that layer
# alone: down_proj (the SwiGLU product, tokens x intermediate), BERT's layer output.dense (the GELU output), so
# compressing it frees the whole input. Measured at the full pretraining schedule (docs/results.md, LLaMA 20M, 2,000
# updates): compressing gate_proj and up_proj as well (their shared tokens x hidden input: 37% more memory freed
# at 20M) cost +10.8% held-out perplexity against AdamW, while v_proj + down_proj (the paper's set, whose v_proj part
# frees nothing) stayed level (-2.5%), and down_proj alone ended at +0.1%; after 200 updates the difference had not
# shown (+0.8%). On MiniLM MRPC: 79.4 (down_proj's BERT twin, output.dense) vs 77.7 (FFN set), AdamW 79.9.
# o_proj / attention.output.dense are left out with SDPA attention (transformers' default): their input is a view of
# the attention output, which the attention kernel itself saves, so compressing them frees nothing (measured). With
# eager attention the input is a fresh copy, and they are added.
_LLAMA_LIKE = ["down_proj"]
_BERT_LIKE = r".*layer\.\d+\.output\.dense"
_BERT_LIKE_EAGER = r".*layer\.\d+\.(attention\.)?output\.dense"

AUTO_TARGETS: dict[str, list[str] | str] = {
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
    "bert": _BERT_LIKE,
    "roberta": _BERT_LIKE,
    "xlm-roberta": _BERT_LIKE,
}
AUTO_TARGETS_EAGER: dict[str, list[str] | str] = {
    **{k: [*_LLAMA_LIKE, "o_proj"] for k in ("llama", "mistral", "qwen2", "qwen3")},
    **{k: _BERT_LIKE_EAGER for k in ("bert", "roberta", "xlm-roberta")},
}

# peft (0.21) ships VeLoRA as a LoRA variant (peft/tuners/lora/velora.py): it compresses the input lora_A saves. The
# settings suggested are hf_memopt's defaults: num_groups=32 (best in the paper's Table 6; peft's default 64 is its
# worst) and v fixed from the first batch (the official code's default; peft's default recomputes it every batch).
PEFT_VELORA = (
    "from peft import LoraConfig, VeloraConfig; "
    "LoraConfig(..., velora_config=VeloraConfig(num_groups=32, init_type='batch_average_once'))"
)

# Leaf names of Linear layers that read one and the same input tensor: compress all of a group or none.
SHARED_INPUT_GROUPS: dict[str, list[tuple[str, ...]]] = {
    "llama": [("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj")],
    "mistral": [("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj")],
    "qwen2": [("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj")],
    "qwen3": [("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj")],
    "bert": [("query", "key", "value")],
    "roberta": [("query", "key", "value")],
    "xlm-roberta": [("query", "key", "value")],
}


def _model_type(model: nn.Module) -> str | None:
    return getattr(getattr(model, "config", None), "model_type", None)


def resolve_targets(model: nn.Module, target_modules: list[str] | str) -> dict[str, nn.Module]:
    """``{name: Linear}`` to compress; ``"auto"`` is looked up by ``model.config.model_type``.

    A peft model is refused: its base layers are frozen (they save no input for a weight gradient, so there is nothing
    to compress) and its LoRA adapters run inside peft's forward, which ships its own VeLoRA variant for them.
    """
    refuse_peft_model(model, "VeLoRA", f"for the LoRA adapters use peft's own VeLoRA: {PEFT_VELORA}")
    if target_modules == AUTO:
        model_type = _model_type(model)
        if model_type not in AUTO_TARGETS:
            raise ValueError(
                f"target_modules='auto' has no default for model_type={model_type!r} (known: {sorted(AUTO_TARGETS)}); "
                "list the Linear layers to compress, every reader of a shared input included"
            )
        eager = compat.attn_implementation(model.config) == "eager"
        target_modules = (AUTO_TARGETS_EAGER if eager else AUTO_TARGETS)[model_type]
    return match_target_modules(model, target_modules, allowed_types=(nn.Linear,))


def warn_partial_groups(model: nn.Module, targets: Mapping[str, nn.Module]) -> list[str]:
    """Log (and return) a warning for each block where only part of a shared-input group is compressed."""
    groups = SHARED_INPUT_GROUPS.get(_model_type(model) or "", [])
    messages = []
    for group in groups:
        parents: dict[str, set[str]] = {}
        for name, module in model.named_modules():
            parent, _, leaf = name.rpartition(".")
            if leaf in group and isinstance(module, nn.Linear) and module.weight.requires_grad:
                parents.setdefault(parent, set()).add(leaf)
        for parent, present in parents.items():
            chosen = {leaf for leaf in present if f"{parent}.{leaf}" in targets}
            if chosen and chosen != present:
                missing = sorted(present - chosen)
                messages.append(
                    f"VeLoRA compresses {sorted(chosen)} in {parent} but not {missing}, which save the same input "
                    "tensor: no memory is freed there. Add them to target_modules (or use target_modules='auto')"
                )
    for message in messages[:1]:
        logger.warning("%s%s", message, f" (and {len(messages) - 1} more blocks)" if len(messages) > 1 else "")
    return messages


@dataclass
class CompressionReport:
    """What compressing the targets did to the unique storages saved for backward in one forward pass.

    Args:
        saved_bytes: unique saved storages (parameters excluded), as ``SavedActivationMeter`` counts them.
        target_input_bytes: unique storages of the targeted layers' inputs.
        still_saved: ``{layer name: bytes}`` for targeted layers whose input is still saved by another op, so
            compressing them freed nothing.
    """

    saved_bytes: int
    target_input_bytes: int
    still_saved: dict[str, int] = field(default_factory=dict)


def compression_report(
    model: nn.Module, run_forward: Callable[[], Any], targets: Mapping[str, nn.Module] | None = None
) -> CompressionReport:
    """Run ``run_forward()`` (one training forward, returning the loss or output) and report saved storages.

    ``targets`` defaults to the layers with VeLoRA installed. The graph is freed before returning.
    """
    from hf_memopt.velora.layer import is_velora_linear

    if targets is None:
        targets = {n: m for n, m in model.named_modules() if is_velora_linear(m)}
    inputs: dict[str, torch.Tensor] = {}
    handles = [
        m.register_forward_pre_hook(lambda mod, args, _n=n: inputs.setdefault(_n, args[0])) for n, m in targets.items()
    ]
    params = {(str(p.device), p.untyped_storage().data_ptr()) for p in model.parameters()}
    saved: dict[tuple[str, int], int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        key = (str(t.device), t.untyped_storage().data_ptr())
        if key not in params and t.device.type != "meta":
            saved[key] = t.untyped_storage().nbytes()
        return t

    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = run_forward()
    finally:
        for h in handles:
            h.remove()
    del out
    keys = {n: (str(t.device), t.untyped_storage().data_ptr()) for n, t in inputs.items()}
    sizes = {keys[n]: t.untyped_storage().nbytes() for n, t in inputs.items()}
    still = {n: sizes[keys[n]] for n in inputs if keys[n] in saved}
    return CompressionReport(sum(saved.values()), sum(sizes.values()), still)
