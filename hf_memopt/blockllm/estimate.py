"""BlockLLM's memory for the estimator (``hf_memopt.tools.estimate``): the paper's greedy block selection run under
the sparsity budget, with sqrt(block size) standing in for the gradient norms a model on the meta device lacks."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from hf_memopt.blockllm.blocks import build_blocks, select_blocks, selection_budget
from hf_memopt.blockllm.config import BlockLLMConfig
from hf_memopt.shared.estimate import MemoryEstimate, blockwise_8bit_bytes, parameter_bytes, tensor_bytes

__all__ = ["estimate_blockllm"]


def estimate_blockllm(model: nn.Module, config: BlockLLMConfig, trace: Callable[[nn.Module], int]) -> MemoryEstimate:
    """Gradients and moments of the selected blocks only; the activation peak is a scoring step, where every
    selectable block needs its gradient and the embeddings stay frozen."""
    blocks, trainable = build_blocks(model, config.block_granularity, config.train_embeddings)
    if not blocks:
        raise ValueError("BlockLLM selection would be empty: the model has no selectable parameter")
    budget = selection_budget(config.sparsity, blocks)
    sizes = torch.tensor([b.numel for b in blocks], dtype=torch.long)
    # Which blocks win depends on gradient norms; with similar per-coordinate magnitudes ||G_b|| grows as
    # sqrt(numel), the proxy used here to run the paper's greedy selection under the budget.
    chosen = select_blocks(sizes.double().sqrt(), torch.zeros_like(sizes), 0, sizes, budget, config.visit_penalty)
    selected = [p for b, c in zip(blocks, chosen.tolist(), strict=True) if c for p in b.params]
    state = 0
    for p in selected:
        moment = p.dtype if p.dtype in (torch.float32, torch.float64) else torch.float32
        if config.optimizer == "adamw_8bit" and p.numel() >= config.min_8bit_size:
            state += blockwise_8bit_bytes(p.numel())
        else:
            state += 2 * p.numel() * torch.empty((), dtype=moment).element_size()
        if config.mask_fraction < 1.0:
            state += p.numel()  # the bool top-k mask
    selected_count = sum(p.numel() for p in selected)
    note = (
        f"BlockLLM budget {budget} of {sum(b.numel for b in blocks)} selectable parameters ({trainable} trainable); "
        f"{selected_count} selected"
        " (the blocks with the largest gradient norms; sqrt(size) used as their proxy)"
    )
    parameters = parameter_bytes(model)
    selectable = {id(p) for b in blocks for p in b.params}
    for p in model.parameters():
        p.requires_grad_(id(p) in selectable)
    return MemoryEstimate(
        parameters=parameters,
        trainable_parameters=selected_count,
        gradients=sum(tensor_bytes(p) for p in selected),
        optimizer_state=state,
        activations=trace(model),
        targets=[b.name for b, c in zip(blocks, chosen.tolist(), strict=True) if c],
        notes=[note],
    )
