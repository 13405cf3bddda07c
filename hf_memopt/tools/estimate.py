"""Predicted training memory per method, from a model config alone (no weights are loaded).

The model is built on the ``meta`` device, so every parameter shape is exact and nothing is allocated. Then:

* ``parameters`` / ``buffers``: bytes of the ``nn.Parameter`` storages after the method's model transform (LoQT's B
  factors and untouched layers), plus the method's frozen storage kept as buffers (LoQT's quantized weights and
  projections, VeLoRA's v vectors). ``weights`` is their sum;
* ``gradients``: the peak of live ``.grad`` bytes: the trainable parameters (the selected blocks for BlockLLM, the
  largest single gradient for layer-wise GaLore, none for zeroth-order training);
* ``optimizer_state``: the optimizer's tensors, computed per parameter with the same rules as the optimizers
  (AdamW moments and step counters, bitsandbytes' block-wise 8-bit states with one float32 absmax per 256 values and
  float32 states for embeddings and tensors under 4096 values, GaLore's low-rank moments and projectors);
* ``activations``: a forward pass on meta tensors traced under ``torch.autograd.graph.saved_tensors_hooks``, counting
  each storage saved for backward once and leaving parameters out: the same rule as
  :class:`hf_memopt.tools.memory.SavedActivationMeter`, so the estimate and the measurement agree on what is counted. The
  method's model transform is applied first (frozen embeddings for BlockLLM, VeLoRA's compressed inputs, LoQT's
  adapter path, both for an ordinary step and for a merge step); zeroth-order training saves nothing.

``estimate_memory(...)`` returns a dict of byte counts plus what was targeted; ``format_estimate`` turns one or more
of them into a Markdown table like the papers' memory tables.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["ESTIMATE_METHODS", "estimate_memory", "format_estimate", "load_model_config"]

MB = 2**20
ESTIMATE_METHODS = ("adamw", "adamw_8bit", "galore", "blockllm", "loqt", "velora", "zo")
TASKS = ("causal-lm", "sequence-classification")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}
_BNB_MIN_8BIT_SIZE = 4096  # bitsandbytes' default: smaller tensors keep 32-bit states
_BNB_BLOCK = 256  # bitsandbytes' block size of 8-bit optimizer states (one float32 absmax per block)
_BNB_QMAPS = 2 * 256 * 4  # the signed and unsigned dynamic code tables, shared by all parameters
_STEP_TENSOR = 4  # torch.optim.AdamW keeps a 0-d float32 step counter per parameter


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


def _unique_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    seen: set[int] = set()
    out = []
    for name, p in model.named_parameters():
        if id(p) not in seen:
            seen.add(id(p))
            out.append((name, p))
    return out


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


# ---- activations ----------------------------------------------------------------------------------------------------


class _MetaSavedCounter:
    """``SavedActivationMeter`` for meta tensors: storages are identified by their StorageImpl (meta storages have
    no data pointer); parameters are excluded. The packed tensors stay referenced, so no identity is reused."""

    def __init__(self, model: nn.Module):
        self._exclude = {p.untyped_storage()._cdata for p in model.parameters()}
        self._seen: set[int] = set()
        self._keep: list[torch.Tensor] = []
        self.total = 0

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        key = t.untyped_storage()._cdata
        if key not in self._seen and key not in self._exclude:
            self._seen.add(key)
            self._keep.append(t)
            self.total += t.untyped_storage().nbytes()
        return t

    def trace(self, model: nn.Module, inputs: dict[str, torch.Tensor]) -> int:
        with _fused_attention_on_meta(), torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t):
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


class _fused_attention_on_meta:
    """Context manager: ``F.scaled_dot_product_attention`` on meta tensors behaves like the fused kernels, and
    transformers' mask preparation skips its data-dependent packed-sequence check."""

    def __enter__(self):
        self._original = original = torch.nn.functional.scaled_dot_product_attention

        def sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
            if query.device.type != "meta" or dropout_p > 0.0:
                return original(
                    query,
                    key,
                    value,
                    attn_mask=attn_mask,
                    dropout_p=dropout_p,
                    is_causal=is_causal,
                    scale=scale,
                    enable_gqa=enable_gqa,
                )
            return _FusedAttention.apply(query, key, value, attn_mask, is_causal, scale, enable_gqa, original)

        torch.nn.functional.scaled_dot_product_attention = sdpa
        # transformers looks for packed sequences in position_ids (a data-dependent check meta tensors cannot answer);
        # the trace's sequences are never packed
        from transformers import masking_utils

        self._find_packed = find_packed = getattr(masking_utils, "find_packed_sequence_indices", None)
        if find_packed is not None:
            masking_utils.find_packed_sequence_indices = lambda position_ids: (
                None if position_ids.device.type == "meta" else find_packed(position_ids)
            )
        return self

    def __exit__(self, *exc):
        torch.nn.functional.scaled_dot_product_attention = self._original
        if self._find_packed is not None:
            from transformers import masking_utils

            masking_utils.find_packed_sequence_indices = self._find_packed


def _inputs(task: str, batch: int, seq: int) -> dict[str, torch.Tensor]:
    ids = torch.zeros(batch, seq, dtype=torch.long, device="meta")
    labels = ids if task == "causal-lm" else torch.zeros(batch, dtype=torch.long, device="meta")
    return {"input_ids": ids, "labels": labels}


def _saved_activations(model: nn.Module, task: str, batch: int, seq: int) -> int:
    return _MetaSavedCounter(model).trace(model, _inputs(task, batch, seq))


def _meta_velora_forward(module: nn.Linear, cache: dict[int, torch.Tensor] | None, config):
    """VeLoRA's forward on meta tensors: the real autograd function, coefficients shared between layers reading the
    same input (what ``hf_memopt.velora`` does when their v agree: every init except ``random``)."""
    from hf_memopt.velora.function import VeLoRALinearFunction, compress
    from hf_memopt.velora.layer import BUFFER_NAME

    coefficient_dtype = getattr(torch, config.coefficient_dtype)
    original = nn.Linear.forward.__get__(module)

    def forward(x: torch.Tensor) -> torch.Tensor:
        if not (module.training and torch.is_grad_enabled() and module.weight.requires_grad):
            return original(x)
        v = getattr(module, BUFFER_NAME)
        coefficients = cache.get(id(x)) if cache is not None else None
        if coefficients is None:
            coefficients = compress(x.detach(), v, config.num_groups, coefficient_dtype)
            if cache is not None:
                cache[id(x)] = coefficients
        return VeLoRALinearFunction.apply(
            x, module.weight, module.bias, v, config.num_groups, config.scale, coefficient_dtype, coefficients
        )

    return forward


# ---- optimizer state rules (mirroring the optimizers) -------------------------------------------------------------


def _adamw_state(params: Iterable[torch.Tensor]) -> int:
    """torch.optim.AdamW: two moments in the parameter's dtype and a float32 step tensor per parameter."""
    return sum(2 * _nbytes(p) + _STEP_TENSOR for p in params)


def _blockwise_8bit(numel: int) -> int:
    return 2 * numel + 2 * 4 * math.ceil(numel / _BNB_BLOCK)


def _bnb_adamw8bit_state(model: nn.Module, params: list[tuple[str, nn.Parameter]]) -> int:
    """bitsandbytes AdamW8bit as the Trainer builds it (``optim="adamw_bnb_8bit"``): embeddings forced to 32-bit
    states, tensors under 4096 values 32-bit, the rest uint8 states with block-wise absmax, code tables shared."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    total, any_8bit = 0, False
    for _, p in params:
        if id(p) in embeddings or p.numel() < _BNB_MIN_8BIT_SIZE:
            total += 2 * 4 * p.numel()
        else:
            total += _blockwise_8bit(p.numel())
            any_8bit = True
    return total + (_BNB_QMAPS if any_8bit else 0)


def _galore_rule_state(shape: tuple[int, ...], dtype: torch.dtype, optimizer: str, min_8bit_size: int = 4096) -> int:
    numel = math.prod(shape)
    elsize = torch.empty((), dtype=dtype).element_size()
    if optimizer == "adamw":
        return 2 * numel * elsize
    if optimizer == "adamw_8bit":
        return 2 * 4 * numel if numel < min_8bit_size else _blockwise_8bit(numel)
    if len(shape) >= 2:  # adafactor: factored second moment
        return 4 * (math.prod(shape[:-1]) + math.prod(shape[:-2] + shape[-1:]))
    return 4 * numel


# ---- the estimate ---------------------------------------------------------------------------------------------------


def _method_config(method: str, rank: int | None, method_kwargs: dict[str, Any]):
    from hf_memopt.core.registry import METHODS

    if method in ("adamw", "adamw_8bit"):
        if rank is not None or method_kwargs:
            raise ValueError(f"method {method!r} takes no rank or options; got rank={rank}, {method_kwargs}")
        return None
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(ESTIMATE_METHODS)}")
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
            registered method: ``galore``, ``blockllm``, ``loqt``, ``velora``, ``zo``.
        rank: the method's rank (GaLore, LoQT); ``None`` keeps the config default.
        batch, seq: micro-batch size and sequence length of the activations.
        dtype: dtype of the weights (and of the activations): ``float32``, ``bfloat16``, ``float16``, ``float64``.
        task: ``causal-lm`` or ``sequence-classification``; ``None`` picks from the config (encoders classify).
        num_labels: classes of the classification head.
        **method_kwargs: fields of the method's config (``optimizer="adamw_8bit"``, ``layerwise=True``,
            ``target_modules=...``, ``sparsity=0.9``, ``quant="nf4"``, ``num_groups=32`` ...), and the training-side
            settings of :mod:`hf_memopt.tools.estimate_settings` (``freeze_modules``, ``frozen_dtype``,
            ``loss_chunk_size``, ``gradient_checkpointing``, ``optim``).

    Returns a dict with the byte counts ``parameters``, ``buffers``, ``weights``, ``gradients``, ``optimizer_state``,
    ``activations``, ``total``; parameter counts; the method config used; and ``targets`` (the modules the method
    projects, quantizes or compresses). Raises ``ValueError`` for an unknown method, option or model.
    """
    if method not in ESTIMATE_METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(ESTIMATE_METHODS)}")
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
    all_params = _unique_parameters(model)
    result: dict[str, Any] = {
        "model": str(config_or_id) if not hasattr(config_or_id, "to_dict") else model_config.model_type,
        "model_type": model_config.model_type,
        "task": task,
        "method": method,
        "method_config": asdict(config) if config is not None else {},
        "dtype": dtype,
        "batch": batch,
        "seq": seq,
        "num_parameters": sum(p.numel() for _, p in all_params),
        "buffers": 0,
        "targets": [],
        "notes": [],
    }
    estimator = {
        "adamw": _estimate_adamw,
        "adamw_8bit": _estimate_adamw,
        "galore": _estimate_galore,
        "blockllm": _estimate_blockllm,
        "loqt": _estimate_loqt,
        "velora": _estimate_velora,
        "zo": _estimate_zo,
    }[method]
    estimator(result, model, config)
    stock_optimizer_state(result, model, training_settings)
    result["training_settings"] = training_settings
    result["weights"] = result["parameters"] + result["buffers"]
    result["total"] = result["weights"] + result["gradients"] + result["optimizer_state"] + result["activations"]
    return result


def _common(result: dict[str, Any], model: nn.Module, trainable: list[tuple[str, nn.Parameter]]) -> None:
    result["parameters"] = sum(_nbytes(p) for _, p in _unique_parameters(model))
    result["trainable_parameters"] = sum(p.numel() for _, p in trainable)
    result["gradients"] = sum(_nbytes(p) for _, p in trainable)


def _trace(result: dict[str, Any], model: nn.Module) -> int:
    return _saved_activations(model, result["task"], result["batch"], result["seq"])


def _estimate_adamw(result, model, config) -> None:
    params = _unique_parameters(model)
    _common(result, model, params)
    if result["method"] == "adamw":
        result["optimizer_state"] = _adamw_state(p for _, p in params)
    else:
        result["optimizer_state"] = _bnb_adamw8bit_state(model, params)
        result["notes"].append("bitsandbytes keeps float32 states for nn.Embedding and tensors under 4096 values")
    result["activations"] = _trace(result, model)


def _estimate_galore(result, model, config) -> None:
    from hf_memopt.galore.builder import galore_target_parameters
    from hf_memopt.shared.projector import projection_sides

    params = _unique_parameters(model)
    _common(result, model, params)
    targets = galore_target_parameters(model, config)
    target_ids = {id(p) for p in targets.values()}
    result["targets"] = sorted(n.removesuffix(".weight") for n in targets)
    state = 0
    projected = 0
    for _, p in params:
        if id(p) not in target_ids:
            state += _galore_rule_state(tuple(p.shape), p.dtype, config.optimizer)
            continue
        projected += p.numel()
        m, n = p.shape
        compute = torch.float64 if p.dtype == torch.float64 else torch.float32  # projection runs in >= float32
        elsize = torch.empty((), dtype=compute).element_size()
        left, right = projection_sides(config.proj_type, (m, n))
        rank = min(config.rank, m, n)  # capped at the smaller side, as the optimizer does
        low_m, low_n = (rank if left else m), (rank if right else n)
        state += _galore_rule_state((low_m, low_n), compute, config.optimizer)
        state += elsize * ((m * rank if left else 0) + (rank * n if right else 0))
    result["optimizer_state"] = state
    result["projected_parameters"] = projected
    if config.layerwise:
        # each gradient is consumed by its own hook and freed at once: one parameter's gradient is alive at a time
        result["gradients"] = max(_nbytes(p) for _, p in params)
        result["notes"].append("layer-wise: gradients freed inside backward (accumulation would keep R per weight)")
    result["notes"].append(
        f"GaLore projects {projected / max(result['trainable_parameters'], 1):.0%} of the trainable parameters"
    )
    result["activations"] = _trace(result, model)


def _estimate_blockllm(result, model, config) -> None:
    from hf_memopt.blockllm.blocks import build_blocks, select_blocks, selection_budget

    blocks, trainable = build_blocks(model, config.block_granularity, config.train_embeddings)
    if not blocks:
        raise ValueError("BlockLLM selection would be empty: the model has no selectable parameter")
    budget = selection_budget(config.sparsity, blocks)
    sizes = torch.tensor([b.numel for b in blocks], dtype=torch.long)
    # Which blocks win depends on gradient norms; with similar per-coordinate magnitudes ||G_b|| grows as
    # sqrt(numel), the proxy used here to run the paper's greedy selection under the budget.
    chosen = select_blocks(sizes.double().sqrt(), torch.zeros_like(sizes), 0, sizes, budget, config.visit_penalty)
    selected = [p for b, c in zip(blocks, chosen.tolist(), strict=True) if c for p in b.params]
    params = _unique_parameters(model)
    result["parameters"] = sum(_nbytes(p) for _, p in params)
    result["trainable_parameters"] = sum(p.numel() for p in selected)
    result["gradients"] = sum(_nbytes(p) for p in selected)
    state = 0
    for p in selected:
        moment = p.dtype if p.dtype in (torch.float32, torch.float64) else torch.float32
        if config.optimizer == "adamw_8bit" and p.numel() >= config.min_8bit_size:
            state += _blockwise_8bit(p.numel())
        else:
            state += 2 * p.numel() * torch.empty((), dtype=moment).element_size()
        if config.mask_fraction < 1.0:
            state += p.numel()  # the bool top-k mask
    result["optimizer_state"] = state
    result["targets"] = [b.name for b, c in zip(blocks, chosen.tolist(), strict=True) if c]
    result["notes"].append(
        f"BlockLLM budget {budget} of {sum(b.numel for b in blocks)} selectable parameters ({trainable} trainable); "
        f"{result['trainable_parameters']} selected"
        " (the blocks with the largest gradient norms; sqrt(size) used as their proxy)"
    )
    # The activation peak is a scoring step: every selectable block needs its gradient, embeddings stay frozen.
    selectable = {id(p) for b in blocks for p in b.params}
    for p in model.parameters():
        p.requires_grad_(id(p) in selectable)
    result["activations"] = _trace(result, model)


def _estimate_loqt(result, model, config) -> None:
    from hf_memopt.loqt.builder import convert_to_loqt
    from hf_memopt.loqt.layer import LoQTLinear

    # Built with quant=None on meta (bitsandbytes cannot quantize meta tensors): the forward saves the same tensors;
    # the quantized storage is counted from the shapes below.
    surrogate = type(config)(**{**asdict(config), "quant": None, "quantize_projection": False})
    layers = convert_to_loqt(model, surrogate)
    params = [(n, p) for n, p in _unique_parameters(model) if p.requires_grad]
    _common(result, model, params)
    result["optimizer_state"] = _adamw_state(p for _, p in params)
    if config.layerwise:
        # each gradient is consumed by its own hook and freed at once: one parameter's gradient is alive at a time
        result["gradients"] = max(_nbytes(p) for _, p in params)
        result["notes"].append("layer-wise: gradients freed inside backward (accumulation keeps every gradient)")
    buffers = 0
    for layer in layers.values():
        numel = layer.in_features * layer.out_features
        elsize = torch.empty((), dtype=layer.weight_dtype).element_size()
        proj_numel = layer.rank * (layer.out_features if layer.side == "left" else layer.in_features)
        buffers += _quantized_bytes(numel, config.quant, config.quant_block_size, elsize)
        q = config.quant if config.quantize_projection else None
        buffers += _quantized_bytes(proj_numel, q, config.quant_block_size, elsize)
        buffers += 8  # the merge counter
    result["buffers"] = buffers
    result["targets"] = sorted(layers)
    result["notes"].append(f"LoQT: {len(layers)} layers with {config.quant or 'unquantized'} frozen weights")
    peaks = []
    for collecting in (False, True):  # an ordinary step and a merge step (which saves x for the weight gradient)
        for layer in model.modules():
            if isinstance(layer, LoQTLinear):
                layer.collecting = collecting
        peaks.append(_trace(result, model))
    result["activations"] = max(peaks)


def _quantized_bytes(numel: int, quant: str | None, block: int, elsize: int) -> int:
    if quant is None:
        return numel * elsize
    codes = math.ceil(numel / 2) if quant in ("nf4", "fp4") else numel
    return codes + 4 * math.ceil(numel / block)


def _estimate_velora(result, model, config) -> None:
    from hf_memopt.velora.builder import apply_velora

    params = _unique_parameters(model)
    _common(result, model, params)
    result["optimizer_state"] = _adamw_state(p for _, p in params)
    targets = apply_velora(model, config)
    result["targets"] = sorted(targets)
    result["buffers"] = sum(4 * (m.in_features // config.num_groups) for m in targets.values())
    cache: dict[int, torch.Tensor] | None = {} if config.init != "random" else None
    for module in targets.values():
        module.forward = _meta_velora_forward(module, cache, config)
    result["activations"] = _trace(result, model)
    result["notes"].append(
        f"VeLoRA compresses the inputs of {len(targets)} Linear layers to {config.num_groups} values/token"
    )


def _estimate_zo(result, model, config) -> None:
    params = _unique_parameters(model)
    result["parameters"] = sum(_nbytes(p) for _, p in params)
    result["trainable_parameters"] = sum(p.numel() for _, p in params)
    result["gradients"] = 0
    result["optimizer_state"] = 8 * config.n_samples  # the float64 projected gradients; z is regenerated
    result["activations"] = 0  # both forwards run under no_grad: nothing is saved for a backward
    if config.offload == "cpu":
        result["notes"].append("ZO2 offload: the blocks live in host memory; the device holds about one block")


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
