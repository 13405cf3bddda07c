"""What a method's memory estimate returns, and the byte rules several optimizers share.

A method registers ``estimate(model, config, trace) -> MemoryEstimate`` (``register_method(..., estimate=...)``);
:func:`hf_memopt.tools.estimate.estimate_memory` builds the model on the ``meta`` device, calls the hook and adds the
parts up. The hook may transform ``model`` as the method's builder would (replace layers, freeze parameters) and
calls ``trace(model)`` for the bytes one forward of the model as it then is saves for backward (parameters left
out), at the batch size, sequence length and task the estimate was asked for.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

__all__ = [
    "BNB_BLOCK",
    "MemoryEstimate",
    "adamw_state_bytes",
    "blockwise_8bit_bytes",
    "parameter_bytes",
    "tensor_bytes",
    "unique_parameters",
]

BNB_BLOCK = 256  # bitsandbytes' block size of 8-bit optimizer states (one float32 absmax per block)
_STEP_TENSOR = 4  # torch.optim.AdamW keeps a 0-d float32 step counter per parameter


@dataclass
class MemoryEstimate:
    """One method's predicted memory of a training step, in bytes (``trainable_parameters`` counts values).

    Args:
        parameters: the ``nn.Parameter`` storages after the method's model transform.
        trainable_parameters: values that get a gradient and an update.
        gradients: the peak of live ``.grad`` bytes.
        optimizer_state: the optimizer's tensors.
        activations: tensors saved for backward (``trace(model)``), at their peak.
        buffers: frozen storage the method keeps as buffers (quantized weights, projections).
        targets: the modules the method projects, quantizes, selects or compresses.
        notes: one line each, printed under the estimator's table.
        extra: further method-specific figures, added to the estimator's result as they are.
    """

    parameters: int
    trainable_parameters: int
    gradients: int
    optimizer_state: int
    activations: int
    buffers: int = 0
    targets: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)


def unique_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """``model.named_parameters()`` with each tied parameter once (under its first name)."""
    seen: set[int] = set()
    out = []
    for name, p in model.named_parameters():
        if id(p) not in seen:
            seen.add(id(p))
            out.append((name, p))
    return out


def tensor_bytes(t: torch.Tensor) -> int:
    """Bytes of ``t``'s values (a meta tensor's too)."""
    return t.numel() * t.element_size()


def parameter_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters, tied ones once."""
    return sum(tensor_bytes(p) for _, p in unique_parameters(model))


def adamw_state_bytes(params: Iterable[torch.Tensor]) -> int:
    """torch.optim.AdamW: two moments in the parameter's dtype and a float32 step tensor per parameter."""
    return sum(2 * tensor_bytes(p) + _STEP_TENSOR for p in params)


def blockwise_8bit_bytes(numel: int) -> int:
    """Two uint8 moments of ``numel`` values with one float32 absmax per block of 256 each (bitsandbytes' 8-bit
    optimizers, and hf_memopt's own 8-bit states)."""
    return 2 * numel + 2 * 4 * math.ceil(numel / BNB_BLOCK)
