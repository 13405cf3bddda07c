"""The memory estimator: predictions from the config alone agree with what hf_memopt.tools.memory measures in training.

One table of (method, tiny model, options): each row trains a few steps with a ``MemoryReportCallback`` and compares
every component (parameters, gradients, optimizer state, activations) with ``estimate_memory`` on the saved config.
``pytest -k galore`` runs one method.
"""

from __future__ import annotations

import pytest
import torch
from conftest import TokenDataset, tiny_bert_classifier, tiny_llama, training_args
from transformers import Trainer

from hf_memopt import METHODS, MemoryReportCallback, attach
from hf_memopt.tools.estimate import estimate_memory, format_estimate, load_model_config
from hf_memopt.tools.memory import MemoryBreakdown, format_breakdown_table, tensor_bytes

TOLERANCE = 0.15
PARTS = ("parameters", "gradients", "optimizer_state", "activations")
BATCH, SEQ = 4, 16


class LabelledTokens(torch.utils.data.Dataset):
    """Token sequences with a class label each, for the sequence-classification rows."""

    def __init__(self, n: int = 32):
        self.ids = TokenDataset(n=n, seq=SEQ).ids

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": torch.tensor(i % 2)}


def bert_with_dropout():
    """A tiny BERT classifier with the default dropout (attention dropout makes SDPA take its math path on CPU)."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    return BertForSequenceClassification(
        BertConfig(
            vocab_size=64,
            hidden_size=32,
            intermediate_size=72,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=64,
        )
    )


# (case id, method, model factory, method options, TrainingArguments.optim)
TEST_CASES = [
    ("adamw-llama", "adamw", tiny_llama, {}, "adamw_torch"),
    ("adamw_8bit-llama", "adamw_8bit", lambda: tiny_llama(hidden=64), {}, "adamw_bnb_8bit"),
    ("galore-llama", "galore", tiny_llama, {"rank": 4, "target_modules": ["q_proj", "v_proj", "down_proj"]}, None),
    ("galore_8bit-llama", "galore", lambda: tiny_llama(hidden=64), {"rank": 8, "optimizer": "adamw_8bit"}, None),
    ("galore_layerwise-llama", "galore", tiny_llama, {"rank": 4, "layerwise": True}, None),
    ("galore_capped_rank-llama", "galore", tiny_llama, {"rank": 64, "target_modules": ["k_proj", "down_proj"]}, None),
    ("galore_adafactor-llama", "galore", tiny_llama, {"rank": 4, "optimizer": "adafactor"}, None),
    (
        "galore_adafactor_beta1-llama",
        "galore",
        tiny_llama,
        {"rank": 4, "optimizer": "adafactor", "adafactor_beta1": 0.9},
        None,
    ),
    ("blockllm-llama", "blockllm", tiny_llama, {"sparsity": 0.5, "patience": 2}, None),
    ("loqt_nf4-llama", "loqt", tiny_llama, {"rank": 4, "merge_every": 2}, None),
    ("velora-llama", "velora", tiny_llama, {"num_groups": 4}, None),
    ("zo-llama", "zo", tiny_llama, {}, None),
    ("adamw-bert", "adamw", tiny_bert_classifier, {}, "adamw_torch"),
    ("galore-bert_dropout", "galore", bert_with_dropout, {"rank": 2}, None),
]


def measure(tmp_path, method, model_fn, options, optim):
    """Train 2 steps (3 for the methods whose first step differs: BlockLLM scores, LoQT merges) with a MemoryReportCallback; returns (breakdown, trained model, config folder)."""
    model = model_fn()
    config_dir = tmp_path / "config"
    model.config.save_pretrained(config_dir)
    dataset = LabelledTokens() if "Classification" in type(model).__name__ else TokenDataset(seq=SEQ)
    callback = MemoryReportCallback(print_table=False)
    steps = 3 if method in ("blockllm", "loqt") else 2
    args = training_args(
        tmp_path / "out", max_steps=steps, per_device_train_batch_size=BATCH, optim=optim or "adamw_torch"
    )
    trainer = Trainer(model=model, args=args, train_dataset=dataset, callbacks=[callback])
    if method in METHODS:
        attach(trainer, METHODS[method].config_cls(**options))
    trainer.train()
    return callback.breakdown, trainer.model, config_dir


def assert_close(estimated: int, measured: int, what: str) -> None:
    if measured == 0:
        assert estimated == 0, f"{what}: estimated {estimated} bytes, measured 0"
    else:
        assert abs(estimated - measured) <= TOLERANCE * measured, f"{what}: estimated {estimated}, measured {measured}"


@pytest.mark.parametrize(
    ("method", "model_fn", "options", "optim"), [c[1:] for c in TEST_CASES], ids=[c[0] for c in TEST_CASES]
)
def test_estimate_is_within_15_percent_of_the_measured_breakdown(tmp_path, method, model_fn, options, optim):
    measured, model, config_dir = measure(tmp_path, method, model_fn, options, optim)
    estimate = estimate_memory(str(config_dir), method, batch=BATCH, seq=SEQ, **options)
    for part in PARTS:
        assert_close(estimate[part], getattr(measured, part), part)
    if method == "loqt":  # LoQT's quantized weights and projections are buffers, which memory.py does not count
        buffers = tensor_bytes(
            b
            for n, b in model.named_buffers()
            if n.rsplit(".", 1)[-1] in ("weight_q", "weight_absmax", "proj", "proj_q", "proj_absmax", "merges")
        )
        assert_close(estimate["buffers"], buffers, "LoQT buffers")
        assert estimate["weights"] == estimate["parameters"] + estimate["buffers"]
    assert estimate["total"] == sum(estimate[k] for k in ("weights", "gradients", "optimizer_state", "activations"))
    if method != "blockllm":  # exact but for the Trainer's 0-d loss normaliser (BlockLLM's selection is a proxy)
        for part in PARTS:
            assert abs(estimate[part] - getattr(measured, part)) <= 8, part


def test_estimates_order_methods_as_their_papers_do_on_llama_60m():
    adamw = estimate_memory("llama-60m", "adamw", batch=1, seq=256)
    galore = estimate_memory("llama-60m", "galore", rank=128, batch=1, seq=256)
    galore8 = estimate_memory("llama-60m", "galore", rank=128, batch=1, seq=256, optimizer="adamw_8bit")
    layerwise = estimate_memory("llama-60m", "galore", rank=128, batch=1, seq=256, layerwise=True)
    loqt = estimate_memory("llama-60m", "loqt", rank=128, batch=1, seq=256)
    zo = estimate_memory("llama-60m", "zo", batch=1, seq=256)
    assert adamw["optimizer_state"] > galore["optimizer_state"] > galore8["optimizer_state"]
    assert layerwise["gradients"] == 4 * 32000 * 512  # one gradient at a time: the largest is the embedding
    assert loqt["weights"] < adamw["weights"] and loqt["optimizer_state"] < adamw["optimizer_state"]
    assert zo["total"] == zo["weights"] + 8 and zo["activations"] == 0
    assert "model.layers.0.mlp.down_proj" in galore["targets"] and "lm_head" not in galore["targets"]
    # AdamW state is exactly two fp32 moments plus one 4-byte step per parameter tensor
    assert adamw["optimizer_state"] == 2 * adamw["parameters"] + 4 * (8 * 9 + 1 + 2)


def test_bfloat16_halves_weights_and_saved_activations():
    fp32 = estimate_memory("llama-20m", "adamw", batch=2, seq=64)
    bf16 = estimate_memory("llama-20m", "adamw", batch=2, seq=64, dtype="bfloat16")
    assert bf16["parameters"] * 2 == fp32["parameters"]
    # not a half: the loss upcasts the logits (tokens x 32000 vocab) to float32, and softmax statistics stay float32
    assert 0.5 < bf16["activations"] / fp32["activations"] < 0.9


def test_model_names_and_paths_resolve(tmp_path):
    tiny_llama().config.save_pretrained(tmp_path)
    by_folder = estimate_memory(str(tmp_path), "adamw", seq=8)
    by_file = estimate_memory(str(tmp_path / "config.json"), "adamw", seq=8)
    assert by_folder["parameters"] == by_file["parameters"] > 0
    assert load_model_config("llama-20m").hidden_size == 256
    try:
        assert load_model_config("minilm").model_type == "bert"
    except ValueError:
        pytest.skip("offline MiniLM package not installed")
    assert estimate_memory("minilm", "adamw", seq=8)["task"] == "sequence-classification"


def test_format_estimate_is_a_markdown_table_with_one_row_per_estimate():
    rows = [estimate_memory("llama-20m", m, seq=32, **kw) for m, kw in (("adamw", {}), ("galore", {"rank": 64}))]
    table = format_estimate(rows)
    assert table.startswith("| method | weights | gradients | optimizer state | activations | total |")
    assert "| adamw |" in table and "| galore (rank=64" in table and "batch 1 x seq 32" in table
    assert format_estimate(rows[0]).count("\n| ") == 1  # one data row after the separator


@pytest.mark.parametrize(
    ("args", "kwargs", "message"),
    [
        (("llama-20m", "sgd"), {}, "unknown method"),
        (("no-such-org/no-such-model-xyz", "adamw"), {}, "cannot load a model config"),
        (("llama-999m", "adamw"), {}, "cannot load a model config"),
        (("llama-20m", "galore"), {"rank": 0}, "rank"),
        (("llama-20m", "velora"), {"rank": 4}, "no rank"),
        (("llama-20m", "galore"), {"nonsense": 1}, "unknown option"),
        (("llama-20m", "adamw"), {"dtype": "int8"}, "dtype"),
        (("llama-20m", "adamw"), {"batch": 0}, "batch"),
        (("llama-20m", "adamw"), {"task": "translation"}, "task"),
    ],
)
def test_bad_method_config_or_option_raises_value_error(args, kwargs, message):
    with pytest.raises(ValueError, match=message):
        estimate_memory(*args, **kwargs)


@pytest.mark.slow
def test_estimate_matches_measurement_on_llama_20m(tmp_path):
    """The docs' table (docs/estimator.md): LLaMA-20M, batch 2 x 128, 2 steps per method; prints both tables."""
    from transformers import LlamaForCausalLM

    from hf_memopt.tools.recipes.models import llama_config

    rows = [
        ("adamw", {}, "adamw_torch"),
        ("adamw_8bit", {}, "adamw_bnb_8bit"),
        ("galore", {"rank": 64}, None),
        ("galore", {"rank": 64, "layerwise": True}, None),
        ("blockllm", {"sparsity": 0.9}, None),
        ("loqt", {"rank": 64}, None),
        ("velora", {"num_groups": 16}, None),
        ("zo", {}, None),
    ]
    measured, estimated = {}, []
    for method, options, optim in rows:
        torch.manual_seed(0)
        model = LlamaForCausalLM(llama_config("20m"))
        callback = MemoryReportCallback(print_table=False)
        args = training_args(
            tmp_path / method, max_steps=2, per_device_train_batch_size=2, optim=optim or "adamw_torch"
        )
        trainer = Trainer(
            model=model, args=args, train_dataset=TokenDataset(n=8, seq=128, vocab=32000), callbacks=[callback]
        )
        if method in METHODS:
            attach(trainer, METHODS[method].config_cls(**options))
        trainer.train()
        label = method + ("-layerwise" if options.get("layerwise") else "")
        measured[label] = callback.breakdown
        estimate = estimate_memory("llama-20m", method, batch=2, seq=128, **options)
        estimated.append(estimate)
        for part in PARTS:
            assert_close(estimate[part], getattr(callback.breakdown, part), f"{label} {part}")
    print(format_breakdown_table(measured))
    print(format_estimate(estimated))
    assert isinstance(next(iter(measured.values())), MemoryBreakdown)


def test_a_registered_toy_method_is_estimated_through_its_hook_alone():
    """The estimator holds no method-specific code: a method it has never seen is estimated by its registered hook."""
    from dataclasses import dataclass

    from hf_memopt.core.registry import register_method
    from hf_memopt.shared.estimate import MemoryEstimate, parameter_bytes
    from hf_memopt.tools.estimate import estimable_methods

    @dataclass
    class ToyConfig:
        state_bytes: int = 3

    def estimate_toy(model, config, trace):
        return MemoryEstimate(
            parameters=parameter_bytes(model),
            trainable_parameters=0,
            gradients=0,
            optimizer_state=config.state_bytes,
            activations=trace(model),
            buffers=11,
            targets=["lm_head"],
            notes=["a toy"],
            extra={"toy_figure": 7},
        )

    register_method("toy_estimated", ToyConfig, lambda trainer, config: None, "a toy", estimate=estimate_toy)
    register_method("toy_unestimated", type("Unestimated", (), {}), lambda trainer, config: None, "no hook")
    try:
        assert "toy_estimated" in estimable_methods() and "toy_unestimated" not in estimable_methods()
        toy = estimate_memory("llama-20m", "toy_estimated", seq=8, state_bytes=5)
        adamw = estimate_memory("llama-20m", "adamw", seq=8)
        assert (toy["optimizer_state"], toy["gradients"], toy["buffers"], toy["toy_figure"]) == (5, 0, 11, 7)
        assert toy["parameters"] == adamw["parameters"] and toy["activations"] == adamw["activations"]
        assert toy["weights"] == toy["parameters"] + 11 and toy["targets"] == ["lm_head"]
        assert toy["method_config"] == {"state_bytes": 5}
        assert "- toy_estimated: a toy" in format_estimate(toy)
        with pytest.raises(ValueError, match="toy_unestimated' registers no memory estimate"):
            estimate_memory("llama-20m", "toy_unestimated", seq=8)
    finally:
        METHODS._specs.pop("toy_estimated")
        METHODS._specs.pop("toy_unestimated")


def test_the_estimator_imports_no_method_package():
    import ast
    from pathlib import Path

    import hf_memopt.tools.estimate as estimator
    from hf_memopt.core.registry import BUILTIN_METHOD_PACKAGES

    tree = ast.parse(Path(estimator.__file__).read_text())
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    imported |= {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    assert not {m for m in imported if m and m.startswith(BUILTIN_METHOD_PACKAGES)}
