"""Model cards: Hub metadata that ModelCard.load parses back, title/description/usage, method hyperparameters, measured
memory, the corrected optimizer line, metrics of a later evaluation, TRL's card extended, runs without a method,
idempotence."""

from __future__ import annotations

import pytest
from conftest import TokenDataset, tiny_llama, training_args
from huggingface_hub import ModelCard
from transformers import Trainer

from hf_memopt import GaLoreConfig, MemoryReportCallback, VeLoRAConfig, attach
from hf_memopt.tools.modelcard import ModelCardCallback, build_model_card, install_model_card

BASE = "hf-internal-testing/tiny-random-LlamaForCausalLM"


def make_trainer(tmp_path, *configs, memory=True, **overrides):
    callbacks = [MemoryReportCallback(print_table=False)] if memory else []
    args = training_args(tmp_path / "run", **{"max_steps": 2, "eval_strategy": "steps", "eval_steps": 2, **overrides})
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
    card = ModelCard.load(tmp_path / "final" / "README.md", ignore_metadata_errors=False)
    data = card.data.to_dict()
    assert data["base_model"] == BASE and data["datasets"] == ["arith-progressions"]
    assert data["license"] == "apache-2.0" and data["library_name"] == "transformers"
    assert data["pipeline_tag"] == "text-generation"
    assert data["tags"] == ["hf-memopt", "velora", "galore", "generated_from_trainer"]
    results = data["model-index"][0]["results"][0]
    assert results["dataset"]["name"] == "arith-progressions" and results["metrics"][0]["type"] == "loss"
    eval_loss = [e["eval_loss"] for e in trainer.state.log_history if "eval_loss" in e][-1]
    assert results["metrics"][0]["value"] == pytest.approx(eval_loss)
    (result,) = card.data.eval_results  # the model-index parses back into huggingface_hub's EvalResult
    assert (result.task_type, result.metric_type, result.metric_value) == ("text-generation", "loss", eval_loss)
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


def test_card_opens_with_a_title_a_description_and_how_to_load_the_model(trained):
    trainer, tmp_path = trained
    card = ModelCard.load(tmp_path / "final" / "README.md")
    name = "tiny-random-LlamaForCausalLM-arith-progressions-velora-galore"  # <base>-<dataset>-<methods>
    assert card.data.model_name == name and card.text.lstrip().startswith(f"# {name}\n")
    assert f"is a fine-tuned version of [{BASE}](https://huggingface.co/{BASE}) on `arith-progressions`" in card.text
    assert "[VeLoRA](https://arxiv.org/abs/2405.17991)" in card.text and "This is a model" not in card.text
    assert "## How to use" in card.text and f'pipeline("text-generation", model="{name}")' in card.text
    assert "## Evaluation results" in card.text and "### Memory-efficient training (hf_memopt)" in card.text


def test_evaluation_after_training_rewrites_the_cards_of_the_final_folders(tmp_path):
    trainer = make_trainer(tmp_path, GaLoreConfig(rank=4), eval_strategy="no")
    trainer.train()
    trainer.save_model(str(tmp_path / "final"))
    for folder in (tmp_path / "run", tmp_path / "final"):
        assert ModelCard.load(folder / "README.md").data.eval_results is None  # no evaluation yet
    metrics = trainer.evaluate()
    for folder in (tmp_path / "run", tmp_path / "final"):
        card = ModelCard.load(folder / "README.md")
        assert [(r.metric_type, r.metric_value) for r in card.data.eval_results] == [("loss", metrics["eval_loss"])]
        assert "## Evaluation results" in card.text


def test_a_run_without_any_method_gets_a_card_through_install_model_card(tmp_path):
    trainer = make_trainer(tmp_path, memory=True, eval_strategy="no")  # make_trainer calls install_model_card
    trainer.train()
    card = ModelCard.load(tmp_path / "run" / "README.md")
    assert card.data.tags == ["hf-memopt", "generated_from_trainer"] and card.data.base_model == BASE
    assert "No hf_memopt method" in card.text and "### Measured memory" in card.text
    assert "- optimizer: adamw_torch_fused (torch.AdamW) from TrainingArguments.optim" in card.text


def tiny_word_tokenizer():
    """A 64-word WordLevel tokenizer (``w0`` ... ``w59`` and four specials) matching ``tiny_llama``'s vocabulary."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(60)} | {"<unk>": 60, "<pad>": 61, "<eos>": 62, "<bos>": 63}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>", eos_token="<eos>", bos_token="<bos>"
    )


def test_trl_sft_card_is_extended_with_hf_memopt_sections_not_replaced(tmp_path):
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    texts = [" ".join(f"w{(start + 3 * k) % 60}" for k in range(10)) for start in range(16)]
    args = SFTConfig(
        output_dir=str(tmp_path / "sft"),
        max_steps=2,
        per_device_train_batch_size=4,
        logging_steps=1,
        save_strategy="steps",
        save_steps=2,
        report_to=[],
        use_cpu=True,
        max_length=16,
        bf16=False,
    )
    trainer = SFTTrainer(
        model=tiny_llama(),
        args=args,
        train_dataset=Dataset.from_dict({"text": texts}),
        eval_dataset=Dataset.from_dict({"text": texts[:4]}),
        processing_class=tiny_word_tokenizer(),
    )
    attach(trainer, GaLoreConfig(rank=4))
    install_model_card(trainer, base_model=BASE, datasets="arith-words", license="apache-2.0")
    trainer.train()
    metrics = trainer.evaluate()
    for folder in ("sft", "sft/checkpoint-2"):
        card = ModelCard.load(tmp_path / folder / "README.md", ignore_metadata_errors=False)
        data = card.data.to_dict()
        assert {"trl", "sft", "hf-memopt", "galore"} <= set(data["tags"])  # TRL's tags kept, ours added
        assert data["base_model"] == BASE and data["datasets"] == ["arith-words"] and data["license"] == "apache-2.0"
        assert "licence" not in data  # TRL's template placeholder, replaced by the real license
        assert "It has been trained using [TRL]" in card.text and "## Quick start" in card.text  # TRL's text kept
        assert card.text.count("## Memory-efficient training (hf_memopt)") == 1 and "GaLoreAdamW" in card.text
        name = "tiny-random-LlamaForCausalLM-arith-words-galore"
        assert f"# Model Card for {name}" in card.text and f'model="{name}"' in card.text
        assert f"fine-tuned version of [{BASE}](https://huggingface.co/{BASE})" in card.text  # TRL printed [None]
    final = ModelCard.load(tmp_path / "sft" / "README.md")
    results = {r.metric_type: r.metric_value for r in final.data.eval_results}
    assert (
        results["loss"] == metrics["eval_loss"]
        and results["mean_token_accuracy"] == metrics["eval_mean_token_accuracy"]
    )
    assert "num_tokens" not in results  # a token counter, not a metric


def test_license_and_language_default_to_the_base_models_card_on_disk(tmp_path):
    from transformers import LlamaForCausalLM

    base = tmp_path / "base"
    tiny_llama().save_pretrained(base)
    ModelCard("---\nlicense: mit\nlanguage: fr\n---\n\n# base\n").save(base / "README.md")
    args = training_args(tmp_path / "run", max_steps=1)
    trainer = Trainer(model=LlamaForCausalLM.from_pretrained(base), args=args, train_dataset=TokenDataset(n=8))
    install_model_card(trainer, datasets="arith-progressions")
    trainer.train()
    data = ModelCard.load(tmp_path / "run" / "README.md").data
    assert (data.license, data.language, data.base_model) == ("mit", "fr", None)  # a local folder is not a Hub id
    assert build_model_card(trainer, license="apache-2.0").data.license == "apache-2.0"  # given beats inherited
