"""Blocks of BlockLLM: which parameters can be selected, how they group, and the selection rule (Sec. 3)."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
from torch import nn

from hf_memopt.core.attach import trainable_parameters

__all__ = ["Block", "build_blocks", "embedding_parameter_ids", "select_blocks", "selection_budget"]

# The first numbered container in a qualified name: "model.layers.3.", "bert.encoder.layer.11.", "transformer.h.0."
_LAYER = re.compile(r"^(.*?\.\d+)\.")


@dataclass
class Block:
    """One coordinate block: a name, its parameters (in model order) and its size."""

    name: str
    params: list[nn.Parameter]
    names: list[str]

    @property
    def numel(self) -> int:
        return sum(p.numel() for p in self.params)


def embedding_parameter_ids(model: nn.Module) -> set[int]:
    """ids of every embedding table (input, position, token type ...) and of the output head.

    The paper keeps these frozen: they hold most parameters of small models, and their gradient is sparse in the
    vocabulary, so a norm ranking would over- or under-weight them.
    """
    ids = {id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters(recurse=False)}
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        try:
            module = getattr(model, getter)() if hasattr(model, getter) else None
        except NotImplementedError:
            module = None
        if module is not None:
            ids.update(id(p) for p in module.parameters())
    return ids


def build_blocks(model: nn.Module, granularity: str, train_embeddings: bool) -> tuple[list[Block], int]:
    """``(blocks, trainable)``: the selectable blocks and the number of parameters trainable before freezing.

    ``granularity="parameter"``: one block per trainable parameter tensor; ``"layer"``: the parameters of one
    numbered layer share a block, the rest stay one block per tensor.
    """
    named = trainable_parameters(model)
    trainable = sum(p.numel() for _, p in named)
    excluded = set() if train_embeddings else embedding_parameter_ids(model)
    blocks: dict[str, Block] = {}
    for name, p in named:
        if id(p) in excluded:
            continue
        key = name
        if granularity == "layer":
            match = _LAYER.match(name)
            key = match.group(1) if match else name
        block = blocks.setdefault(key, Block(key, [], []))
        block.params.append(p)
        block.names.append(name)
    return list(blocks.values()), trainable


def selection_budget(sparsity: float, blocks: list[Block]) -> int:
    """Parameters a selection may hold: floor((1 - sparsity) * selectable), selectable = the parameters of ``blocks``.

    As in the official code (``blockllm_torch/blockllm.py`` of RAmruthaVignesh/blockllm: ``total_params`` sums the
    optimizer's groups, from which embeddings and ``lm_head`` were removed, and ``num_params_to_keep = int((1 -
    sparsity_level) * total_params)``): ``sparsity`` is the fraction of the parameters a selection can pick that it
    does not pick, so frozen embeddings and head never inflate the budget.
    """
    selectable = sum(b.numel for b in blocks)
    return int(math.floor((1.0 - sparsity) * selectable + 1e-9))


def select_blocks(
    norms: torch.Tensor,
    visits: torch.Tensor,
    num_selections: int,
    sizes: torch.Tensor,
    budget: int,
    visit_penalty: float,
) -> torch.Tensor:
    """The paper's SelectParam: a bool mask over blocks.

    Blocks are ranked by ``||G_b|| * exp(-visit_penalty * f_b)`` with ``f_b = visits_b / num_selections`` (the
    fraction of past selections that chose b; 0 before the first), and taken greedily in that order while the total
    size stays within ``budget`` (a block that would overflow it is skipped and smaller later ones may still fit, so
    the selection never exceeds ``1 - sparsity``). Ties keep model order. Raises ``ValueError`` when nothing fits.
    """
    freq = visits.double() / max(num_selections, 1)
    scores = torch.nan_to_num(norms.double(), nan=0.0, posinf=0.0) * torch.exp(-visit_penalty * freq)
    order = torch.sort(scores, descending=True, stable=True).indices
    chosen = torch.zeros(len(norms), dtype=torch.bool)
    total = 0
    for i in order.tolist():
        size = int(sizes[i])
        if total + size <= budget:
            chosen[i] = True
            total += size
    if not chosen.any():
        raise ValueError(
            f"BlockLLM selection would be empty: the budget is {budget} parameters (1 - sparsity of the selectable "
            f"ones) and the smallest block has {int(sizes.min()) if len(sizes) else 0}; lower sparsity, use "
            "block_granularity='parameter', or train more parameters"
        )
    return chosen
