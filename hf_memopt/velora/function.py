"""The VeLoRA linear autograd function: exact output and grad_input, grad_W from rank-1 sub-token projections."""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["VeLoRALinearFunction", "compress", "reconstruct", "velora_linear"]


def compress(x: torch.Tensor, v: torch.Tensor, num_groups: int, dtype: torch.dtype) -> torch.Tensor:
    """Coefficients (tokens x num_groups): each sub-token of ``x`` (..., D) projected on the unit vector ``v`` (d,).

    Eq. 3 of the paper: z = <x_g, v> for every sub-token x_g of width d = D / num_groups.
    """
    tokens = x.reshape(-1, num_groups, x.shape[-1] // num_groups)
    return (tokens @ v.to(x.dtype)).to(dtype)


def reconstruct(coefficients: torch.Tensor, v: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """X_hat (tokens x D) = scale * coefficient * v for every sub-token (Eq. 4). Used by tests and diagnostics;
    the backward pass never materialises it."""
    tokens, groups = coefficients.shape
    return (coefficients.unsqueeze(-1) * v).reshape(tokens, groups * v.numel()) * scale


class VeLoRALinearFunction(torch.autograd.Function):
    """``F.linear(x, weight, bias)`` that saves ``compress(x)`` instead of ``x``.

    grad_W = grad_out^T X_hat with X_hat = coefficient (x) v. Since every sub-token of X_hat is parallel to v,
    grad_W viewed as (M, G, d) is (grad_out^T C)[:, :, None] * v: the same product as rebuilding X_hat, computed in
    O(tokens * M * G) instead of O(tokens * M * D) and without the tokens x D temporary.

    ``coefficients`` may be passed in precomputed (layers that read the same input with the same v share one
    tensor, so it is saved once).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, v, num_groups: int, scale: float, coefficient_dtype: torch.dtype, coefficients=None):
        out = F.linear(x, weight, bias)
        ctx.num_groups, ctx.scale = num_groups, scale
        ctx.x_shape, ctx.x_dtype = x.shape, x.dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        if not ctx.needs_input_grad[1]:
            coefficients = None
        elif coefficients is None:
            coefficients = compress(x.detach(), v, num_groups, coefficient_dtype)
        ctx.save_for_backward(coefficients, weight, v)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        coefficients, weight, v = ctx.saved_tensors
        grad_2d = grad_out.reshape(-1, grad_out.shape[-1])
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = (grad_2d @ weight.to(grad_2d.dtype)).reshape(ctx.x_shape).to(ctx.x_dtype)
        if ctx.needs_input_grad[1]:
            per_group = grad_2d.t() @ coefficients.to(grad_2d.dtype)  # (M, G)
            grad_w = (per_group.unsqueeze(-1) * v.to(grad_2d.dtype)).reshape(weight.shape)
            grad_w = (grad_w * ctx.scale).to(weight.dtype)
        if ctx.bias_dtype is not None and ctx.needs_input_grad[2]:
            grad_b = grad_2d.sum(0).to(ctx.bias_dtype)
        return grad_x, grad_w, grad_b, None, None, None, None, None


def velora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    v: torch.Tensor,
    num_groups: int,
    scale: float = 1.0,
    coefficient_dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """Functional form of :class:`VeLoRALinearFunction`."""
    return VeLoRALinearFunction.apply(x, weight, bias, v, num_groups, scale, coefficient_dtype)
