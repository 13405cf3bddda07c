"""Freeze whole modules (token embeddings, a tied LM head) so they hold no gradient and no optimizer state.

In a small model the embeddings are a large share of the weights (SmolLM2-135M: 28.3M of 134.5M parameters, tied
with the LM head). Trained with AdamW they cost 16 bytes a parameter (fp32 weight, gradient, two moments), 453 MiB
for SmolLM2, more than the whole model in fp16. Fine-tuning them is rarely what the update needs (LoRA and QLoRA
leave them frozen by default), so the min-memory recipe freezes them, as a documented setting, never by default.

A frozen module can also be stored in 16 bits (``dtype``), as fp16 inference stores it: its weight is cast, its
floating-point inputs are cast to that dtype and its output back to the dtype the rest of the model computes in,
so the other layers see what they saw before, to the rounding of the stored weight.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from hf_memopt.shared.targeting import match_target_modules

__all__ = ["freeze_modules"]

logger = logging.getLogger(__name__)


def freeze_modules(model: nn.Module, names: str | list[str], dtype: torch.dtype | str | None = None) -> list[str]:
    """Set ``requires_grad=False`` on every parameter of the modules ``names`` selects (names or a regex, as
    ``target_modules``; embeddings and linear layers), and store them in ``dtype`` when given (``bfloat16`` or
    ``float16``). Returns the frozen parameter names, tied ones included (freezing ``embed_tokens`` of a tied model
    freezes ``lm_head.weight`` with it, which is logged)."""
    if isinstance(dtype, str):
        if dtype not in ("bfloat16", "float16"):
            raise ValueError(f"dtype must be one of ('bfloat16', 'float16', None); got {dtype!r}")
        dtype = getattr(torch, dtype)
    if dtype is not None and dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"dtype must be torch.bfloat16, torch.float16 or None; got {dtype!r}")
    modules = match_target_modules(model, names, allowed_types=(nn.Embedding, nn.Linear), field="freeze_modules")
    frozen_ids = set()
    compute_dtypes = {}  # id(parameter) -> the dtype the model computed in before
    for module in modules.values():
        for p in module.parameters():
            p.requires_grad_(False)
            frozen_ids.add(id(p))
            compute_dtypes[id(p)] = p.dtype
        if dtype is not None:
            module.to(dtype)  # in place on the parameter's data: a tied parameter stays one tensor
            _cast_around(module, dtype, compute_dtypes[id(module.weight)])
    frozen = [n for n, p in model.named_parameters(remove_duplicate=False) if id(p) in frozen_ids]
    tied = [n for n in frozen if not any(n.startswith(f"{m}.") for m in modules)]
    if tied:
        logger.info("freeze_modules: %s share a weight with %s and are frozen with it", tied, list(modules))
    if dtype is not None:  # a tied LM head now holds a `dtype` weight too: it casts like the module it shares with
        for name in tied:
            owner = model.get_submodule(name.rpartition(".")[0])
            _cast_around(owner, dtype, compute_dtypes[id(model.get_parameter(name))])
    return frozen


def _cast_around(module: nn.Module, dtype: torch.dtype, compute: torch.dtype) -> None:
    """``module`` stores its weights in ``dtype``: it reads its inputs in ``dtype`` and returns ``compute``, the
    dtype the model computed in before, so the rest of the model is unchanged."""

    def cast_input(mod, args):
        return tuple(a.to(dtype) if torch.is_tensor(a) and a.is_floating_point() else a for a in args)

    def cast_output(mod, args, output):
        return output.to(compute) if torch.is_tensor(output) and output.is_floating_point() else output

    module.register_forward_pre_hook(cast_input)
    module.register_forward_hook(cast_output)
