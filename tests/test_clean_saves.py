"""What a user saves loads alone: VeLoRA's ``save_model`` is plain weights, a pretraining folder carries its tokenizer."""

from __future__ import annotations

import logging

import torch
from conftest import TokenDataset, tiny_llama, training_args
from safetensors import safe_open
from transformers import LlamaForCausalLM, Trainer

from hf_memopt import attach
from hf_memopt.velora import VeLoRAConfig, apply_velora, without_velora_buffers
from hf_memopt.velora.layer import BUFFER_NAME


def _keys(folder) -> set[str]:
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        return set(f.keys())


def test_velora_save_model_loads_in_plain_from_pretrained_without_unexpected_keys(tmp_path, caplog, capsys):
    args = training_args(tmp_path / "run", max_steps=2, save_strategy="steps", save_steps=2)
    trainer = Trainer(model=tiny_llama(seed=3), args=args, train_dataset=TokenDataset(n=16))
    attach(trainer, VeLoRAConfig(num_groups=8, init="batch_average_once"))
    trainer.train()
    trainer.save_model(str(tmp_path / "final"))

    # the checkpoint keeps v (resume restores it exactly); the user's save does not
    assert any(k.endswith(BUFFER_NAME) for k in _keys(tmp_path / "run" / "checkpoint-2"))
    assert not any(k.endswith(BUFFER_NAME) for k in _keys(tmp_path / "final"))
    assert any(k.endswith(BUFFER_NAME) for k in trainer.model.state_dict())  # the live model still has v
    # a state_dict computed before the save (the Trainer does so under FSDP / DeepSpeed) is filtered too
    trainer.model.save_pretrained(tmp_path / "given", state_dict=trainer.model.state_dict())
    assert _keys(tmp_path / "given") == _keys(tmp_path / "final")

    caplog.clear()
    capsys.readouterr()
    with caplog.at_level(logging.INFO):
        loaded, info = LlamaForCausalLM.from_pretrained(tmp_path / "final", output_loading_info=True)
    assert info["unexpected_keys"] == set() or info["unexpected_keys"] == []
    assert not info["missing_keys"] and not info["mismatched_keys"]
    report = caplog.text + "".join(capsys.readouterr())
    assert "UNEXPECTED" not in report.upper() and BUFFER_NAME not in report

    ids = TokenDataset(n=4)[0]["input_ids"][None]
    trainer.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(ids).logits, trainer.model(ids).logits, rtol=0, atol=0)


def test_without_velora_buffers_drops_v_from_the_save_and_restores_it_after(tmp_path):
    model = tiny_llama()
    apply_velora(model, VeLoRAConfig(num_groups=8, init="random"))
    type(model).save_pretrained(model, tmp_path / "raw")
    with without_velora_buffers(model):
        type(model).save_pretrained(model, tmp_path / "plain")
    assert any(k.endswith(BUFFER_NAME) for k in _keys(tmp_path / "raw"))
    assert not any(k.endswith(BUFFER_NAME) for k in _keys(tmp_path / "plain"))
    assert any(k.endswith(BUFFER_NAME) for k in model.state_dict())  # restored after the save


def test_pretraining_save_model_folder_loads_alone_with_its_tokenizer_and_an_adamw_card(tmp_path):
    from huggingface_hub import ModelCard
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_memopt.tools.recipes.pretrain import run_pretrain

    result = run_pretrain(
        size="20m", steps=1, seq_len=16, batch_size=2, output_dir=str(tmp_path), sources=("c4_demo",), eval_blocks=2
    )
    # no method (the CLI's AdamW row): the runner installs the card; the evaluation after training reaches it
    card = ModelCard.load(tmp_path / "README.md", ignore_metadata_errors=False)
    assert card.data.datasets == ["allenai/c4"] and card.data.base_model is None
    assert card.data.tags == ["hf-memopt", "generated_from_trainer"] and "pretrained from scratch" in card.text
    assert [(r.dataset_type, r.metric_type, r.metric_value) for r in card.data.eval_results] == [
        ("allenai/c4", "loss", result.metrics["loss"])
    ]
    result.trainer.save_model(str(tmp_path))
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert model.config.vocab_size == len(tokenizer)
    ids = tokenizer("memory efficient training", return_tensors="pt")["input_ids"]
    assert model(ids).logits.shape == (1, ids.shape[1], len(tokenizer))


def test_velora_with_loqt_saves_one_plain_model_with_both_plain_forms(tmp_path):
    from hf_memopt.loqt import LoQTConfig

    args = training_args(tmp_path / "run", max_steps=2, save_strategy="steps", save_steps=2)
    trainer = Trainer(model=tiny_llama(seed=4), args=args, train_dataset=TokenDataset(n=16))
    attach(trainer, VeLoRAConfig(num_groups=8, target_modules=["gate_proj", "up_proj", "down_proj"]))
    attach(trainer, LoQTConfig(rank=4, merge_every=2, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    trainer.train()
    trainer.save_model(str(tmp_path / "final"))
    assert any(k.endswith(BUFFER_NAME) for k in _keys(tmp_path / "run" / "checkpoint-2"))  # raw: resumable
    loaded, info = LlamaForCausalLM.from_pretrained(tmp_path / "final", output_loading_info=True)
    assert not info["unexpected_keys"] and not info["missing_keys"]
    assert set(loaded.state_dict()) == set(tiny_llama().state_dict())
    ids = TokenDataset(n=4)[1]["input_ids"][None]
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(ids).logits, trainer.model.eval()(ids).logits, rtol=1e-5, atol=1e-5)
