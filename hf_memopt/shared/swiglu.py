"""SwiGLU MLPs that keep two intermediates for backward instead of three: SiLU(gate) is recomputed there.

A LLaMA-family MLP computes ``down(silu(gate(x)) * up(x))``. Autograd keeps ``gate(x)`` for SiLU's backward and
``silu(gate(x))`` and ``up(x)`` for the product's: three tokens x intermediate tensors per layer (SmolLM2-135M, 4 x
128 tokens: 3 MiB each in float32). :class:`_SiLUMul` keeps ``gate(x)`` and ``up(x)`` and recomputes the SiLU in
backward, as Liger-Kernel's ``LigerSiLUMulFunction`` does; outputs and gradients are the same bits (the same ATen
kernels: ``silu``, ``mul``, ``silu_backward``). Without gradient checkpointing this is a third of every MLP's saved
activations; with it, one tensor less in the recomputed layer at the top of the backward peak (docs/min_memory.md).

:func:`use_recomputed_swiglu` installs it on every module shaped as such an MLP (``gate_proj``, ``up_proj``,
``down_proj`` and a SiLU ``act_fn``) and checks on a probe input that the new forward gives exactly what the module's
own forward gives (on the estimator's meta-device models, through a small CPU stand-in of the module); a module whose
forward differs (dropout, another gating) is refused, never computed differently.
"""

from __future__ import annotations

import copy
import functools

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["silu_mul", "use_recomputed_swiglu"]

_PATCHED = "_hf_memopt_recomputed_swiglu"


class _SiLUMul(torch.autograd.Function):
    """``silu(gate) * up``, saving ``gate`` and ``up`` only."""

    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(gate, up)
        return F.silu(gate).mul_(up)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        gate, up = ctx.saved_tensors
        grad_gate = grad_up = None
        if ctx.needs_input_grad[0]:  # d/d gate: silu'(gate) * (grad * up), as SiLU's own backward computes it
            grad_gate = torch.ops.aten.silu_backward(grad * up, gate)
        if ctx.needs_input_grad[1]:
            grad_up = F.silu(gate).mul_(grad)
        return grad_gate, grad_up


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``F.silu(gate) * up`` that keeps two tensors for backward instead of three (the SiLU is recomputed)."""
    return _SiLUMul.apply(gate, up)


def _recomputed_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return self.down_proj(silu_mul(self.gate_proj(x), self.up_proj(x)))


def _silu_types() -> tuple[type, ...]:
    """``nn.SiLU`` and transformers' own ``SiLUActivation`` (what ``ACT2FN["silu"]`` gives in transformers 5)."""
    try:
        from transformers.activations import SiLUActivation
    except ImportError:
        return (nn.SiLU,)
    return (nn.SiLU, SiLUActivation)


def _is_swiglu_mlp(module: nn.Module, silu_types: tuple[type, ...]) -> bool:
    return all(hasattr(module, name) for name in ("gate_proj", "up_proj", "down_proj")) and isinstance(
        getattr(module, "act_fn", None), silu_types
    )


class _CannotProbe(Exception):
    """A meta-device MLP could not be copied into a CPU stand-in, so its forward cannot be checked."""


def _cpu_stand_in(module: nn.Module) -> nn.Module:
    """A CPU copy of a meta-device MLP whose three projections hold 4 -> 8 -> 4 weights of seeded random values: the
    module's own forward code, every other submodule (activation, dropout, norm), each projection's class, dtype and
    hooks (a frozen module's casting hooks), at a size that costs nothing, so the estimator's meta models go through
    the same probe as training's real ones."""
    try:
        stand_in = copy.deepcopy(module)
    except Exception as error:  # noqa: BLE001 - whatever deepcopy raises, the module cannot be probed
        raise _CannotProbe(f"it cannot be copied ({type(error).__name__}: {error})") from error
    for name, (width_out, width_in) in {"gate_proj": (8, 4), "up_proj": (8, 4), "down_proj": (4, 8)}.items():
        projection = getattr(stand_in, name)
        if not isinstance(projection, nn.Linear):
            raise _CannotProbe(f"its {name} is a {type(projection).__name__}, not an nn.Linear")
        shapes = {"weight": (width_out, width_in), "bias": (width_out,)}
        for kind, shape in shapes.items():
            old = getattr(projection, kind)
            if old is not None:
                new = torch.empty(shape, dtype=old.dtype, device="meta")
                setattr(projection, kind, nn.Parameter(new, requires_grad=old.requires_grad))
        projection.in_features, projection.out_features = width_in, width_out
    stand_in.to_empty(device="cpu")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for tensor in (*stand_in.parameters(), *stand_in.buffers()):
            if tensor.is_floating_point():
                tensor.copy_(torch.randn(tensor.shape, generator=generator))
            else:
                tensor.zero_()
    return stand_in


def _float_dtypes(module: nn.Module) -> list[torch.dtype]:
    """The floating dtypes of the module's parameters, in order of first appearance (the probe tries each)."""
    dtypes: list[torch.dtype] = []
    for parameter in module.parameters():
        if parameter.is_floating_point() and parameter.dtype not in dtypes:
            dtypes.append(parameter.dtype)
    return dtypes


@torch.no_grad()
def _same_as_own_forward(module: nn.Module) -> bool:
    """Whether the recomputing forward gives exactly the module's own output on a random probe, in eval mode and in
    train mode under the same random seed (a dropout in the module's forward, which eval mode hides, makes them
    differ). The probe is tried in each dtype of the module's parameters (a module with a frozen bfloat16 projection
    next to float32 ones computes in float32 through the frozen one's casting hooks); one the module's own forward
    cannot take is skipped, and the module is refused if no dtype runs. A meta-device module (the estimator's models
    hold no values) is probed through a small CPU stand-in (:func:`_cpu_stand_in`)."""
    if not _float_dtypes(module) or getattr(module.gate_proj, "in_features", None) is None:
        return False
    if next(module.parameters()).device.type == "meta":
        module = _cpu_stand_in(module)
    device = next(module.parameters()).device
    devices = [device] if device.type == "cuda" else []
    training = module.training
    ran = False
    try:
        for dtype in _float_dtypes(module):
            probe = torch.randn(1, 3, module.gate_proj.in_features, generator=torch.Generator().manual_seed(0))
            probe = probe.to(device, dtype)
            for mode in (False, True):
                module.train(mode)
                with torch.random.fork_rng(devices=devices):
                    torch.manual_seed(0)
                    try:
                        own = module.forward(probe)
                    except RuntimeError:  # e.g. a float32 input to a bfloat16 projection without casting hooks
                        break
                with torch.random.fork_rng(devices=devices):
                    torch.manual_seed(0)
                    try:
                        recomputed = _recomputed_forward(module, probe)
                    except RuntimeError:  # the module's forward runs where the plain SwiGLU product does not
                        return False
                if not torch.equal(own, recomputed):
                    return False
                ran = True
        return ran
    finally:
        module.train(training)


def use_recomputed_swiglu(model: nn.Module) -> list[str]:
    """Give every SwiGLU MLP of ``model`` the forward that recomputes SiLU in backward; returns their names.

    Raises ``ValueError`` when the model has no such MLP (the setting would do nothing) or when one's own forward is
    not ``down_proj(act_fn(gate_proj(x)) * up_proj(x))`` (checked on a probe input). Calling it again changes nothing.
    """
    silu_types = _silu_types()
    mlps = {name: m for name, m in model.named_modules() if _is_swiglu_mlp(m, silu_types)}
    if not mlps:
        raise ValueError(
            "recompute_swiglu: the model has no SwiGLU MLP (a module with gate_proj, up_proj, down_proj and a SiLU "
            f"act_fn, as LLaMA's); {type(model).__name__} cannot use it"
        )
    for name, module in mlps.items():
        if getattr(module, _PATCHED, False):
            continue
        try:
            same = _same_as_own_forward(module)
        except _CannotProbe as reason:
            raise ValueError(
                f"recompute_swiglu: {name} ({type(module).__name__}) cannot be checked on the meta device: {reason}; "
                "it is left as it is and the setting refused"
            ) from None
        if not same:
            raise ValueError(
                f"recompute_swiglu: {name} ({type(module).__name__}) does not compute "
                "down_proj(silu(gate_proj(x)) * up_proj(x)) exactly; it is left as it is and the setting refused"
            )
        module.forward = functools.partial(_recomputed_forward, module)  # pickles and deep-copies, unlike a bound method
        setattr(module, _PATCHED, True)
    return sorted(mlps)
