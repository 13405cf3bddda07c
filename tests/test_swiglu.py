"""hf_memopt.shared.swiglu: SwiGLU MLPs recompute SiLU in backward, same bits, one saved intermediate less."""

import copy

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from hf_memopt.shared.swiglu import silu_mul, use_recomputed_swiglu
from hf_memopt.tools.recipes.recipe import MemorySettings

INTERMEDIATE = 96


def _llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=64, intermediate_size=INTERMEDIATE, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=4, vocab_size=100)  # fmt: skip
    return LlamaForCausalLM(config)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_loss_and_every_gradient_are_the_same_bits_as_the_models_own_mlp(checkpointing):
    own = _llama()
    recomputed = copy.deepcopy(own)
    assert use_recomputed_swiglu(recomputed) == ["model.layers.0.mlp", "model.layers.1.mlp"]
    ids = torch.randint(0, 100, (2, 7), generator=torch.Generator().manual_seed(1))
    losses = []
    for model in (own, recomputed):
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        losses.append(loss)
    assert torch.equal(losses[0], losses[1])
    for (name, a), b in zip(own.named_parameters(), recomputed.parameters()):
        assert torch.equal(a.grad, b.grad), name


def test_silu_mul_gradients_match_float64_autograd():
    gate = torch.randn(5, 8, dtype=torch.float64, requires_grad=True)
    up = torch.randn(5, 8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(silu_mul, (gate, up))


def _saved_intermediates(model: nn.Module, tokens: int) -> int:
    """How many distinct tokens x intermediate tensors autograd keeps for backward during one forward."""
    saved = set()

    def pack(t):
        if t.shape[-1] == INTERMEDIATE and t.numel() == tokens * INTERMEDIATE:
            saved.add(t.untyped_storage().data_ptr())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(torch.randn(1, tokens, 64))
    return len(saved)


def test_each_mlp_keeps_two_intermediates_for_backward_and_its_product_not_three():
    own = _llama().model.layers[0].mlp
    recomputed = copy.deepcopy(own)
    use_recomputed_swiglu(recomputed)
    # own: gate(x) for SiLU, silu(gate) and up(x) for the product, the product for down_proj
    assert _saved_intermediates(own, tokens=5) == 4
    assert _saved_intermediates(recomputed, tokens=5) == 3


def test_a_model_without_swiglu_mlps_is_refused():
    model = nn.Sequential(nn.Linear(4, 8), nn.GELU(), nn.Linear(8, 4))
    with pytest.raises(ValueError, match="recompute_swiglu: the model has no SwiGLU MLP"):
        use_recomputed_swiglu(model)


class _ScaledGateMLP(nn.Module):
    """Shaped as a SwiGLU MLP, computing something else: must be refused, not recomputed as SwiGLU."""

    def __init__(self):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = nn.Linear(4, 6), nn.Linear(4, 6), nn.Linear(6, 4)
        self.act_fn = nn.SiLU()

    def forward(self, x):
        return self.down_proj(self.act_fn(2 * self.gate_proj(x)) * self.up_proj(x))


def test_an_mlp_whose_forward_is_not_swiglu_is_refused_and_left_as_it_is():
    model = nn.Sequential(_ScaledGateMLP())
    forward = model[0].forward
    with pytest.raises(ValueError, match=r"recompute_swiglu: 0 \(_ScaledGateMLP\) does not compute"):
        use_recomputed_swiglu(model)
    assert model[0].forward == forward


class _DropoutMLP(nn.Module):
    """SwiGLU with a dropout on the product (as GTE's or T5Gemma's MLPs): equal in eval mode, not in training."""

    def __init__(self):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = nn.Linear(4, 6), nn.Linear(4, 6), nn.Linear(6, 4)
        self.act_fn, self.dropout = nn.SiLU(), nn.Dropout(0.5)

    def forward(self, x):
        return self.down_proj(self.dropout(self.act_fn(self.gate_proj(x)) * self.up_proj(x)))


def test_an_mlp_with_a_dropout_in_its_forward_is_refused():
    with pytest.raises(ValueError, match=r"0 \(_DropoutMLP\) does not compute"):
        use_recomputed_swiglu(nn.Sequential(_DropoutMLP()))


def test_on_the_meta_device_a_llama_mlp_is_accepted_and_a_dropout_mlp_refused_as_on_real_tensors():
    # the estimator's models live on the meta device: the probe runs on a small CPU stand-in of each module
    with torch.device("meta"):
        llama, dropout = _llama(), nn.Sequential(_DropoutMLP())
    assert use_recomputed_swiglu(llama) == ["model.layers.0.mlp", "model.layers.1.mlp"]
    assert llama.model.layers[0].mlp.gate_proj.weight.device.type == "meta"  # the model itself is left on meta
    with pytest.raises(ValueError, match=r"0 \(_DropoutMLP\) does not compute"):
        use_recomputed_swiglu(dropout)


def test_a_frozen_bfloat16_projection_beside_float32_ones_is_accepted_on_real_and_meta_models_alike():
    # freeze_modules(..., "bfloat16") casts around the frozen projection: the MLP still computes in float32
    from hf_memopt.shared.frozen import freeze_modules

    real = _llama()
    with torch.device("meta"):
        meta = _llama()
    for model in (real, meta):
        freeze_modules(model, r".*layers\.\d+\.mlp\.gate_proj", "bfloat16")
        assert use_recomputed_swiglu(model) == ["model.layers.0.mlp", "model.layers.1.mlp"]
    ids = torch.randint(0, 100, (1, 5), generator=torch.Generator().manual_seed(3))
    own = _llama()
    freeze_modules(own, r".*layers\.\d+\.mlp\.gate_proj", "bfloat16")
    assert torch.equal(real(input_ids=ids).logits, own(input_ids=ids).logits)


class _ConvGateMLP(_ScaledGateMLP):
    """A gate that is not an nn.Linear: on the meta device the probe cannot shrink it, so it is refused by name."""

    def __init__(self):
        super().__init__()
        self.gate_proj = nn.Conv1d(4, 6, 1)
        self.gate_proj.in_features = 4


def test_a_meta_mlp_that_cannot_be_probed_is_refused_with_the_reason():
    with torch.device("meta"):
        model = nn.Sequential(_ConvGateMLP())
    with pytest.raises(ValueError, match=r"0 \(_ConvGateMLP\) cannot be checked on the meta device: its gate_proj is a "
                                         r"Conv1d, not an nn.Linear"):  # fmt: skip
        use_recomputed_swiglu(model)


def test_a_model_with_recomputed_mlps_pickles_and_loads_with_the_same_outputs():
    import io

    model = _llama()
    use_recomputed_swiglu(model)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    ids = torch.randint(0, 100, (1, 5), generator=torch.Generator().manual_seed(2))
    assert torch.equal(loaded(input_ids=ids).logits, model(input_ids=ids).logits)
    assert loaded.model.layers[0].mlp.forward.args[0] is loaded.model.layers[0].mlp


def test_applying_it_twice_changes_nothing():
    model = _llama()
    use_recomputed_swiglu(model)
    forward = model.model.layers[0].mlp.forward
    use_recomputed_swiglu(model)
    assert model.model.layers[0].mlp.forward is forward


def test_recipe_memory_setting_applies_it_and_validates_its_value():
    model = MemorySettings(recompute_swiglu=True).prepare(_llama())
    assert model.model.layers[0].mlp._hf_memopt_recomputed_swiglu
    with pytest.raises(ValueError, match="recompute_swiglu"):
        MemorySettings(recompute_swiglu="yes")
