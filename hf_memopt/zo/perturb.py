"""Perturbation directions regenerated from seeds, one tensor at a time (MeZO, Algorithm 1).

z for parameter ``index`` under seed ``s`` is drawn from a generator seeded with ``mix(s, index)``: each tensor's
direction depends only on (seed, index), never on the order tensors are visited. That is what lets ZO2's offloaded
path apply perturbations and updates block by block, in a different order than plain MeZO, with the same z.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["apply_zo_update_", "mix_seed", "perturb_", "perturbation"]

_MASK64 = (1 << 64) - 1


def mix_seed(*values: int) -> int:
    """A 63-bit seed from integers (splitmix64 finaliser over each value), stable across runs and platforms."""
    x = 0x9E3779B97F4A7C15
    for v in values:
        x = (x ^ (int(v) & _MASK64)) & _MASK64
        x = (x + 0x9E3779B97F4A7C15) & _MASK64
        x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
        x ^= x >> 31
    return x & ((1 << 63) - 1)


def perturbation(like: torch.Tensor, seed: int, index: int) -> torch.Tensor:
    """z ~ N(0, I) shaped and typed like ``like``, on its device, determined by ``(seed, index)``."""
    generator = torch.Generator(device=like.device).manual_seed(mix_seed(seed, index))
    return torch.randn(like.shape, generator=generator, device=like.device, dtype=like.dtype)


def perturb_(params: Sequence[tuple[int, torch.Tensor]], seed: int, scale: float) -> None:
    """``p += scale * z(seed, index)`` in place for each ``(index, p)``; one z alive at a time."""
    for index, p in params:
        p.data.add_(perturbation(p.data, seed, index), alpha=scale)


def apply_zo_update_(
    p: torch.Tensor,
    index: int,
    seeds: Sequence[int],
    coefficients: Sequence[float],
    lr: float,
    weight_decay: float,
) -> None:
    """MeZO-SGD update of one tensor: ``p -= lr * (sum_k c_k z_k + weight_decay * p)``.

    ``c_k`` is the k-th projected gradient divided by the number of samples, so n > 1 averages the SPSA estimates.
    """
    data = p.data
    if weight_decay:
        data.mul_(1.0 - lr * weight_decay)
    for seed, c in zip(seeds, coefficients):
        if c:
            data.add_(perturbation(data, seed, index), alpha=-lr * c)
