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
    for module in modules.values():
        for p in module.parameters():
            p.requires_grad_(False)
            frozen_ids.add(id(p))
        if dtype is not None:
            _store_in(module, dtype)
    frozen = [n for n, p in model.named_parameters(remove_duplicate=False) if id(p) in frozen_ids]
    tied = [n for n in frozen if not any(n.startswith(f"{m}.") for m in modules)]
    if tied:
        logger.info("freeze_modules: %s share a weight with %s and are frozen with it", tied, list(modules))
    return frozen


def _store_in(module: nn.Module, dtype: torch.dtype) -> None:
    """Keep ``module``'s weights in ``dtype``; it reads and returns the dtype it computed in before."""
    compute = module.weight.dtype
    module.to(dtype)  # in place on the parameter's data: a tied parameter stays one tensor

    def cast_input(mod, args):
        return tuple(a.to(dtype) if torch.is_tensor(a) and a.is_floating_point() else a for a in args)

    def cast_output(mod, args, output):
        return output.to(compute) if torch.is_tensor(output) and output.is_floating_point() else output

    module.register_forward_pre_hook(cast_input)
    module.register_forward_hook(cast_output)
