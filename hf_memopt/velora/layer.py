"""Installing VeLoRA on ``nn.Linear`` modules by patching the forward of each module *instance*.

The module keeps its type, its parameters and their state_dict keys; the only addition is one persistent buffer,
``<module>.velora_v`` (the unit vector v, d = in_features / num_groups values). So other methods that look for
``nn.Linear`` layers, freeze weights (BlockLLM) or read ``module.weight`` still see an ordinary Linear, and the
checkpoint restores v exactly. Outside training (``model.eval()``, ``torch.no_grad()``) or when the weight is frozen,
the module runs its original forward.
"""

from __future__ import annotations

import types
import weakref
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from hf_memopt.core import compat
from hf_memopt.shared.modules import mark_rewritten, unmark_rewritten
from hf_memopt.shared.parallel import all_reduce_mean_, is_distributed
from hf_memopt.velora.function import VeLoRALinearFunction, compress

__all__ = ["BUFFER_NAME", "VeLoRAState", "install_velora_linear", "is_velora_linear", "uninstall_velora_linear"]

BUFFER_NAME = "velora_v"
_STATE = "_velora_state"
_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclass
class VeLoRAState:
    """Per-module settings kept on the module instance (not in the state_dict: they come from the config)."""

    num_groups: int
    init: str
    scale: float
    coefficient_dtype: torch.dtype
    original_forward: Any
    initialized: bool = False


def is_velora_linear(module: nn.Module) -> bool:
    return hasattr(module, _STATE)


def _unit(vector: torch.Tensor) -> torch.Tensor:
    norm = torch.linalg.vector_norm(vector)
    if not torch.isfinite(norm) or norm == 0:  # degenerate batch (all zeros): any direction is as good
        vector, norm = torch.ones_like(vector), vector.numel() ** 0.5
    return vector / norm


def _all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    """Average over data-parallel ranks, so every rank uses the same v (and the checkpoint holds that v)."""
    if is_distributed():
        all_reduce_mean_(t)
    return t


@torch.no_grad()
def initial_direction(x: torch.Tensor, num_groups: int, init: str) -> torch.Tensor:
    """v from a batch of inputs (float32): the normalised mean sub-token (Sec. 3.3, "batch average"), or for
    ``svd`` the top right singular vector of the sub-token matrix (top eigenvector of its d x d Gram matrix)."""
    tokens = x.detach().reshape(-1, x.shape[-1] // num_groups).float()
    mean = _all_reduce_mean(tokens.mean(0))
    if init != "svd":
        return _unit(mean)
    gram = _all_reduce_mean(tokens.t() @ tokens / tokens.shape[0])
    top = torch.linalg.eigh(gram.double()).eigenvectors[:, -1].float()
    return top if torch.dot(top, mean) >= 0 else -top  # sign is irrelevant to X_hat; fixed for reproducibility


class _SharedCoefficients:
    """The last input's coefficients, reused by the next layer that reads the same tensor with an equal v.

    q/k/v (and gate/up) read one tensor; their batch-average v are computed from that same tensor and are equal, so
    their coefficients are equal too. Sharing one tensor means it is saved once instead of three times. Only weak
    references are kept: the cache never extends the life of an input or of saved coefficients.
    """

    def __init__(self) -> None:
        self._x = self._coefficients = None
        self._key: tuple = ()
        self._v: torch.Tensor | None = None

    def _key_of(self, x: torch.Tensor, state: VeLoRAState) -> tuple:
        return (compat.tensor_version(x), x.shape, x.stride(), state.num_groups, state.coefficient_dtype)

    def lookup(self, x: torch.Tensor, v: torch.Tensor, state: VeLoRAState) -> torch.Tensor | None:
        if self._x is None or self._x() is not x or self._key != self._key_of(x, state):
            return None
        coefficients = self._coefficients()
        if coefficients is None or self._v is None or not torch.equal(self._v, v):
            return None
        return coefficients

    def store(self, x: torch.Tensor, v: torch.Tensor, state: VeLoRAState) -> torch.Tensor:
        coefficients = compress(x.detach(), v, state.num_groups, state.coefficient_dtype)
        self._x, self._coefficients = weakref.ref(x), weakref.ref(coefficients)
        self._key, self._v = self._key_of(x, state), v.detach().clone()
        return coefficients


_SHARED = _SharedCoefficients()


def _velora_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    state: VeLoRAState = getattr(self, _STATE)
    if not (self.training and torch.is_grad_enabled() and self.weight.requires_grad):
        return state.original_forward(x)
    v = getattr(self, BUFFER_NAME)
    if state.init == "batch_average":
        # a fresh tensor for this forward: the buffer may change before this graph's backward runs
        fresh = initial_direction(x, state.num_groups, state.init).to(v.dtype)
        with torch.no_grad():
            v.copy_(fresh)
        v = fresh
    elif not state.initialized:
        # v is all zeros until the first training batch sets it; a checkpoint restores a non-zero v
        if not bool(v.any()):
            with torch.no_grad():
                v.copy_(initial_direction(x, state.num_groups, state.init))
        state.initialized = True
    coefficients = _SHARED.lookup(x, v, state)
    if coefficients is None:
        coefficients = _SHARED.store(x, v, state)
    return VeLoRALinearFunction.apply(
        x, self.weight, self.bias, v, state.num_groups, state.scale, state.coefficient_dtype, coefficients
    )


def install_velora_linear(
    module: nn.Linear,
    *,
    num_groups: int,
    init: str,
    scale: float,
    coefficient_dtype: str,
    seed: int = 0,
    name: str = "",
) -> None:
    """Make ``module`` save compressed inputs; raises ``ValueError`` when it cannot be done exactly."""
    label = name or type(module).__name__
    if is_velora_linear(module):
        raise ValueError(f"target_modules: {label} already has VeLoRA installed")
    if not isinstance(module, nn.Linear) or type(module).forward is not nn.Linear.forward:
        raise ValueError(
            f"target_modules: {label} is a {type(module).__name__}; VeLoRA replaces the plain nn.Linear computation "
            "and cannot target subclasses with their own forward (quantized or adapter layers)"
        )
    if "forward" in module.__dict__:
        raise ValueError(f"target_modules: {label} already has a patched forward (another method or a hook library)")
    if not module.weight.is_floating_point():
        raise ValueError(f"target_modules: {label} has a {module.weight.dtype} weight; VeLoRA needs a float weight")
    width = module.in_features
    if width % num_groups:
        raise ValueError(
            f"num_groups must divide the input width of every targeted layer; {label} has in_features={width}, "
            f"num_groups={num_groups}"
        )
    d = width // num_groups
    if init == "random":
        generator = torch.Generator().manual_seed(seed)
        v = _unit(torch.randn(d, generator=generator))
    else:
        v = torch.zeros(d)
    module.register_buffer(BUFFER_NAME, v.to(device=module.weight.device), persistent=True)
    state = VeLoRAState(num_groups, init, scale, _DTYPES[coefficient_dtype], module.forward, init == "random")
    setattr(module, _STATE, state)
    module.forward = types.MethodType(_velora_forward, module)
    mark_rewritten(module, "VeLoRA")


def uninstall_velora_linear(module: nn.Linear) -> None:
    """Restore the original forward and drop the buffer."""
    if not is_velora_linear(module):
        return
    del module.forward
    delattr(module, _STATE)
    unmark_rewritten(module)
    delattr(module, BUFFER_NAME)
