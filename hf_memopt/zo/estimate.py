"""Zeroth-order training's memory for the estimator (``hf_memopt.tools.estimate``)."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from hf_memopt.shared.estimate import MemoryEstimate, parameter_bytes, unique_parameters
from hf_memopt.zo.config import ZOConfig

__all__ = ["estimate_zo"]


def estimate_zo(model: nn.Module, config: ZOConfig, trace: Callable[[nn.Module], int]) -> MemoryEstimate:
    """The weights and the n float64 projected gradients: z is regenerated from its seed, and both forwards run
    under ``no_grad``, so there are no gradients and nothing is saved for a backward (MeZO, Sec. 2)."""
    notes = []
    if config.offload == "cpu":
        notes.append("ZO2 offload: the blocks live in host memory; the device holds about one block")
    return MemoryEstimate(
        parameters=parameter_bytes(model),
        trainable_parameters=sum(p.numel() for _, p in unique_parameters(model)),
        gradients=0,
        optimizer_state=8 * config.n_samples,
        activations=0,
        notes=notes,
    )
