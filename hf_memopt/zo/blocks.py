"""Find a model's list of transformer blocks generically (no per-architecture table)."""

from __future__ import annotations

from torch import nn

__all__ = ["find_block_list"]


def _num_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def find_block_list(model: nn.Module, blocks_attr: str | None = None) -> tuple[str, nn.ModuleList]:
    """``(dotted name, ModuleList)`` of the transformer blocks.

    With ``blocks_attr`` the attribute path is followed (also below a PEFT wrapper: ``"model.layers"`` is found as
    ``base_model.model.model.layers``). Otherwise the candidate is every ``nn.ModuleList`` of >= 2 children of one
    class, each holding parameters; the one holding the most parameters wins (LLaMA ``model.layers``, GPT-2 ``h``,
    BERT ``encoder.layer``, OPT ``decoder.layers``).
    """
    if blocks_attr is not None:
        modules = dict(model.named_modules())
        hits = [n for n in modules if n == blocks_attr or n.endswith("." + blocks_attr)]
        if not hits:
            raise ValueError(
                f"blocks_attr={blocks_attr!r} names no submodule of {type(model).__name__}; pass the dotted path "
                "of the nn.ModuleList of transformer blocks (e.g. 'model.layers', 'transformer.h', 'encoder.layer')"
            )
        name = min(hits, key=len)
        found = modules[name]
        if not isinstance(found, nn.ModuleList) or len(found) == 0:
            raise ValueError(f"blocks_attr={blocks_attr!r} is a {type(found).__name__}, not a non-empty nn.ModuleList")
        return name, found
    candidates = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) < 2:
            continue
        kinds = {type(child) for child in module}
        if len(kinds) == 1 and all(_num_params(child) > 0 for child in module):
            candidates.append((_num_params(module), name, module))
    if not candidates:
        raise ValueError(
            f"could not find the transformer block list of {type(model).__name__} (no nn.ModuleList of >= 2 "
            "repeated blocks with parameters); pass ZOConfig(blocks_attr='dotted.path.to.blocks') or offload='none'"
        )
    _, name, module = max(candidates, key=lambda c: c[0])
    return name, module
