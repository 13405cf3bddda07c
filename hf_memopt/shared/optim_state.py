"""Optimizer-state helpers shared by the methods' optimizers."""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["keep_state_dtypes_on_load", "unwrap_optimizer"]


def keep_state_dtypes_on_load(optimizer: torch.optim.Optimizer) -> None:
    """Make ``optimizer.load_state_dict`` keep the saved dtype of every state tensor.

    ``torch.optim.Optimizer.load_state_dict`` casts every state tensor but ``step`` to a floating-point parameter's
    dtype. States deliberately kept in another dtype (uint8 8-bit moments, bool masks, float32 projectors and moments
    of a bfloat16 weight) would be converted on resume: 8-bit codes read as float values make the resumed run diverge. A pre-hook sets those tensors aside
    and a post-hook puts them back, moved to the parameter's device only.
    """
    aside: list[tuple[torch.nn.Parameter, str, torch.Tensor]] = []

    def pre_hook(opt: torch.optim.Optimizer, state_dict: dict[str, Any]) -> None:
        aside.clear()
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        by_id = dict(zip(saved_ids, (p for g in opt.param_groups for p in g["params"])))
        for param_id, param_state in state_dict["state"].items():
            param = by_id.get(param_id)
            for key, value in param_state.items():
                if param is not None and isinstance(value, torch.Tensor) and value.dtype != param.dtype:
                    aside.append((param, key, value))

    def post_hook(opt: torch.optim.Optimizer) -> None:
        for param, key, value in aside:
            opt.state[param][key] = value.to(param.device)
        aside.clear()

    optimizer.register_load_state_dict_pre_hook(pre_hook)
    optimizer.register_load_state_dict_post_hook(post_hook)


def unwrap_optimizer(optimizer: Any) -> Any:
    """The optimizer behind accelerate's ``AcceleratedOptimizer`` and similar wrappers that hold it as ``.optimizer``.

    transformers' ``LayerWiseDummyOptimizer`` (whose real optimizers sit in ``optimizer_dict``) is returned as is.
    """
    while optimizer is not None and hasattr(optimizer, "optimizer") and not hasattr(optimizer, "optimizer_dict"):
        optimizer = optimizer.optimizer
    return optimizer
