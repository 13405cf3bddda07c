"""GaLore's memory for the estimator (``hf_memopt.tools.estimate``): the rules of :mod:`hf_memopt.galore.optimizer`
applied to each parameter's shape."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from hf_memopt.galore.builder import galore_target_parameters
from hf_memopt.galore.config import GaLoreConfig
from hf_memopt.shared.estimate import MemoryEstimate, blockwise_8bit_bytes, tensor_bytes, unique_parameters
from hf_memopt.shared.projector import projection_sides

__all__ = ["estimate_galore"]


def _state_bytes(shape: tuple[int, ...], dtype: torch.dtype, config: GaLoreConfig, min_8bit_size: int = 4096) -> int:
    """The inner optimizer's state for one tensor of ``shape``: AdamW's two moments, the 8-bit block-wise moments
    (32-bit under ``min_8bit_size`` values), or Adafactor's factored second moment plus, with ``adafactor_beta1``,
    a full first moment (``GaLoreAdafactor._init_rule_state``)."""
    optimizer = config.optimizer
    numel = math.prod(shape)
    state_size = 8 if dtype == torch.float64 else 4  # float32 state for half and float32 weights (_state_dtype)
    if optimizer == "adamw":
        return 2 * numel * state_size
    if optimizer == "adamw_8bit":
        return 2 * 4 * numel if numel < min_8bit_size else blockwise_8bit_bytes(numel)
    first_moment = state_size * numel if config.adafactor_beta1 is not None else 0
    if len(shape) >= 2:  # factored second moment: one row and one column vector
        return state_size * (math.prod(shape[:-1]) + math.prod(shape[:-2] + shape[-1:])) + first_moment
    return state_size * numel + first_moment


def estimate_galore(model: nn.Module, config: GaLoreConfig, trace: Callable[[nn.Module], int]) -> MemoryEstimate:
    """Every parameter trains; a targeted m x n weight keeps its moments in the rank-r space plus its projector(s)
    (Sec. 3 of the paper: (mr + 2nr) instead of 2mn for a left projection), the others full moments."""
    params = unique_parameters(model)
    targets = galore_target_parameters(model, config)
    target_ids = {id(p) for p in targets.values()}
    state = 0
    projected = 0
    for _, p in params:
        if id(p) not in target_ids:
            state += _state_bytes(tuple(p.shape), p.dtype, config)
            continue
        projected += p.numel()
        m, n = p.shape
        compute = torch.float64 if p.dtype == torch.float64 else torch.float32  # projection runs in >= float32
        elsize = torch.empty((), dtype=compute).element_size()
        left, right = projection_sides(config.proj_type, (m, n))
        rank = min(config.rank, m, n)  # capped at the smaller side, as the optimizer does
        low_m, low_n = (rank if left else m), (rank if right else n)
        state += _state_bytes((low_m, low_n), compute, config)
        state += elsize * ((m * rank if left else 0) + (rank * n if right else 0))
    trainable = sum(p.numel() for _, p in params)
    gradients = sum(tensor_bytes(p) for _, p in params)
    notes = []
    if config.layerwise:
        # each gradient is consumed by its own hook and freed at once: one parameter's gradient is alive at a time
        gradients = max(tensor_bytes(p) for _, p in params)
        notes.append("layer-wise: gradients freed inside backward (accumulation would keep R per weight)")
    notes.append(f"GaLore projects {projected / max(trainable, 1):.0%} of the trainable parameters")
    return MemoryEstimate(
        parameters=sum(tensor_bytes(p) for _, p in params),
        trainable_parameters=trainable,
        gradients=gradients,
        optimizer_state=state,
        activations=trace(model),
        targets=sorted(n.removesuffix(".weight") for n in targets),
        notes=notes,
        extra={"projected_parameters": projected},
    )
