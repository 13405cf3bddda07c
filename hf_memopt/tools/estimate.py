"""Predicted training memory per method, from a model config alone (no weights are loaded).

The model is built on the ``meta`` device, so every parameter shape is exact and nothing is allocated. The baselines
``adamw`` and ``adamw_8bit`` (the Trainer's stock optimizers) are estimated here; every registered method supplies its
own part through the hook it registers (``register_method(..., estimate=...)``, returning a
:class:`hf_memopt.shared.estimate.MemoryEstimate`), so this module holds no method-specific code:

* ``parameters`` / ``buffers``: bytes of the ``nn.Parameter`` storages after the method's model transform, plus the
  method's frozen storage kept as buffers. ``weights`` is their sum;
* ``gradients``: the peak of live ``.grad`` bytes;
* ``optimizer_state``: the optimizer's tensors, computed per parameter with the same rules as the optimizers
  (AdamW moments and step counters; bitsandbytes' block-wise 8-bit states with one float32 absmax per 256 values and
  float32 states for embeddings and tensors under 4096 values);
* ``activations``: a forward pass on meta tensors traced under ``torch.autograd.graph.saved_tensors_hooks``, counting
  each storage saved for backward once and leaving parameters out: the same rule as
  :class:`hf_memopt.tools.memory.SavedActivationMeter`, so the estimate and the measurement agree on what is
  counted. The method's hook applies its model transform before it asks for the trace.

``estimate_memory(...)`` returns a dict of byte counts plus what was targeted; ``format_estimate`` turns one or more
of them into a Markdown table like the papers' memory tables.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from hf_memopt.core import compat
from hf_memopt.shared.estimate import (
    MemoryEstimate,
    adamw_state_bytes,
    blockwise_8bit_bytes,
    parameter_bytes,
    tensor_bytes,
    unique_parameters,
)

__all__ = ["BASELINES", "estimable_methods", "estimate_memory", "format_estimate", "load_model_config"]

MB = 2**20
BASELINES = ("adamw", "adamw_8bit")  # the Trainer's stock optimizers, compared against
TASKS = ("causal-lm", "sequence-classification")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}
_BNB_MIN_8BIT_SIZE = 4096  # bitsandbytes' default: smaller tensors keep 32-bit states
_BNB_QMAPS = 2 * 256 * 4  # the signed and unsigned dynamic code tables, shared by all parameters


# ---- the model ------------------------------------------------------------------------------------------------------


def load_model_config(config_or_id: Any):
    """A ``PretrainedConfig`` from a config object, ``llama-20m/60m/130m``, ``minilm``/``smollm2``, a folder, a
    ``config.json`` path or a Hub id. Raises ``ValueError`` when nothing can be loaded."""
    from transformers import AutoConfig, PretrainedConfig

    from hf_memopt.tools.recipes.models import LLAMA_SIZES, llama_config, resolve_model

    if isinstance(config_or_id, PretrainedConfig):
        return config_or_id
    if not isinstance(config_or_id, (str, Path)) or not str(config_or_id):
        raise ValueError(f"config_or_id must be a model config, a path or a model name; got {config_or_id!r}")
    name = str(config_or_id)
    if name.lower().startswith("llama-") and name[6:].lower() in LLAMA_SIZES:
        return llama_config(name[6:].lower())
    path = Path(name)
    try:
        if path.is_file():
            data = json.loads(path.read_text())
            if "model_type" not in data:
                raise ValueError(f"{name} has no model_type")
            return AutoConfig.for_model(**data)
        return AutoConfig.from_pretrained(resolve_model(name) if name in ("minilm", "smollm2") else name)
    except (OSError, ValueError, KeyError, json.JSONDecodeError) as err:
        sizes = ", ".join(f"llama-{s}" for s in LLAMA_SIZES)
        raise ValueError(
            f"cannot load a model config from {name!r} ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}); "
            f"give a folder with config.json, a config.json path, a Hub id, minilm, smollm2 or one of {sizes}"
        ) from None


def _default_task(config) -> str:
    from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

    for arch in getattr(config, "architectures", None) or []:
        if arch.endswith("ForCausalLM"):
            return "causal-lm"
        if arch.endswith("ForSequenceClassification"):
            return "sequence-classification"
    if getattr(config, "is_decoder", False):
        return "causal-lm"
    return "sequence-classification" if config.model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES else "causal-lm"


def _meta_model(config, task: str, num_labels: int, dtype: torch.dtype) -> nn.Module:
    import copy

    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    config = copy.deepcopy(config)
    if task == "sequence-classification":
        config.num_labels = num_labels
        if getattr(config, "pad_token_id", None) is None:
            config.pad_token_id = 0  # decoder classifiers pool at the last non-pad token
        auto = AutoModelForSequenceClassification
    else:
        auto = AutoModelForCausalLM
    with torch.device("meta"):
        model = auto.from_config(config)
    return model.to(dtype).train()


# ---- activations ----------------------------------------------------------------------------------------------------


class _MetaSavedCounter:
    """``SavedActivationMeter`` for meta tensors: storages are identified by their StorageImpl (meta storages have
    no data pointer); parameters are excluded. The packed tensors stay referenced, so no identity is reused."""

    def __init__(self, model: nn.Module):
        self._exclude = {compat.storage_key(p) for p in model.parameters()}
        self._seen: set[int] = set()
        self._keep: list[torch.Tensor] = []
        self.total = 0

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        key = compat.storage_key(t)
        if key not in self._seen and key not in self._exclude:
            self._seen.add(key)
            self._keep.append(t)
            self.total += t.untyped_storage().nbytes()
        return t

    def trace(self, model: nn.Module, inputs: dict[str, torch.Tensor]) -> int:
        with (
            _FusedAttentionOnMeta(),
            compat.meta_tensors_are_not_packed(),
            torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t),
        ):
            out = model(**inputs)
        del out
        self._keep.clear()
        return self.total


class _FusedAttention(torch.autograd.Function):
    """What a fused SDPA kernel (flash / memory-efficient, CPU or CUDA) saves for backward: q, k, v, the output and
    the float32 log-sum-exp per query, never the attention probabilities. On meta tensors PyTorch would take the
    math path, which saves the probabilities, so the trace uses this instead when there is no attention dropout
    (with dropout the CPU kernels fall back to the math path, which the trace then keeps)."""

    @staticmethod
    def forward(ctx, q, k, v, attn_mask, is_causal, scale, enable_gqa, original):
        out = original(q, k, v, attn_mask=attn_mask, is_causal=is_causal, scale=scale, enable_gqa=enable_gqa)
        # the fused kernels write the output as (batch, seq, heads, dim): merging the heads afterwards is then a view
        out = out.transpose(1, 2).contiguous().transpose(1, 2)
        lse = torch.empty(q.shape[:-1], dtype=torch.float32, device=q.device)
        saved = (q, k, v, out, lse) + ((attn_mask,) if attn_mask is not None else ())
        ctx.save_for_backward(*saved)
        return out

    @staticmethod
    def backward(ctx, grad_out):  # never run: the trace only records what forward saves
        raise RuntimeError("the meta-device trace has no backward")


class _FusedAttentionOnMeta(TorchFunctionMode):
    """``F.scaled_dot_product_attention`` on meta tensors behaves like the fused kernels (:class:`_FusedAttention`)
    while this mode is active. A ``TorchFunctionMode`` is local to the thread that enters it: other threads, and the
    function object itself, are left alone."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not torch.nn.functional.scaled_dot_product_attention:
            return func(*args, **kwargs)
        query, key, value, *rest = args
        options = dict(zip(("attn_mask", "dropout_p", "is_causal", "scale"), rest, strict=False), **kwargs)
        if query.device.type != "meta" or options.get("dropout_p", 0.0) > 0.0:
            return func(query, key, value, **options)
        return _FusedAttention.apply(
            query,
            key,
            value,
            options.get("attn_mask"),
            options.get("is_causal", False),
            options.get("scale"),
            options.get("enable_gqa", False),
            func,
        )


def _inputs(task: str, batch: int, seq: int) -> dict[str, torch.Tensor]:
    ids = torch.zeros(batch, seq, dtype=torch.long, device="meta")
    labels = ids if task == "causal-lm" else torch.zeros(batch, dtype=torch.long, device="meta")
    return {"input_ids": ids, "labels": labels}


def _saved_activations(model: nn.Module, task: str, batch: int, seq: int) -> int:
    return _MetaSavedCounter(model).trace(model, _inputs(task, batch, seq))


# ---- the baselines' optimizer state (mirroring the optimizers) ------------------------------------------------------


def _bnb_adamw8bit_state(model: nn.Module, params: list[tuple[str, nn.Parameter]]) -> int:
    """bitsandbytes AdamW8bit as the Trainer builds it (``optim="adamw_bnb_8bit"``): embeddings forced to 32-bit
    states, tensors under 4096 values 32-bit, the rest uint8 states with block-wise absmax, code tables shared."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    total, any_8bit = 0, False
    for _, p in params:
        if id(p) in embeddings or p.numel() < _BNB_MIN_8BIT_SIZE:
            total += 2 * 4 * p.numel()
        else:
            total += blockwise_8bit_bytes(p.numel())
            any_8bit = True
    return total + (_BNB_QMAPS if any_8bit else 0)


# ---- the estimate ---------------------------------------------------------------------------------------------------


def estimable_methods() -> tuple[str, ...]:
    """The names ``estimate_memory`` accepts: the baselines, then every registered method with an estimate hook."""
    from hf_memopt.core.registry import METHODS

    return BASELINES + tuple(name for name, spec in METHODS.items() if spec.estimate is not None)


def _method_config(method: str, rank: int | None, method_kwargs: dict[str, Any]):
    from hf_memopt.core.registry import METHODS

    if method in BASELINES:
        if rank is not None or method_kwargs:
            raise ValueError(f"method {method!r} takes no rank or options; got rank={rank}, {method_kwargs}")
        return None
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(estimable_methods())}")
    if METHODS[method].estimate is None:
        raise ValueError(
            f"method {method!r} registers no memory estimate (register_method(..., estimate=...)); "
            f"choose one of {', '.join(estimable_methods())}"
        )
    cls = METHODS[method].config_cls
    names = {f.name for f in fields(cls)}
    kwargs = dict(method_kwargs)
    if rank is not None:
        if "rank" not in names:
            raise ValueError(f"method {method!r} has no rank option")
        kwargs["rank"] = rank
    unknown = sorted(set(kwargs) - names)
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for {method}; known: {sorted(names)}")
    try:
        return cls(**kwargs)
    except TypeError as err:
        raise ValueError(str(err)) from None


def estimate_memory(
    config_or_id: Any,
    method: str,
    rank: int | None = None,
    batch: int = 1,
    seq: int = 512,
    dtype: str = "float32",
    *,
    task: str | None = None,
    num_labels: int = 2,
    **method_kwargs: Any,
) -> dict[str, Any]:
    """Predicted bytes of weights, gradients, optimizer state and activations of one training step.

    Args:
        config_or_id: a ``PretrainedConfig``, a folder or ``config.json`` path, a Hub id, ``minilm`` / ``smollm2``
            (the offline models), or ``llama-20m`` / ``llama-60m`` / ``llama-130m`` (GaLore's shapes).
        method: ``adamw`` (torch AdamW), ``adamw_8bit`` (bitsandbytes, as ``optim="adamw_bnb_8bit"``), or a
            registered method with an estimate hook (:func:`estimable_methods`: ``galore``, ``blockllm``, ``loqt``,
            ``velora``, ``zo`` ...).
        rank: the method's rank (GaLore, LoQT); ``None`` keeps the config default.
        batch, seq: micro-batch size and sequence length of the activations.
        dtype: dtype of the weights (and of the activations): ``float32``, ``bfloat16``, ``float16``, ``float64``.
        task: ``causal-lm`` or ``sequence-classification``; ``None`` picks from the config (encoders classify).
        num_labels: classes of the classification head.
        **method_kwargs: fields of the method's config (``optimizer="adamw_8bit"``, ``layerwise=True``,
            ``target_modules=...``, ``sparsity=0.9``, ``quant="nf4"``, ``num_groups=32`` ...), and the training-side
            settings of :mod:`hf_memopt.tools.estimate_settings` (``freeze_modules``, ``frozen_dtype``,
            ``loss_chunk_size``, ``recompute_swiglu``, ``gradient_checkpointing``, ``optim``).

    Returns a dict with the byte counts ``parameters``, ``buffers``, ``weights``, ``gradients``, ``optimizer_state``,
    ``activations``, ``total``; parameter counts; the method config used; ``targets`` (the modules the method
    projects, quantizes or compresses); and the method's extra figures. Raises ``ValueError`` for an unknown method,
    option or model.
    """
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {tuple(_DTYPES)}; got {dtype!r}")
    for field_name, value in (("batch", batch), ("seq", seq), ("num_labels", num_labels)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{field_name} must be an integer >= 1; got {value!r}")
    from hf_memopt.tools.estimate_settings import (
        apply_training_settings,
        split_training_settings,
        stock_optimizer_state,
    )

    training_settings = split_training_settings(method, method_kwargs)
    config = _method_config(method, rank, method_kwargs)
    model_config = load_model_config(config_or_id)
    task = task or _default_task(model_config)
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}; got {task!r}")
    torch_dtype = _DTYPES[dtype]
    model = _meta_model(model_config, task, num_labels, torch_dtype)
    apply_training_settings(model, training_settings)
    result: dict[str, Any] = {
        "model": str(config_or_id) if not hasattr(config_or_id, "to_dict") else model_config.model_type,
        "model_type": model_config.model_type,
        "task": task,
        "method": method,
        "method_config": asdict(config) if config is not None else {},
        "dtype": dtype,
        "batch": batch,
        "seq": seq,
        "num_parameters": sum(p.numel() for _, p in unique_parameters(model)),
    }

    def trace(traced: nn.Module) -> int:
        return _saved_activations(traced, task, batch, seq)

    if config is None:
        part = _estimate_baseline(method, model, trace)
    else:
        from hf_memopt.core.registry import METHODS

        part = METHODS[method].estimate(model, config, trace)
        if not isinstance(part, MemoryEstimate):
            raise TypeError(f"the estimate hook of {method!r} returned {type(part).__name__}, not a MemoryEstimate")
    result.update(
        parameters=part.parameters,
        trainable_parameters=part.trainable_parameters,
        gradients=part.gradients,
        optimizer_state=part.optimizer_state,
        activations=part.activations,
        buffers=part.buffers,
        targets=list(part.targets),
        notes=list(part.notes),
        **part.extra,
    )
    stock_optimizer_state(result, model, training_settings)
    result["training_settings"] = training_settings
    result["weights"] = result["parameters"] + result["buffers"]
    result["total"] = result["weights"] + result["gradients"] + result["optimizer_state"] + result["activations"]
    return result


def _estimate_baseline(method: str, model: nn.Module, trace: Callable[[nn.Module], int]) -> MemoryEstimate:
    """AdamW (``optim="adamw_torch"``) or bitsandbytes' AdamW8bit (``optim="adamw_bnb_8bit"``) on every parameter."""
    params = unique_parameters(model)
    notes = []
    if method == "adamw":
        state = adamw_state_bytes(p for _, p in params)
    else:
        state = _bnb_adamw8bit_state(model, params)
        notes.append("bitsandbytes keeps float32 states for nn.Embedding and tensors under 4096 values")
    return MemoryEstimate(
        parameters=parameter_bytes(model),
        trainable_parameters=sum(p.numel() for _, p in params),
        gradients=sum(tensor_bytes(p) for _, p in params),
        optimizer_state=state,
        activations=trace(model),
        notes=notes,
    )


# ---- the table ------------------------------------------------------------------------------------------------------


def format_estimate(result: Mapping[str, Any] | Iterable[Mapping[str, Any]]) -> str:
    """A Markdown table (MB) of one estimate or several (one row each), with the settings under it."""
    results = [result] if isinstance(result, Mapping) else list(result)
    if not results:
        raise ValueError("format_estimate needs at least one estimate")
    header = "| method | weights | gradients | optimizer state | activations | total |"
    lines = [header, "|---|---:|---:|---:|---:|---:|"]
    for r in results:
        label = r["method"]
        options = {
            k: v
            for k, v in r["method_config"].items()
            if k in ("rank", "optimizer", "layerwise", "sparsity", "quant", "num_groups")
        }
        if options:
            label += " (" + ", ".join(f"{k}={v}" for k, v in options.items()) + ")"
        cells = [r[k] / MB for k in ("weights", "gradients", "optimizer_state", "activations", "total")]
        lines.append(f"| {label} | " + " | ".join(f"{c:,.1f}" for c in cells) + " |")
    first = results[0]
    lines.append(
        f"\nEstimated MB (2^20 bytes) for {first['model']} ({first['model_type']}, {first['num_parameters'] / 1e6:.1f}M"
        f" parameters, {first['task']}), {first['dtype']}, batch {first['batch']} x seq {first['seq']}; "
        "activations = unique tensors saved for backward."
    )
    for r in results:
        for note in r["notes"]:
            lines.append(f"- {r['method']}: {note}")
    return "\n".join(lines)
