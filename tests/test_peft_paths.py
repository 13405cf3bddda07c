"""Every method on a peft LoRA model: it trains (the adapters and the modules_to_save head copy only, base weights
bit for bit unchanged) or it is refused with what to do instead; and the snippets of docs/with_peft.md run as shown.
"""

from __future__ import annotations

import logging
import math
import re
from pathlib import Path

import pytest
import torch
from conftest import tiny_bert_classifier, training_args
from transformers import Trainer

from hf_memopt import BlockLLMConfig, GaLoreConfig, LoQTConfig, VeLoRAConfig, ZOConfig, attach
from hf_memopt.galore.builder import galore_target_parameters
from hf_memopt.shared.targeting import match_target_modules
from hf_memopt.velora.targets import PEFT_VELORA

peft = pytest.importorskip("peft")

DOC = Path(__file__).resolve().parents[1] / "docs" / "with_peft.md"
STEPS = 8


class FixedBatch(torch.utils.data.Dataset):
    """8 labelled sequences, one batch: every step sees the same data, so a working optimizer lowers the loss."""

    def __init__(self):
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(1, 64, (8, 8), generator=g)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i, 0] % 2}


def lora_classifier(**lora_kwargs):
    """The tiny BERT classifier with LoRA (r=8) on query and value; peft's SEQ_CLS adds the classifier as
    modules_to_save (a trainable copy inside a ModulesToSaveWrapper)."""
    from peft import LoraConfig, TaskType, get_peft_model

    config = LoraConfig(task_type=TaskType.SEQ_CLS, r=8, target_modules=["query", "value"], **lora_kwargs)
    return get_peft_model(tiny_bert_classifier(), config)


def args(tmp_path, **overrides):
    return training_args(tmp_path, **{"per_device_train_batch_size": 8, "max_steps": STEPS, **overrides})


def losses(trainer) -> list[float]:
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def adapter_names(model) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad and ".lora_" in n}


# (method, config, learning rate, whether the loss must drop on the fixed batch)
TRAINS = [
    ("galore", GaLoreConfig(rank=4, update_proj_gap=2), 1e-2, True),
    ("galore-names", GaLoreConfig(rank=4, target_modules=["query", "value"]), 1e-2, True),
    ("blockllm", BlockLLMConfig(sparsity=0.5, patience=2), 1e-2, True),
    # MeZO: one random direction per step, so 8 steps need not lower the loss; it must stay finite and move the
    # trainable parameters only.
    ("zo", ZOConfig(), 1e-3, False),
]


@pytest.mark.parametrize("method, config, lr, drops", TRAINS, ids=[t[0] for t in TRAINS])
def test_method_trains_a_lora_model_and_leaves_the_frozen_base_untouched(
    tmp_path, one_thread, method, config, lr, drops
):
    model = lora_classifier()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = Trainer(model=model, args=args(tmp_path, learning_rate=lr), train_dataset=FixedBatch())
    attach(trainer, config)
    trainer.train()
    seen = losses(trainer)
    assert len(seen) == STEPS and all(math.isfinite(v) for v in seen)
    if drops:
        assert seen[-1] < seen[0] - 0.01, seen
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and changed <= trainable, sorted(changed - trainable)
    assert changed & adapter_names(model)


def test_galore_projects_the_lora_adapters_whether_all_linear_or_named():
    model = lora_classifier()
    expected = {f"{n}.weight" for n, _ in model.named_modules() if re.search(r"\.lora_[AB]\.default$", n)}
    assert len(expected) == 8  # 2 layers x (query, value) x (lora_A, lora_B)
    assert set(galore_target_parameters(model, GaLoreConfig(rank=4))) == expected
    assert set(galore_target_parameters(model, GaLoreConfig(rank=4, target_modules=["query", "value"]))) == expected
    assert set(galore_target_parameters(model, GaLoreConfig(rank=4, target_modules=r".*\.value"))) == {
        n for n in expected if ".value." in n
    }


def test_peft_wrappers_stand_for_their_trainable_layers_never_the_frozen_originals():
    model = lora_classifier()
    found = match_target_modules(model, "all-linear")
    assert not any(".base_layer" in n or ".original_module" in n or "classifier" in n for n in found)
    assert {n for n in found if ".lora_" in n} == {n for n, _ in model.named_modules() if re.search(r"lora_[AB]\.", n)}
    assert list(match_target_modules(model, ["classifier"])) == ["base_model.model.classifier.modules_to_save.default"]


def test_galore_rank_above_the_lora_rank_is_capped_and_the_log_names_the_adapter(tmp_path, caplog):
    trainer = Trainer(model=lora_classifier(), args=args(tmp_path), train_dataset=FixedBatch())
    with caplog.at_level(logging.WARNING, logger="hf_memopt.galore.builder"):
        attach(trainer, GaLoreConfig(rank=16))
        trainer.create_optimizer()
    capped = [r.getMessage() for r in caplog.records if "GaLore rank=16 exceeds" in r.getMessage()]
    assert len(capped) == 1 and re.search(r"lora_A\.default\.weight \(8, \d+\)", capped[0])


@pytest.mark.parametrize(
    "config, message",
    [
        (LoQTConfig(rank=4), "LoQT cannot be attached to a peft model .* Attach LoQTConfig to the plain model"),
        (VeLoRAConfig(), "VeLoRA cannot be attached to a peft model .* velora_config=VeloraConfig"),
        (VeLoRAConfig(target_modules="all-linear"), "use peft's own VeLoRA"),
    ],
    ids=["loqt", "velora-auto", "velora-all-linear"],
)
def test_method_is_refused_on_a_lora_model_with_what_to_do_instead(tmp_path, config, message):
    model = lora_classifier()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = Trainer(model=model, args=args(tmp_path), train_dataset=FixedBatch())
    with pytest.raises(ValueError, match=message):
        attach(trainer, config)
    assert model.state_dict().keys() == state.keys()  # refused before changing the model


def test_the_peft_velora_we_point_to_trains(tmp_path, one_thread):
    from peft import LoraConfig, VeloraConfig  # noqa: F401 - names used by the pointer's code

    velora = eval(PEFT_VELORA.split("velora_config=", 1)[1].rsplit(")", 1)[0])  # the pointer's own VeloraConfig
    assert (velora.num_groups, velora.init_type) == (32, "batch_average_once")
    model = lora_classifier(velora_config=velora)
    trainer = Trainer(model=model, args=args(tmp_path), train_dataset=FixedBatch())
    trainer.train()
    seen = losses(trainer)
    assert all(math.isfinite(v) for v in seen) and seen[-1] < seen[0]


def _doc_snippets() -> list[tuple[str, str]]:
    """``(title, code)`` of each python block in docs/with_peft.md that trains (contains ``trainer.train()``)."""
    text = DOC.read_text()
    blocks = re.findall(r"^### (.+?)\n.*?```python\n(.*?)```", text, flags=re.S | re.M)
    return [(title, code) for title, code in blocks if "trainer.train()" in code]


def test_the_docs_show_one_trained_snippet_per_method():
    titles = " ".join(t for t, _ in _doc_snippets())
    for method in ("GaLore", "BlockLLM", "zeroth-order", "VeLoRA"):
        assert method in titles


@pytest.mark.parametrize("title, code", _doc_snippets(), ids=[t for t, _ in _doc_snippets()])
def test_docs_snippet_runs_as_shown(tmp_path, one_thread, title, code):
    namespace = {
        "base_model": tiny_bert_classifier(),
        "args": args(tmp_path, max_steps=3),
        "train_dataset": FixedBatch(),
    }
    exec(compile(code, f"{DOC.name}: {title}", "exec"), namespace)
    seen = losses(namespace["trainer"])
    assert len(seen) == 3 and all(math.isfinite(v) for v in seen)


def test_a_name_inside_a_peft_layer_says_to_write_the_layer_name():
    with pytest.raises(ValueError, match=r"entry 'lora_A' .* inside peft's Linear .*query'; write 'query'"):
        match_target_modules(lora_classifier(), ["lora_A"])
