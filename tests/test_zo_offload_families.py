"""ZO2 offloading computes exactly plain MeZO's updates on every architecture it accepts, and refuses the rest.

One table of tiny random Hugging Face models (and two hand-written ones for parameters used without calling their
module), trained in float64 for a few steps at batch 2 and 4, once with ``offload="none"``'s in-place MeZO and once
through :class:`ZO2Engine`; the parameters must agree to rounding.
"""

from __future__ import annotations

import pytest
import torch
import transformers
from conftest import tiny_llama
from torch import nn

from hf_memopt.zo import ZOSGD, ZO2Engine, find_block_list
from hf_memopt.zo.perturb import perturb_

VOCAB, SEQ, EPS, LR, STEPS = 64, 8, 1e-3, 1e-2, 3
# float64: plain MeZO's in-place +eps, -2 eps, +eps round trip and the engine's perturbed copies differ by a few ulps
# of theta, amplified by (L+ - L-) / (2 eps) into the update; measured <= 1.5e-13 over this table
ATOL = 1e-12


def _decoder(config_cls, model_cls, **extra):
    def make():
        config = config_cls(
            vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=64, pad_token_id=0, **extra,
        )  # fmt: skip
        return getattr(transformers, model_cls)(config)

    return make


def _config(config_cls, model_cls, **kwargs):
    return lambda: getattr(transformers, model_cls)(getattr(transformers, config_cls)(**kwargs))


class FunctionalLM(nn.Module):
    """Parameters used without calling their module: a positional table the model owns and slices, and a head that
    reads the embedding's weight (a functional tied head)."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 16)
        self.positions = nn.Parameter(torch.randn(32, 16) * 0.1)
        self.layers = nn.ModuleList(nn.Sequential(nn.LayerNorm(16), nn.Linear(16, 16), nn.Tanh()) for _ in range(2))

    def forward(self, input_ids, labels, attention_mask=None):
        h = self.embed(input_ids) + self.positions[: input_ids.shape[1]]
        for layer in self.layers:
            h = h + layer(h)
        logits = h @ self.embed.weight.T
        loss = nn.functional.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), labels[:, 1:].reshape(-1))
        return {"loss": loss}


class SharedOutsideLM(FunctionalLM):
    """A block Linear (16 x 16) used inside every block: owned outside the blocks, perturbed inside them."""

    def __init__(self):
        super().__init__()
        self.shared = nn.Linear(16, 16)
        self.layers = nn.ModuleList(_SharedBlock(self.shared) for _ in range(2))


class _SharedBlock(nn.Module):
    def __init__(self, shared: nn.Linear):
        super().__init__()
        self.norm = nn.LayerNorm(16)
        self.__dict__["shared"] = shared  # not registered: the parameter belongs to the model, not to the block

    def forward(self, h):
        return torch.tanh(self.shared(self.norm(h)))


class InplaceAfterDeferredReadLM(FunctionalLM):
    """A tensor both streams share, read with perturbed values and then written in place outside the blocks: the
    engine's pending -eps run of the read must happen before the write."""

    def forward(self, input_ids, labels, attention_mask=None):
        scale = torch.ones(input_ids.shape[1], 1, dtype=self.positions.dtype)
        h = self.embed(input_ids) * scale + self.positions[: input_ids.shape[1]]
        scale.mul_(0.5)
        for layer in self.layers:
            h = h + layer(h)
        logits = (h * scale) @ self.embed.weight.T
        loss = nn.functional.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), labels[:, 1:].reshape(-1))
        return {"loss": loss}


def _lora_llama():
    """LoRA adapters inside the blocks and on the head (outside them): only adapters trainable."""
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(r=4, target_modules=["q_proj", "v_proj", "lm_head"], init_lora_weights=False)
    return get_peft_model(tiny_llama(), lora)


# fmt: off
FAMILIES = {
    # name: (make the model, kind of batch)
    "llama": (tiny_llama, "lm"),
    "llama_lora_with_head_adapter": (_lora_llama, "lm"),
    "qwen2": (_decoder(transformers.Qwen2Config, "Qwen2ForCausalLM", num_key_value_heads=2), "lm"),
    "gemma2": (
        _decoder(transformers.Gemma2Config, "Gemma2ForCausalLM", num_key_value_heads=2, head_dim=8, sliding_window=4),
        "lm",
    ),
    "phi3": (_decoder(transformers.Phi3Config, "Phi3ForCausalLM", num_key_value_heads=2), "lm"),
    "gpt_neox": (_decoder(transformers.GPTNeoXConfig, "GPTNeoXForCausalLM"), "lm"),
    "mixtral_router_logits": (
        _decoder(transformers.MixtralConfig, "MixtralForCausalLM", num_key_value_heads=2, num_local_experts=4,
                 num_experts_per_tok=2, output_router_logits=True, router_aux_loss_coef=0.5,
                 experts_implementation="eager"),  # grouped_mm has no float64 kernel
        "lm",
    ),
    "falcon": (_config("FalconConfig", "FalconForCausalLM", vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
                       num_attention_heads=4), "lm"),
    "bloom": (_config("BloomConfig", "BloomForCausalLM", vocab_size=VOCAB, hidden_size=32, n_layer=2, n_head=4), "lm"),
    "gpt2": (_config("GPT2Config", "GPT2LMHeadModel", vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4,
                     n_positions=64), "lm"),
    "opt": (_config("OPTConfig", "OPTForCausalLM", vocab_size=VOCAB, hidden_size=32, ffn_dim=64, num_hidden_layers=2,
                    num_attention_heads=4, max_position_embeddings=64, word_embed_proj_dim=32), "lm"),
    "roberta_cls": (_config("RobertaConfig", "RobertaForSequenceClassification", vocab_size=VOCAB, hidden_size=32,
                            intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                            max_position_embeddings=64, num_labels=2), "cls"),
    "distilbert_cls": (_config("DistilBertConfig", "DistilBertForSequenceClassification", vocab_size=VOCAB, dim=32,
                               hidden_dim=64, n_layers=2, n_heads=4, max_position_embeddings=64, num_labels=2),
                       "cls"),
    "bart": (_config("BartConfig", "BartForConditionalGeneration", vocab_size=VOCAB, d_model=32, encoder_layers=2,
                     decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
                     decoder_ffn_dim=64, max_position_embeddings=64), "seq2seq"),
    "t5": (_config("T5Config", "T5ForConditionalGeneration", vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64,
                   num_layers=2, num_decoder_layers=2, num_heads=4, relative_attention_num_buckets=8,
                   decoder_start_token_id=0), "seq2seq"),
    "functional_tied_head_and_sliced_positions": (FunctionalLM, "lm"),
    "parameter_owned_outside_the_blocks": (SharedOutsideLM, "lm"),
    "shared_tensor_written_in_place_after_a_perturbed_read": (InplaceAfterDeferredReadLM, "lm"),
}
# fmt: on


def _batches(kind: str, batch: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(batch)
    out = []
    for _ in range(STEPS):
        ids = torch.randint(1, VOCAB, (batch, SEQ), generator=g)
        mask = torch.ones_like(ids)
        mask[0, -2:] = 0  # one right-padded row: attention masks differ per example
        if kind == "lm":
            labels = ids.masked_fill(mask == 0, -100)
        elif kind == "cls":
            labels = (ids[:, 1] >= VOCAB // 2).long()
        else:
            labels = torch.randint(1, VOCAB, (batch, SEQ // 2), generator=g)
        out.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return out


def _model(make) -> nn.Module:
    torch.manual_seed(0)
    model = make().to(torch.float64).eval()
    for module in model.modules():  # as the Trainer integration does: no KV cache in the perturbed forwards
        if getattr(getattr(module, "config", None), "use_cache", False):
            module.config.use_cache = False
    return model


def _train(make, batches, offload: bool) -> nn.Module:
    """``STEPS`` MeZO-SGD steps: plain (in place, ``zo_training_step``'s ``offload="none"`` path) or offloaded."""
    model = _model(make)
    optimizer = ZOSGD([p for p in model.parameters() if p.requires_grad], lr=LR, seed=3)
    engine = None
    if offload:
        engine = ZO2Engine(model, find_block_list(model)[1], eps=EPS, device=torch.device("cpu"))
        engine.bind(optimizer)
    with torch.no_grad():
        for batch in batches:
            seed = optimizer.sample_seed(0)

            def loss_fn(batch=batch):
                return model(**batch)["loss"]

            if engine is not None:
                loss_plus, loss_minus = engine.perturbed_losses(loss_fn, seed)
            else:
                perturb_(optimizer.trainable(), seed, EPS)
                loss_plus = loss_fn()
                perturb_(optimizer.trainable(), seed, -2 * EPS)
                loss_minus = loss_fn()
                perturb_(optimizer.trainable(), seed, EPS)
            optimizer.accumulate(0, (float(loss_plus) - float(loss_minus)) / (2 * EPS))
            optimizer.step()
    if engine is not None:
        engine.flush()
    return model


@pytest.mark.parametrize("batch", [2, 4])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_offloaded_updates_equal_plain_mezo_in_float64(one_thread, family, batch):
    make, kind = FAMILIES[family]
    batches = _batches(kind, batch)
    plain = dict(_train(make, batches, offload=False).named_parameters())
    offloaded = dict(_train(make, batches, offload=True).named_parameters())
    initial = dict(_model(make).named_parameters())
    moved = max((plain[n] - initial[n]).abs().max().item() for n in plain)
    assert moved > 1e-5, moved  # the runs really trained
    for name, p in plain.items():
        torch.testing.assert_close(offloaded[name], p, rtol=0, atol=ATOL, msg=name)


# ---------------------------------------------------------------- refused before any update
class UnusedParameterLM(FunctionalLM):
    def __init__(self):
        super().__init__()
        self.unused_scale = nn.Parameter(torch.ones(16))


class ReadsOutLM(FunctionalLM):
    """Branches on a perturbed value outside the blocks (``.item()``): one forward cannot follow both streams."""

    def forward(self, input_ids, labels, attention_mask=None):
        h = self.embed(input_ids)
        scale = h.abs().mean().item()
        for layer in self.layers:
            h = h + layer(h) * scale
        logits = h @ self.embed.weight.T
        return {"loss": nn.functional.cross_entropy(logits.reshape(-1, VOCAB), labels.reshape(-1))}


class OpaqueLossLM(FunctionalLM):
    """Computes the loss where no ``__torch_function__`` mode can see it (as a custom kernel would)."""

    def forward(self, input_ids, labels, attention_mask=None):
        loss = super().forward(input_ids, labels)["loss"]
        with torch._C.DisableTorchFunction():
            return {"loss": loss * 1.0 + 0.0}


class WritesIntoViewLM(FunctionalLM):
    """Accumulates perturbed activations in place into a view of a buffer both streams would share."""

    def forward(self, input_ids, labels, attention_mask=None):
        h = self.embed(input_ids)
        total = torch.zeros(2, *h.shape, dtype=h.dtype)
        for layer in self.layers:
            h = h + layer(h)
        total[0].add_(h)
        logits = total[0] @ self.embed.weight.T
        return {"loss": nn.functional.cross_entropy(logits.reshape(-1, VOCAB), labels.reshape(-1))}


class OutArgumentLM(FunctionalLM):
    """Writes perturbed activations through ``out=`` into a preallocated buffer."""

    def forward(self, input_ids, labels, attention_mask=None):
        h = self.embed(input_ids)
        for layer in self.layers:
            h = h + layer(h)
        buffer = torch.empty_like(h)
        torch.mul(h, 2.0, out=buffer)
        logits = buffer @ self.embed.weight.T
        return {"loss": nn.functional.cross_entropy(logits.reshape(-1, VOCAB), labels.reshape(-1))}


class ReadsBlockWeightLM(FunctionalLM):
    """Reads a block's weight outside the block (stored offloaded, its update queued for the next upload)."""

    def forward(self, input_ids, labels, attention_mask=None):
        h = self.embed(input_ids)
        for layer in self.layers:
            h = h + layer(h)
        logits = (h @ self.layers[0][1].weight) @ self.embed.weight.T
        return {"loss": nn.functional.cross_entropy(logits.reshape(-1, VOCAB), labels.reshape(-1))}


class OpaqueGlueLM(FunctionalLM):
    """Scales the activations between two blocks where no ``__torch_function__`` mode can see it."""

    def forward(self, input_ids, labels, attention_mask=None):
        h = self.embed(input_ids) + self.positions[: input_ids.shape[1]]
        h = h + self.layers[0](h)
        with torch._C.DisableTorchFunction():
            h = h * 1.5
        h = h + self.layers[1](h)
        logits = h @ self.embed.weight.T
        return {"loss": nn.functional.cross_entropy(logits.reshape(-1, VOCAB), labels.reshape(-1))}


class OpaqueInplaceWriteLM(InplaceAfterDeferredReadLM):
    """Writes a tensor in place where no ``__torch_function__`` mode can see it, after a pending -eps operation
    read it."""

    def forward(self, input_ids, labels, attention_mask=None):
        scale = torch.ones(input_ids.shape[1], 1, dtype=self.positions.dtype)
        h = self.embed(input_ids) * scale
        with torch._C.DisableTorchFunction():
            scale.mul_(0.5)
        for layer in self.layers:
            h = h + layer(h)
        logits = h @ self.embed.weight.T
        return {"loss": nn.functional.cross_entropy(logits.reshape(-1, VOCAB), labels.reshape(-1))}


class TiedAcrossBlocksLM(FunctionalLM):
    def __init__(self):
        super().__init__()
        self.head = nn.Linear(16, 16, bias=False)
        self.head.weight = self.layers[1][1].weight


@pytest.mark.parametrize(
    ("make", "error", "words"),
    [
        (UnusedParameterLM, ValueError, "never used the trainable parameter.*unused_scale.*offload='none'"),
        (ReadsOutLM, RuntimeError, "branches on .*perturbed values.*offload='none'"),
        (OpaqueLossLM, RuntimeError, "loss does not depend on the perturbed parameters.*offload='none'"),
        (OpaqueGlueLM, RuntimeError, "differs from a forward on the -eps parameters alone.*offload='none'"),
        (OpaqueInplaceWriteLM, RuntimeError, "modified in place before its -eps stream ran.*offload='none'"),
        (WritesIntoViewLM, RuntimeError, "in-place add_ .*view of a tensor both streams share.*offload='none'"),
        (OutArgumentLM, RuntimeError, r"mul\(out=...\) outside the transformer blocks.*offload='none'"),
        (
            ReadsBlockWeightLM,
            RuntimeError,
            r"layers\.0\.1\.weight is used outside its transformer block.*offload='none'",
        ),
    ],
)
def test_models_the_offloaded_forward_cannot_follow_are_refused_before_any_update(make, error, words):
    model = _model(make)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = ZOSGD(list(model.parameters()), lr=LR, seed=3)
    engine = ZO2Engine(model, model.layers, eps=EPS, device=torch.device("cpu"))
    engine.bind(optimizer)
    batch = _batches("lm", 2)[0]
    with pytest.raises(error, match=words):
        engine.perturbed_losses(lambda: model(**batch)["loss"], optimizer.sample_seed(0))
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), before[n], rtol=0, atol=0, msg=n)


def test_a_block_parameter_tied_outside_the_blocks_is_refused_at_construction():
    model = _model(TiedAcrossBlocksLM)
    with pytest.raises(ValueError, match=r"head\.weight.*tied.*offload='none'"):
        ZO2Engine(model, model.layers, eps=EPS, device=torch.device("cpu"))


def test_a_kv_cache_shared_by_both_streams_is_refused():
    model = tiny_llama().double().eval()
    model.config.use_cache = True  # the Trainer integration turns it off; a direct caller may not
    optimizer = ZOSGD(list(model.parameters()), lr=LR, seed=3)
    engine = ZO2Engine(model, model.model.layers, eps=EPS, device=torch.device("cpu"))
    engine.bind(optimizer)
    batch = _batches("lm", 2)[0]
    with pytest.raises(RuntimeError, match="model.layers.0 received a KV cache.*use_cache=False"):
        engine.perturbed_losses(lambda: model(**batch, use_cache=True)["loss"], optimizer.sample_seed(0))
