"""Causal-LM cross-entropy computed in chunks of tokens, so the ``tokens x vocab`` logits never exist at once.

A causal LM's loss is ``CE(h W^T, y)`` over every position: with a 49k or 32k vocabulary the float32 logits of a
4 x 256 batch are 128-200 MiB, and autograd keeps them (or their log-softmax) until backward. Here the forward
computes the loss ``chunk_size`` tokens at a time and saves only the final hidden states; backward recomputes each
chunk's logits and turns them into the gradients of the hidden states and of the head weight
(d/dz CE = softmax(z) - onehot(y)). Peak extra memory is one chunk's float32 logits (log-sum-exp and softmax are
taken in place) plus, for a 16-bit head, the chunk's 16-bit product, at the price of a second head matmul.
This is the technique of Liger-Kernel's ``FusedLinearCrossEntropy`` and TRL's ``add_fused_lm_head`` (which
``SFTTrainer`` installs by itself); this module gives the plain ``Trainer`` the same, without either dependency.

The loss equals transformers' ``ForCausalLMLoss``: labels shifted left by one, ``-100`` ignored, the sum divided by
``num_items_in_batch`` when the Trainer passes it (gradient accumulation over tokens), else by the number of
counted tokens; logits are upcast to float32 as there.
"""

from __future__ import annotations

import functools
import types
from typing import Any

import torch
from torch import nn

from hf_memopt.shared.validation import check_int

__all__ = ["IGNORE_INDEX", "chunked_causal_lm_loss", "chunked_linear_cross_entropy", "use_chunked_lm_loss"]

IGNORE_INDEX = -100
_PATCHED = "_hf_memopt_chunked_loss"
# config attributes that change the logits between the head matmul and the softmax: refused, not mis-computed
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier")


def _upcast(t: torch.Tensor) -> torch.Tensor:
    """At least float32 (as ``ForCausalLMLoss`` upcasts the logits); float64 stays float64."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def _logsumexp_(logits: torch.Tensor) -> torch.Tensor:
    """Row-wise ``logsumexp`` of a fresh chunk of logits, overwriting it with ``exp(z - max)``: ``torch.logsumexp``
    would allocate a second chunk-sized tensor (the exponentials), which is the largest transient of the loss."""
    top = logits.amax(dim=1, keepdim=True)
    top.masked_fill_(top.isinf(), 0.0)  # as torch.logsumexp: a row holding +inf sums to +inf, not NaN
    return logits.sub_(top).exp_().sum(dim=1).log_() + top.squeeze(1)


def _softmax_(logits: torch.Tensor) -> torch.Tensor:
    """Row-wise softmax of a fresh chunk of logits, in place (``torch.softmax`` returns a second chunk)."""
    logits.sub_(logits.amax(dim=1, keepdim=True)).exp_()
    return logits.div_(logits.sum(dim=1, keepdim=True))


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Sum over counted tokens of ``-log softmax(h W^T)[y]``, chunk by chunk; backward recomputes each chunk."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk_size: int):
        total = torch.zeros((), dtype=torch.promote_types(hidden.dtype, torch.float32), device=hidden.device)
        for start in range(0, hidden.shape[0], chunk_size):
            h, y = hidden[start : start + chunk_size], labels[start : start + chunk_size]
            logits = _upcast(h.to(weight.dtype) @ weight.t())
            counted = y != IGNORE_INDEX
            picked = logits.gather(1, y.clamp(min=0).unsqueeze(1)).squeeze(1)
            total += ((_logsumexp_(logits) - picked) * counted).sum()
            del logits  # before the next chunk's are made, or two chunks are alive at once
        ctx.save_for_backward(hidden, weight, labels)
        ctx.chunk_size = chunk_size
        return total

    @staticmethod
    def backward(ctx, grad_total: torch.Tensor):
        hidden, weight, labels = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=_upcast(weight).dtype, device=weight.device) if need_w else None
        for start in range(0, hidden.shape[0], ctx.chunk_size):
            h, y = hidden[start : start + ctx.chunk_size], labels[start : start + ctx.chunk_size]
            dz = _softmax_(_upcast(h.to(weight.dtype) @ weight.t()))  # d CE / d logits = softmax - onehot(y)
            counted = y != IGNORE_INDEX
            dz[torch.arange(len(y), device=y.device)[counted], y[counted]] -= 1.0
            dz *= (counted * grad_total).unsqueeze(1)
            if need_h:
                grad_h[start : start + ctx.chunk_size] = (dz.to(weight.dtype) @ weight).to(hidden.dtype)
            if need_w:
                grad_w += dz.t() @ _upcast(h)
            del dz  # before the next chunk's are made, or two chunks are alive at once
        return grad_h, (grad_w.to(weight.dtype) if need_w else None), None, None


def chunked_linear_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk_size: int = 1024
) -> torch.Tensor:
    """Summed cross-entropy of ``hidden @ weight.T`` (``N x D`` by ``V x D``) against ``labels`` (``N``, ``-100``
    ignored), never holding more than ``chunk_size`` rows of logits. A weight stored in 16 bits (a frozen head) is
    multiplied in its own dtype, as its ``nn.Linear`` would (the hidden states are cast to it chunk by chunk). A float32 (float64 for float64 inputs) scalar."""
    check_int("chunk_size", chunk_size, 1)
    if hidden.dim() != 2 or weight.dim() != 2 or labels.shape != hidden.shape[:1]:
        raise ValueError(
            f"hidden must be N x D, weight V x D and labels N; got {tuple(hidden.shape)}, {tuple(weight.shape)}, "
            f"{tuple(labels.shape)}"
        )
    return _ChunkedLinearCrossEntropy.apply(hidden, weight, labels, chunk_size)


def chunked_causal_lm_loss(
    hidden_states: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    chunk_size: int = 1024,
    num_items_in_batch: int | torch.Tensor | None = None,
) -> torch.Tensor:
    """transformers' ``ForCausalLMLoss`` of the logits ``hidden_states @ weight.T`` (``B x T x D``), in chunks.

    Position t predicts ``labels[:, t + 1]``; the sum is divided by ``num_items_in_batch`` when given (the Trainer
    passes the token count of the whole accumulated update), else by the number of counted tokens, as there.
    """
    shifted = nn.functional.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:].to(hidden_states.device)
    total = chunked_linear_cross_entropy(
        hidden_states.reshape(-1, hidden_states.shape[-1]), weight, shifted.reshape(-1), chunk_size
    )
    if num_items_in_batch is None:
        return total / (shifted != IGNORE_INDEX).sum()
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(total.device)
    return total / num_items_in_batch


def use_chunked_lm_loss(model: nn.Module, chunk_size: int = 1024) -> nn.Module:
    """Make ``model(..., labels=...)`` compute its loss with :func:`chunked_causal_lm_loss` and return no logits.

    Calls without ``labels`` (generation, inference) run the model's own forward unchanged. Refused, with the reason:
    a model without a separate backbone (``base_model``) and output embedding, a head with a bias, or a config that
    transforms the logits before the softmax (soft-capping, logit scales), which this loss would silently leave out.
    Returns ``model`` (patched in place; ``save_pretrained`` is unaffected).
    """
    check_int("chunk_size", chunk_size, 1)
    if getattr(model, _PATCHED, None) is not None:
        setattr(model, _PATCHED, chunk_size)
        return model
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    backbone = getattr(model, "base_model", None)
    if not isinstance(head, nn.Linear) or backbone is None or backbone is model:
        raise ValueError(
            f"use_chunked_lm_loss: {type(model).__name__} has no separate backbone and nn.Linear output embedding "
            "(a transformers *ForCausalLM model has both)"
        )
    if head.bias is not None:
        raise ValueError("use_chunked_lm_loss: the output embedding has a bias, which the chunked loss leaves out")
    config = getattr(model, "config", None)
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    for name in _LOGIT_TRANSFORMS:
        if getattr(text_config, name, None) not in (None, 1, 1.0):
            raise ValueError(
                f"use_chunked_lm_loss: the model's config sets {name}={getattr(text_config, name)!r}, which changes "
                "the logits before the loss; the chunked loss does not apply it"
            )
    original = model.forward

    @functools.wraps(type(model).forward)
    def forward(self, *args: Any, labels: torch.Tensor | None = None, **kwargs: Any):
        if labels is None:
            return original(*args, **kwargs)
        from transformers.modeling_outputs import CausalLMOutputWithPast

        num_items = kwargs.pop("num_items_in_batch", None)
        kwargs.pop("logits_to_keep", None)
        outputs = self.base_model(*args, **kwargs)
        head_weight = self.get_output_embeddings().weight
        loss = chunked_causal_lm_loss(
            outputs.last_hidden_state, head_weight, labels, getattr(self, _PATCHED), num_items
        )
        return CausalLMOutputWithPast(loss=loss)

    model.forward = types.MethodType(forward, model)
    setattr(model, _PATCHED, chunk_size)
    return model
