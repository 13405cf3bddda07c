"""Block-wise 8-bit Adam moments (Dettmers et al. 2022, arXiv 2110.02861) through bitsandbytes' fused kernel.

Shared by the optimizers that keep 8-bit state (GaLore, BlockLLM): each moment is a uint8 tensor of dynamic-map codes
with one float32 absmax per 256 values; the kernel runs on CPU and CUDA (bitsandbytes >= 0.45).

bitsandbytes keeps tensors under ``min_8bit_size`` (4096) values in 32-bit state and steps them with its 32-bit Adam
(``optimizer_update_32bit``); ``adam_32bit_direction`` is that update, so small tensors step as in
``bitsandbytes.optim.AdamW8bit``.
"""

from __future__ import annotations

import math
from typing import Any

import torch

__all__ = ["BLOCK_SIZE", "adam_32bit_direction", "adam_8bit_direction", "init_8bit_moments"]

BLOCK_SIZE = 256
_QMAPS: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}


def _qmaps(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The signed (first moment) and unsigned (second moment) dynamic quantization maps, one copy per device."""
    if device not in _QMAPS:
        import bitsandbytes.functional as bnbf

        _QMAPS[device] = (
            bnbf.create_dynamic_map(signed=True).to(device),
            bnbf.create_dynamic_map(signed=False).to(device),
        )
    return _QMAPS[device]


def init_8bit_moments(state: dict[str, Any], like: torch.Tensor) -> None:
    """Zero uint8 moments ``state1``/``state2`` shaped like ``like`` and their block absmax tables."""
    blocks = math.ceil(like.numel() / BLOCK_SIZE)
    state["state1"] = torch.zeros_like(like, dtype=torch.uint8)
    state["state2"] = torch.zeros_like(like, dtype=torch.uint8)
    state["absmax1"] = torch.zeros(blocks, dtype=torch.float32, device=like.device)
    state["absmax2"] = torch.zeros(blocks, dtype=torch.float32, device=like.device)


def adam_8bit_direction(
    state: dict[str, Any], grad: torch.Tensor, betas: tuple[float, float], eps: float, step: int
) -> torch.Tensor:
    """Update the 8-bit moments with ``grad`` and return Adam's bias-corrected direction (the update for lr = 1)."""
    import bitsandbytes.functional as bnbf

    grad32 = grad.float().contiguous()
    qmap1, qmap2 = _qmaps(grad32.device)
    # The fused kernel updates a parameter in place: run it on a zero buffer with lr=1 to read the direction.
    buffer = torch.zeros_like(grad32)
    bnbf.optimizer_update_8bit_blockwise(
        "adam", grad32, buffer, state["state1"], state["state2"], betas[0], betas[1], 0.0, 0.0, eps,
        step, 1.0, qmap1, qmap2, state["absmax1"], state["absmax2"], 0.0, 1.0, False,
    )  # fmt: skip
    return buffer.neg_()


def adam_32bit_direction(
    state: dict[str, Any], grad: torch.Tensor, betas: tuple[float, float], eps: float, step: int
) -> tuple[torch.Tensor, float]:
    """bitsandbytes' 32-bit Adam on full-precision moments ``exp_avg``/``exp_avg_sq``: ``(direction, multiplier)``.

    The update for lr = 1 is -multiplier * direction with direction m / (sqrt(v) + eps sqrt(1 - b2^t)) and multiplier
    sqrt(1 - b2^t) / (1 - b1^t): eps is added to sqrt(v_hat), the convention of bitsandbytes' CPU and CUDA 32-bit
    kernels (and ``torch.optim.AdamW``). The moments keep their own dtype (float64 moments stay float64).
    """
    beta1, beta2 = betas
    exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
    grad = grad.to(exp_avg.dtype)
    exp_avg.mul_(beta1).add_(grad, alpha=1.0 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
    correction2 = math.sqrt(1.0 - beta2**step)
    return exp_avg / (exp_avg_sq.sqrt() + eps * correction2), correction2 / (1.0 - beta1**step)
