"""VeLoRA: compression math against slow references, v initialisation, memory really freed, Trainer paths, resume,
composition with GaLore, PEFT's LoRA variant under our memory report, bad input."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import TokenDataset, tiny_bert_classifier, tiny_llama, training_args
from torch import nn
from transformers import Trainer

from hf_memopt import GaLoreConfig, MemoryReportCallback, attach
from hf_memopt.core.registry import attached_configs
from hf_memopt.velora import (
    VeLoRAConfig,
    apply_velora,
    compress,
    compression_report,
    reconstruct,
    remove_velora,
    velora_linear,
)
from hf_memopt.velora.layer import BUFFER_NAME, initial_direction

LLAMA_MLP = ["gate_proj", "up_proj", "down_proj"]
LLAMA_AUTO = ["down_proj"]  # the widest input of the block, read by down_proj alone


def unit(v: torch.Tensor) -> torch.Tensor:
    return v / v.norm()


def reference_x_hat(x: torch.Tensor, v: torch.Tensor, num_groups: int) -> torch.Tensor:
    """Slow, obvious Eq. 3-4: every sub-token replaced by <sub-token, v> v, one loop iteration per sub-token."""
    tokens = x.reshape(-1, x.shape[-1])
    d = x.shape[-1] // num_groups
    out = torch.empty_like(tokens)
    for t in range(tokens.shape[0]):
        for g in range(num_groups):
            sub = tokens[t, g * d : (g + 1) * d]
            out[t, g * d : (g + 1) * d] = torch.dot(sub, v) * v
    return out


def batch_of(n: int = 4, seed: int = 0) -> torch.Tensor:
    return TokenDataset(n=n, seed=seed).ids


# ---------------------------------------------------------------------------------------------------------------
# math


def test_compress_and_reconstruct_match_the_sub_token_projection_reference():
    torch.manual_seed(0)
    x, v = torch.randn(2, 3, 12, dtype=torch.float64), unit(torch.randn(3, dtype=torch.float64))
    coefficients = compress(x, v, 4, torch.float64)
    assert coefficients.shape == (6, 4)
    torch.testing.assert_close(reconstruct(coefficients, v), reference_x_hat(x, v, 4), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(reconstruct(coefficients, v, scale=2.5), 2.5 * reference_x_hat(x, v, 4))


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("scale", [1.0, 0.5])
def test_gradients_match_the_reference_float64(bias, scale):
    torch.manual_seed(1)
    x = torch.randn(2, 5, 12, dtype=torch.float64, requires_grad=True)
    w = torch.randn(7, 12, dtype=torch.float64, requires_grad=True)
    b = torch.randn(7, dtype=torch.float64, requires_grad=True) if bias else None
    v = unit(torch.randn(4, dtype=torch.float64))
    grad_out = torch.randn(2, 5, 7, dtype=torch.float64)

    out = velora_linear(x, w, b, v, 3, scale, torch.float64)
    out.backward(grad_out)
    x_ref, w_ref = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    b_ref = b.detach().clone().requires_grad_() if bias else None
    out_ref = F.linear(x_ref, w_ref, b_ref)
    out_ref.backward(grad_out)

    torch.testing.assert_close(out, out_ref, rtol=0, atol=0)  # the forward is the normal one
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-12, atol=1e-12)  # grad_input uses the true weight
    expected_w = scale * grad_out.reshape(-1, 7).t() @ reference_x_hat(x.detach(), v, 3)  # Eq. 4
    torch.testing.assert_close(w.grad, expected_w, rtol=1e-10, atol=1e-10)
    if bias:
        torch.testing.assert_close(b.grad, b_ref.grad, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(w.grad, w_ref.grad)  # it is an approximation of the exact weight gradient


def test_weight_gradient_is_exact_when_every_sub_token_is_parallel_to_v():
    torch.manual_seed(2)
    v = unit(torch.randn(4, dtype=torch.float64))
    x = (torch.randn(3, 6, 2, 1, dtype=torch.float64) * v).reshape(3, 6, 8)
    w = torch.randn(5, 8, dtype=torch.float64, requires_grad=True)
    w_ref = w.detach().clone().requires_grad_()
    velora_linear(x, w, None, v, 2, 1.0, torch.float64).square().sum().backward()
    F.linear(x, w_ref).square().sum().backward()
    torch.testing.assert_close(w.grad, w_ref.grad, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype_name, dtype", [("bfloat16", torch.bfloat16), ("float16", torch.float16)])
def test_only_low_precision_coefficients_are_saved_for_the_input(dtype_name, dtype):
    layer = nn.Linear(16, 8)
    apply_velora(nn.Sequential(layer), VeLoRAConfig(target_modules=["0"], num_groups=4, coefficient_dtype=dtype_name))
    saved = []

    def pack(t):
        saved.append(t)
        return t

    x = torch.randn(3, 5, 16, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = layer(x)
    non_parameters = [t for t in saved if t.data_ptr() not in (layer.weight.data_ptr(), getattr(layer, BUFFER_NAME).data_ptr())]
    assert [tuple(t.shape) for t in non_parameters] == [(15, 4)]
    assert non_parameters[0].dtype == dtype
    out.sum().backward()
    assert layer.weight.grad is not None and x.grad is not None


# ---------------------------------------------------------------------------------------------------------------
# v initialisation and module patching


def test_batch_average_once_sets_v_from_the_first_training_batch_only():
    model = tiny_llama()
    apply_velora(model, VeLoRAConfig(target_modules=["v_proj"], num_groups=8))
    layer = model.model.layers[0].self_attn.v_proj
    assert not getattr(layer, BUFFER_NAME).any()
    seen = []
    layer.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach().clone()))
    model.eval()
    model(input_ids=batch_of())  # evaluation does not initialise
    assert not getattr(layer, BUFFER_NAME).any()
    model.train()
    model(input_ids=batch_of(seed=1))
    sub_tokens = seen[-1].reshape(-1, 4).double()
    expected = unit(sub_tokens.mean(0)).float()
    torch.testing.assert_close(getattr(layer, BUFFER_NAME), expected)
    model(input_ids=batch_of(seed=2))
    torch.testing.assert_close(getattr(layer, BUFFER_NAME), expected)


def test_batch_average_recomputes_v_every_training_batch():
    model = tiny_llama()
    apply_velora(model, VeLoRAConfig(target_modules=["down_proj"], num_groups=8, init="batch_average"))
    layer = model.model.layers[1].mlp.down_proj
    model(input_ids=batch_of(seed=1)).logits.sum().backward()
    first = getattr(layer, BUFFER_NAME).clone()
    model(input_ids=batch_of(seed=2)).logits.sum().backward()
    assert not torch.allclose(first, getattr(layer, BUFFER_NAME))
    torch.testing.assert_close(getattr(layer, BUFFER_NAME).norm(), torch.tensor(1.0))


def test_svd_init_is_the_top_right_singular_vector_of_the_sub_tokens():
    torch.manual_seed(3)
    x = torch.randn(6, 5, 12) + torch.tensor([3.0, -1.0, 0.5])  .repeat(4)
    v = initial_direction(x, 4, "svd")
    top = torch.linalg.svd(x.reshape(-1, 3).double()).Vh[0].float()
    torch.testing.assert_close(v.abs(), top.abs(), rtol=1e-4, atol=1e-5)
    assert torch.dot(v, x.reshape(-1, 3).mean(0)) > 0


def test_random_init_is_seeded_and_unit_norm():
    a, b = tiny_llama(), tiny_llama()
    apply_velora(a, VeLoRAConfig(target_modules=["q_proj"], num_groups=8, init="random", seed=7))
    apply_velora(b, VeLoRAConfig(target_modules=["q_proj"], num_groups=8, init="random", seed=7))
    va, vb = (getattr(m.model.layers[0].self_attn.q_proj, BUFFER_NAME) for m in (a, b))
    torch.testing.assert_close(va, vb, rtol=0, atol=0)
    torch.testing.assert_close(va.norm(), torch.tensor(1.0))
    other = getattr(a.model.layers[1].self_attn.q_proj, BUFFER_NAME)
    assert not torch.allclose(va, other)


def test_patch_keeps_module_types_and_state_dict_keys_plus_one_buffer_and_can_be_removed():
    model = tiny_llama()
    keys = set(model.state_dict())
    targets = apply_velora(model, VeLoRAConfig(target_modules="auto", num_groups=8))
    assert sorted({n.rsplit(".", 1)[-1] for n in targets}) == sorted(LLAMA_AUTO)
    assert all(type(m) is nn.Linear for m in targets.values())
    assert set(model.state_dict()) - keys == {f"{n}.{BUFFER_NAME}" for n in targets}
    assert keys <= set(model.state_dict())
    assert remove_velora(model) == len(targets)
    assert set(model.state_dict()) == keys
    assert all("forward" not in m.__dict__ for m in targets.values())


def test_eval_no_grad_and_frozen_weights_use_the_original_forward():
    model = tiny_llama()
    reference = tiny_llama()
    apply_velora(model, VeLoRAConfig(target_modules=LLAMA_MLP, num_groups=8))
    ids = batch_of()
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, reference(input_ids=ids).logits, rtol=0, atol=0)
    layer = model.model.layers[0].mlp.gate_proj
    layer.weight.requires_grad_(False)
    model(input_ids=ids).logits.sum().backward()
    assert layer.weight.grad is None and not getattr(layer, BUFFER_NAME).any()


def test_gradient_checkpointing_gives_the_same_gradients():
    ids = batch_of()
    grads = []
    for checkpointing in (False, True):
        model = tiny_llama()
        apply_velora(model, VeLoRAConfig(num_groups=8))
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        model(input_ids=ids, labels=ids).loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, msg=name)


# ---------------------------------------------------------------------------------------------------------------
# memory: compressing only part of a shared input frees nothing; the auto targets do free it


def _loss_fn(model, ids):
    return lambda: model(input_ids=ids, labels=ids).loss


def test_paper_targets_on_llama_leave_v_proj_input_saved_by_q_and_k(caplog):
    ids = batch_of()
    baseline = compression_report(tiny_llama(), _loss_fn(tiny_llama(), ids), targets={})
    model = tiny_llama()
    with caplog.at_level("WARNING"):
        apply_velora(model, VeLoRAConfig(target_modules=["v_proj", "down_proj"], num_groups=8))
    assert "q_proj" in caplog.text and "no memory is freed" in caplog.text
    report = compression_report(model, _loss_fn(model, ids))
    assert sorted(report.still_saved) == ["model.layers.0.self_attn.v_proj", "model.layers.1.self_attn.v_proj"]
    assert report.saved_bytes < baseline.saved_bytes  # down_proj's input is freed


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_auto_targets_free_every_compressed_input_on_llama(attn):
    ids = batch_of()
    plain = tiny_llama()
    plain.config._attn_implementation = attn
    baseline = compression_report(plain, _loss_fn(plain, ids), targets={})
    model = tiny_llama()
    model.config._attn_implementation = attn
    targets = apply_velora(model, VeLoRAConfig(num_groups=8))
    assert any(n.endswith("o_proj") for n in targets) == (attn == "eager")
    report = compression_report(model, _loss_fn(model, ids))
    assert report.still_saved == {}
    # one bf16 coefficient tensor (tokens x 8) per compressed input (down_proj's; o_proj's too with eager), plus v
    distinct_inputs = (2 if attn == "eager" else 1) * len(model.model.layers)
    coefficient_bytes = distinct_inputs * ids.numel() * 8 * 2
    v_bytes = sum(getattr(m, BUFFER_NAME).nbytes for m in targets.values())
    assert report.saved_bytes <= baseline.saved_bytes - report.target_input_bytes + coefficient_bytes + v_bytes


def test_auto_targets_free_every_compressed_input_on_bert():
    ids = batch_of()
    labels = torch.zeros(len(ids), dtype=torch.long)
    run = lambda m: (lambda: m(input_ids=ids, labels=labels).loss)  # noqa: E731
    plain = tiny_bert_classifier()
    baseline = compression_report(plain, run(plain), targets={})
    model = tiny_bert_classifier()
    targets = apply_velora(model, VeLoRAConfig(num_groups=8))
    assert {n.split("layer.0.")[-1] for n in targets if "layer.0." in n} == {"output.dense"}
    report = compression_report(model, run(model))
    assert report.still_saved == {}
    assert report.saved_bytes < baseline.saved_bytes - report.target_input_bytes // 2


# ---------------------------------------------------------------------------------------------------------------
# Trainer


def _trainer(tmp_path, model=None, **overrides):
    args = training_args(tmp_path, **overrides)
    return Trainer(model=model or tiny_llama(), args=args, train_dataset=TokenDataset(n=48))


def test_trainer_loss_goes_down_and_memory_report_shows_fewer_activation_bytes(tmp_path):
    losses, activations = {}, {}
    for name in ("plain", "velora"):
        trainer = _trainer(tmp_path / name, max_steps=8)
        report = MemoryReportCallback(print_table=False)
        trainer.add_callback(report)
        if name == "velora":
            attach(trainer, VeLoRAConfig(num_groups=8))
        trainer.train()
        history = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        assert history[-1] < history[0]
        losses[name], activations[name] = history[-1], report.breakdown.activations
    assert activations["velora"] < activations["plain"]
    assert abs(losses["velora"] - losses["plain"]) < 0.25 * losses["plain"]


def test_velora_composes_with_galore(tmp_path):
    trainer = _trainer(tmp_path, max_steps=6)
    attach(trainer, VeLoRAConfig(target_modules=["v_proj", "down_proj", "q_proj", "k_proj"], num_groups=8))
    attach(trainer, GaLoreConfig(rank=4, update_proj_gap=2, target_modules=LLAMA_MLP))
    assert [type(c).__name__ for c in attached_configs(trainer)] == ["VeLoRAConfig", "GaLoreConfig"]
    trainer.train()
    history = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert history[-1] < history[0]
    assert getattr(trainer.model.model.layers[0].mlp.down_proj, BUFFER_NAME).any()
    assert type(trainer.optimizer.optimizer).__name__ == "GaLoreAdamW"


@pytest.mark.parametrize("init", ["batch_average_once", "batch_average"])
def test_trainer_resume_reproduces_the_uninterrupted_run(tmp_path, init):
    def run(output_dir, resume=None):
        trainer = _trainer(output_dir, model=tiny_llama(seed=5), max_steps=6, save_strategy="steps", save_steps=3)
        attach(trainer, VeLoRAConfig(num_groups=8, init=init))
        trainer.train(resume_from_checkpoint=resume)
        return trainer

    straight = run(tmp_path / "a")
    resumed = run(tmp_path / "b", resume=str(tmp_path / "a" / "checkpoint-3"))
    a_state, b_state = straight.model.state_dict(), resumed.model.state_dict()
    assert any(k.endswith(BUFFER_NAME) for k in a_state)
    for name in a_state:
        torch.testing.assert_close(a_state[name], b_state[name], rtol=0, atol=0, msg=name)


# ---------------------------------------------------------------------------------------------------------------
# PEFT's own VeLoRA for LoRA adapters, measured by our memory report


def test_peft_lora_velora_variant_saves_fewer_activation_bytes_under_our_report(tmp_path):
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora.config import VeloraConfig

    activations, losses = {}, {}
    for name in ("lora", "lora+velora"):
        velora = VeloraConfig(num_groups=8, init_type="batch_average_once") if name != "lora" else None
        lora = LoraConfig(r=4, target_modules=LLAMA_MLP, lora_dropout=0.0, velora_config=velora)
        model = get_peft_model(tiny_llama(), lora)
        trainer = _trainer(tmp_path / name, model=model, max_steps=4, learning_rate=5e-3)
        report = MemoryReportCallback(print_table=False)
        trainer.add_callback(report)
        trainer.train()
        activations[name] = report.breakdown.activations
        losses[name] = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert activations["lora+velora"] < activations["lora"]
    assert losses["lora+velora"][-1] < losses["lora+velora"][0]


def test_targeting_a_peft_lora_layer_points_to_peft_velora():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["v_proj"]))
    with pytest.raises(ValueError, match="velora_config"):
        apply_velora(model, VeLoRAConfig(target_modules=r".*\.v_proj", num_groups=8))


# ---------------------------------------------------------------------------------------------------------------
# bad input


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"num_groups": 0}, "num_groups"),
        ({"num_groups": 2.0}, "num_groups"),
        ({"init": "orthogonal"}, "init"),
        ({"scale": 0.0}, "scale"),
        ({"coefficient_dtype": "int8"}, "coefficient_dtype"),
        ({"target_modules": []}, "target_modules"),
        ({"seed": "0"}, "seed"),
    ],
)
def test_bad_config_values_raise_value_error_naming_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        VeLoRAConfig(**kwargs)


def test_num_groups_that_does_not_divide_a_width_raises_and_leaves_the_model_untouched():
    model = tiny_llama()  # hidden 32, intermediate 72
    with pytest.raises(ValueError, match=r"num_groups.*down_proj.*in_features=72"):
        apply_velora(model, VeLoRAConfig(target_modules=["q_proj", "down_proj"], num_groups=16))
    assert not any(BUFFER_NAME in k for k in model.state_dict())


def test_no_matching_layer_raises(tmp_path):
    trainer = _trainer(tmp_path)
    with pytest.raises(ValueError, match="target_modules"):
        attach(trainer, VeLoRAConfig(target_modules=["qkv_proj"], num_groups=8))
    with pytest.raises(ValueError, match="target_modules"):
        apply_velora(tiny_llama(), VeLoRAConfig(target_modules=r"nothing\..*", num_groups=8))


def test_auto_for_an_unknown_architecture_asks_for_explicit_targets():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=32))
    with pytest.raises(ValueError, match="model_type='gpt2'"):
        apply_velora(model, VeLoRAConfig(num_groups=4))


def test_attaching_twice_raises(tmp_path):
    trainer = _trainer(tmp_path)
    attach(trainer, VeLoRAConfig(num_groups=8))
    with pytest.raises(ValueError, match="already attached"):
        attach(trainer, VeLoRAConfig(num_groups=8))
