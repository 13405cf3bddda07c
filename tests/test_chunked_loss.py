"""The chunked causal-LM loss equals transformers' own loss and gradients (float64, tiny LLaMA)."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import allocator_peak_of
from transformers import LlamaConfig, LlamaForCausalLM

from hf_memopt.shared.chunked_loss import chunked_linear_cross_entropy, use_chunked_lm_loss


def tiny_llama(tied: bool) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=tied,
    )  # fmt: skip
    return LlamaForCausalLM(config).double()


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 97, (3, 11), generator=g)
    labels = ids.clone()
    labels[0, :4] = -100  # a prompt left out of the loss
    labels[2, 7:] = -100  # padding
    return ids, labels


@pytest.mark.parametrize("tied", [True, False], ids=["tied_head", "untied_head"])
@pytest.mark.parametrize("num_items", [None, 23], ids=["mean", "num_items_in_batch"])
@pytest.mark.parametrize("chunk_size", [1, 7, 1000])
def test_chunked_loss_and_gradients_equal_the_plain_model_in_float64(tied, num_items, chunk_size):
    ids, labels = batch()
    plain = tiny_llama(tied)
    chunked = use_chunked_lm_loss(copy.deepcopy(plain), chunk_size)
    extra = {} if num_items is None else {"num_items_in_batch": torch.tensor(num_items)}
    logits = plain(input_ids=ids).logits  # float64 twin of ForCausalLMLoss (which upcasts only to float32)
    shifted = labels[:, 1:]
    total = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 97), shifted.reshape(-1), reduction="sum")
    reference = total / (num_items if num_items is not None else (shifted != -100).sum())
    out = chunked(input_ids=ids, labels=labels, **extra)
    assert out.logits is None  # the full logits are never returned (nor built)
    torch.testing.assert_close(out.loss, reference, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out.loss, plain(input_ids=ids, labels=labels, **extra).loss.double(), rtol=1e-6, atol=0)
    reference.backward()
    out.loss.backward()
    for (name, p), q in zip(plain.named_parameters(), chunked.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-10, atol=1e-12, msg=name)


def test_chunked_cross_entropy_equals_the_obvious_reference():
    g = torch.Generator().manual_seed(2)
    hidden = torch.randn(9, 5, dtype=torch.float64, generator=g, requires_grad=True)
    weight = torch.randn(13, 5, dtype=torch.float64, generator=g, requires_grad=True)
    labels = torch.tensor([0, 3, -100, 12, 5, 5, -100, 1, 7])
    loss = chunked_linear_cross_entropy(hidden, weight, labels, chunk_size=2)
    logits = hidden @ weight.t()
    reference = sum(-torch.log_softmax(logits[i], 0)[y] for i, y in enumerate(labels.tolist()) if y != -100)
    torch.testing.assert_close(loss.double(), reference)
    gh, gw = torch.autograd.grad(loss, (hidden, weight))
    rh, rw = torch.autograd.grad(reference, (hidden, weight))
    torch.testing.assert_close(gh, rh)
    torch.testing.assert_close(gw, rw)


def test_calls_without_labels_run_the_model_unchanged():
    model = tiny_llama(True)
    ids, _ = batch()
    expected = model(input_ids=ids).logits
    torch.testing.assert_close(use_chunked_lm_loss(model, 4)(input_ids=ids).logits, expected)


def test_chunked_loss_saves_no_logits_for_backward():
    """Autograd keeps the hidden states, not a tokens x vocab tensor (the point of the chunking)."""
    model = use_chunked_lm_loss(tiny_llama(False), 4)
    ids, labels = batch()
    vocab_sized = []

    def pack(t):
        if t.shape[-1:] == (97,) and t.dim() >= 2 and t.shape[0] != 97:
            vocab_sized.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=ids, labels=labels).loss.backward()
    assert vocab_sized == []


@pytest.mark.parametrize("head_dtype", [torch.float32, torch.bfloat16])
def test_at_most_one_chunk_of_float32_logits_is_alive_at_a_time(head_dtype, one_thread):
    """The loss's transient peak is one chunk's float32 logits (+ its 16-bit product for a 16-bit head): log-sum-exp
    and softmax are taken in place and a chunk is freed before the next is made. Before, three chunks were alive at
    the start of backward (the previous chunk, the upcast logits and their softmax): at SmolLM2's head, 4 x 128
    tokens, the composed recipe's true peak was that much higher (docs/min_memory.md)."""
    torch.manual_seed(0)
    vocab, width, tokens, chunk = 8192, 32, 256, 32
    weight = torch.randn(vocab, width).to(head_dtype)
    hidden = torch.randn(tokens, width, requires_grad=True)
    labels = torch.randint(0, vocab, (tokens,))
    chunk_bytes = chunk * vocab * 4
    chunked_linear_cross_entropy(hidden, weight, labels, chunk).backward()  # warm-up
    hidden.grad = None
    peak = allocator_peak_of(lambda: chunked_linear_cross_entropy(hidden, weight, labels, chunk).backward())
    product = chunk_bytes // 2 if head_dtype == torch.bfloat16 else 0
    # the hidden states' gradient and a chunk's copy; the CPU matmul's packed copy of a 16-bit weight (its working
    # buffers grow with the thread count: one thread here); bookkeeping
    small = 2 * tokens * width * 4 + (weight.numel() * 2 if head_dtype == torch.bfloat16 else 0) + (1 << 16)
    assert chunk_bytes <= peak <= chunk_bytes + product + small, (peak, chunk_bytes)


def test_logit_transforms_and_bad_chunk_sizes_are_refused():
    model = tiny_llama(False)
    model.config.final_logit_softcapping = 30.0
    with pytest.raises(ValueError, match="final_logit_softcapping"):
        use_chunked_lm_loss(model)
    with pytest.raises(ValueError, match="chunk_size"):
        use_chunked_lm_loss(tiny_llama(False), 0)
    with pytest.raises(ValueError, match="no separate backbone"):
        use_chunked_lm_loss(torch.nn.Linear(3, 3))


def test_trainer_evaluate_reports_the_same_loss_with_the_chunked_loss(tmp_path):
    """The Trainer's evaluation loop accepts outputs without logits and averages the same loss."""
    from conftest import TokenDataset, training_args
    from transformers import Trainer

    data = TokenDataset(n=8, vocab=97)
    plain = tiny_llama(False).float()
    chunked = use_chunked_lm_loss(copy.deepcopy(plain), 5)
    losses = [
        Trainer(model=m, args=training_args(tmp_path / str(i)), eval_dataset=data).evaluate()["eval_loss"]
        for i, m in enumerate((plain, chunked))
    ]
    assert losses[1] == pytest.approx(losses[0], rel=1e-5)
