"""VeLoRA's memory for the estimator (``hf_memopt.tools.estimate``): the compressed forward traced on meta tensors."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from hf_memopt.shared.estimate import (
    MemoryEstimate,
    adamw_state_bytes,
    parameter_bytes,
    tensor_bytes,
    unique_parameters,
)
from hf_memopt.velora.builder import apply_velora
from hf_memopt.velora.config import VeLoRAConfig
from hf_memopt.velora.function import VeLoRALinearFunction, compress
from hf_memopt.velora.layer import BUFFER_NAME

__all__ = ["estimate_velora"]


def _meta_forward(module: nn.Linear, cache: dict[int, torch.Tensor] | None, config: VeLoRAConfig):
    """VeLoRA's forward on meta tensors: the real autograd function, coefficients shared between layers reading the
    same input (what ``hf_memopt.velora`` does when their v agree: every init except ``random``)."""
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


def estimate_velora(model: nn.Module, config: VeLoRAConfig, trace: Callable[[nn.Module], int]) -> MemoryEstimate:
    """AdamW on every parameter; the targeted Linear layers save num_groups coefficients per token instead of their
    input (Sec. 3.2), plus one float32 v of in_features / num_groups values each."""
    params = unique_parameters(model)
    parameters = parameter_bytes(model)
    targets = apply_velora(model, config)
    cache: dict[int, torch.Tensor] | None = {} if config.init != "random" else None
    for module in targets.values():
        module.forward = _meta_forward(module, cache, config)
    return MemoryEstimate(
        parameters=parameters,
        trainable_parameters=sum(p.numel() for _, p in params),
        gradients=sum(tensor_bytes(p) for _, p in params),
        optimizer_state=adamw_state_bytes(p for _, p in params),
        activations=trace(model),
        buffers=sum(4 * (m.in_features // config.num_groups) for m in targets.values()),
        targets=sorted(targets),
        notes=[f"VeLoRA compresses the inputs of {len(targets)} Linear layers to {config.num_groups} values/token"],
    )
