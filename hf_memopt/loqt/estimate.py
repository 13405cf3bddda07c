"""LoQT's memory for the estimator (``hf_memopt.tools.estimate``): the model converted as the builder converts it,
the quantized storage counted from the shapes."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict

from torch import nn

from hf_memopt.loqt.builder import convert_to_loqt
from hf_memopt.loqt.config import LoQTConfig
from hf_memopt.loqt.layer import LoQTLinear
from hf_memopt.shared.estimate import (
    MemoryEstimate,
    adamw_state_bytes,
    parameter_bytes,
    tensor_bytes,
    unique_parameters,
)

__all__ = ["estimate_loqt"]


def _quantized_bytes(numel: int, quant: str | None, block: int, elsize: int) -> int:
    """``numel`` values: 4-bit codes two per byte (nf4, fp4) or one byte each (int8), plus one float32 absmax per
    block; unquantized, ``elsize`` bytes each."""
    if quant is None:
        return numel * elsize
    codes = math.ceil(numel / 2) if quant in ("nf4", "fp4") else numel
    return codes + 4 * math.ceil(numel / block)


def estimate_loqt(model: nn.Module, config: LoQTConfig, trace: Callable[[nn.Module], int]) -> MemoryEstimate:
    """Trainable B factors (and the layers LoQT leaves alone) with AdamW state; W and P as quantized buffers; the
    activation peak of an ordinary step and of a merge step (which saves x for the weight gradient)."""
    # Built with quant=None on meta (bitsandbytes cannot quantize meta tensors): the forward saves the same tensors;
    # the quantized storage is counted from the shapes below.
    surrogate = type(config)(**{**asdict(config), "quant": None, "quantize_projection": False})
    layers = convert_to_loqt(model, surrogate)
    params = [(n, p) for n, p in unique_parameters(model) if p.requires_grad]
    gradients = sum(tensor_bytes(p) for _, p in params)
    notes = []
    if config.layerwise:
        # each gradient is consumed by its own hook and freed at once: one parameter's gradient is alive at a time
        gradients = max(tensor_bytes(p) for _, p in params)
        notes.append("layer-wise: gradients freed inside backward (accumulation keeps every gradient)")
    buffers = 0
    for layer in layers.values():
        numel = layer.in_features * layer.out_features
        elsize = layer.weight_dtype.itemsize
        proj_numel = layer.rank * (layer.out_features if layer.side == "left" else layer.in_features)
        buffers += _quantized_bytes(numel, config.quant, config.quant_block_size, elsize)
        q = config.quant if config.quantize_projection else None
        buffers += _quantized_bytes(proj_numel, q, config.quant_block_size, elsize)
        buffers += 8  # the merge counter
    notes.append(f"LoQT: {len(layers)} layers with {config.quant or 'unquantized'} frozen weights")
    if config.quant is not None and config.init_weight == "full_precision":
        kept = sum(layer.in_features * layer.out_features * layer.weight_dtype.itemsize for layer in layers.values())
        notes.append(f"update 0 (the initialisation) also holds the full-precision weights, {kept / 2**20:.1f} MiB, "
                     "not counted here; init_weight='quantized' drops them at attach")
    peaks = []
    for collecting in (False, True):  # an ordinary step and a merge step (which saves x for the weight gradient)
        for layer in model.modules():
            if isinstance(layer, LoQTLinear):
                layer.collecting = collecting
        peaks.append(trace(model))
    return MemoryEstimate(
        parameters=parameter_bytes(model),
        trainable_parameters=sum(p.numel() for _, p in params),
        gradients=gradients,
        optimizer_state=adamw_state_bytes(p for _, p in params),
        activations=max(peaks),
        buffers=buffers,
        targets=sorted(layers),
        notes=notes,
    )
