"""Model cards: Hub metadata, method hyperparameters, measured memory, the corrected optimizer line, idempotence."""

from __future__ import annotations

import pytest
from conftest import TokenDataset, tiny_llama, training_args
from huggingface_hub import ModelCard
from transformers import Trainer

from hf_memopt import GaLoreConfig, MemoryReportCallback, VeLoRAConfig, attach
from hf_memopt.modelcard import ModelCardCallback, build_model_card, install_model_card

BASE = "hf-internal-testing/tiny-random-LlamaForCausalLM"


def make_trainer(tmp_path, *configs, memory=True, **overrides):
    callbacks = [MemoryReportCallback(print_table=False)] if memory else []
    args = training_args(tmp_path / "run", max_steps=2, eval_strategy="steps", eval_steps=2, **overrides)
    trainer = Trainer(
        model=tiny_llama(), args=args, train_dataset=TokenDataset(), eval_dataset=TokenDataset(n=8), callbacks=callbacks
    )
    for config in configs:
        attach(trainer, config)
    install_model_card(trainer, base_model=BASE, datasets="arith-progressions", license="apache-2.0")
    return trainer


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("card")
    trainer = make_trainer(
        tmp_path,
        VeLoRAConfig(num_groups=4),
        GaLoreConfig(rank=4, update_proj_gap=7),
        save_strategy="steps",
        save_steps=1,
    )
    trainer.train()
    trainer.save_model(str(tmp_path / "final"))
    return trainer, tmp_path


def test_card_has_hub_metadata_methods_hyperparameters_and_memory(trained):
    trainer, tmp_path = trained
    card = ModelCard.load(tmp_path / "final" / "README.md")
    data = card.data.to_dict()
    assert data["base_model"] == BASE and data["datasets"] == ["arith-progressions"]
    assert data["license"] == "apache-2.0" and data["library_name"] == "transformers"
    assert data["tags"][:3] == ["hf-memopt", "velora", "galore"]
    results = data["model-index"][0]["results"][0]
    assert results["dataset"]["name"] == "arith-progressions" and results["metrics"][0]["type"] == "loss"
    eval_loss = [e["eval_loss"] for e in trainer.state.log_history if "eval_loss" in e][-1]
    assert results["metrics"][0]["value"] == pytest.approx(eval_loss)
    text = card.text
    assert "| update_proj_gap | `7` |" in text and "| num_groups | `4` |" in text
    breakdown = next(c for c in trainer.callback_handler.callbacks if isinstance(c, MemoryReportCallback)).breakdown
    assert "### Measured memory" in text and f"| this run | {breakdown.parameters / 2**20:.1f} |" in text


def test_optimizer_line_names_the_hf_memopt_optimizer_not_args_optim(trained):
    trainer, tmp_path = trained
    text = (tmp_path / "final" / "README.md").read_text()
    line = next(line for line in text.splitlines() if line.startswith("- optimizer:"))
    assert "GaLoreAdamW" in line and "hf_memopt galore" in line and "betas=(0.9,0.999)" in line
    assert "Use adamw" not in text and "TrainingArguments.optim=adamw_torch" in line


def test_card_is_written_into_checkpoints_and_output_dir(trained):
    trainer, tmp_path = trained
    for folder in ("run/checkpoint-1", "run/checkpoint-2", "run"):
        assert "hf-memopt" in ModelCard.load(tmp_path / folder / "README.md").data.tags


def test_rewriting_the_card_is_idempotent(trained):
    trainer, tmp_path = trained
    path = tmp_path / "final" / "README.md"
    first = path.read_text()
    trainer.save_model(str(tmp_path / "final"))
    trainer.save_model(str(tmp_path / "final"))
    assert path.read_text() == first
    assert first.count("## Memory-efficient training") == 1
    assert install_model_card(trainer) is install_model_card(trainer)
    assert sum(isinstance(c, ModelCardCallback) for c in trainer.callback_handler.callbacks) == 1


def test_stock_create_model_card_is_replaced_by_ours(trained):
    trainer, tmp_path = trained
    trainer.create_model_card(model_name="tiny-galore")
    text = (tmp_path / "run" / "README.md").read_text()
    assert "GaLoreAdamW" in text and "# tiny-galore" in text and "hf-memopt" in text


def test_without_an_optimizer_method_the_line_names_args_optim_and_the_optimizer_that_ran(tmp_path):
    trainer = make_trainer(tmp_path, VeLoRAConfig(num_groups=4), memory=False, optim="adamw_torch")
    trainer.train()
    card = build_model_card(trainer)
    line = next(line for line in card.text.splitlines() if line.startswith("- optimizer:"))
    assert line.startswith("- optimizer: adamw_torch (torch.AdamW) from TrainingArguments.optim, lr=")
    assert "OptimizerNames" not in card.text and "Not measured" in card.text
    assert card.data.tags == ["hf-memopt", "velora", "generated_from_trainer"]
