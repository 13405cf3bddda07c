# The scenarios below are the 11 GaLore tests of transformers' tests/trainer/test_trainer_optimizers.py
# (Copyright the HuggingFace Inc. team, licensed under the Apache License, Version 2.0:
# http://www.apache.org/licenses/LICENSE-2.0), restated for pytest with the same models, arguments and assertions.
# Changes: `import hf_memopt` comes first (so the stock `optim="galore_*"` names are hf_memopt's), the accelerator
# requirement is removed, and the three Adafactor tests, which assert a window of CUDA peak memory, are marked `gpu`.
"""transformers' own GaLore Trainer tests, run through hf_memopt on CPU (the outside measure of the stock names)."""

import hf_memopt  # noqa: F401, I001 - first: reroutes the stock optim="galore_*" names

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments
from transformers.trainer_utils import check_target_module_exists

pytestmark = pytest.mark.usefixtures("one_thread")  # one torch thread: several times faster on the shared CPU

ATTN_MLP_TARGET_MODULES = [r".*attn.*", r".*mlp.*"]
MODULE_NAMES = [
    "model.transformer.h.0.ln_1",
    "model.transformer.h.0.attn.q_proj",
    "model.lm_head",
    "model.transformer.h.0.mlp.up_proj",
]


class RepeatDataset:
    """``length`` copies of one token sequence (inputs = labels), as transformers' trainer_test_utils."""

    def __init__(self, x, length=64):
        self.x = x
        self.length = length

    def __len__(self):
        return self.length

    def __getitem__(self, i):
        return {"input_ids": self.x, "labels": self.x}


def llama_and_dataset():
    config = LlamaConfig(vocab_size=100, hidden_size=32, num_hidden_layers=3, num_attention_heads=4)
    return LlamaForCausalLM(config), RepeatDataset(torch.randint(0, 100, (128,)))


def train_with_llama(output_dir, optim, optim_target_modules=None, **extra_kwargs):
    model, train_dataset = llama_and_dataset()
    kwargs = {"learning_rate": 1e-9, "logging_steps": 5, "optim": optim}
    if optim_target_modules is not None:
        kwargs["optim_target_modules"] = optim_target_modules
    kwargs.update(extra_kwargs)
    trainer = Trainer(model, TrainingArguments(str(output_dir), **kwargs), train_dataset=train_dataset)
    trainer.train()
    return trainer


# (optim_target_modules, which of MODULE_NAMES match, whether a match is reported as a regex match)
MATCH_CASES = [
    ([r".*.attn.*", r".*.mlp.*"], [False, True, False, True], True),
    (["q_proj", "up_proj"], [False, True, False, True], False),
    (r".*.attn.*", [False, True, False, False], True),
    ("model.transformer.h.0.attn.q_proj", [False, True, False, False], False),
    (["attn", "mlp"], [False, True, False, True], False),
]


def test_galore_matched_modules():
    for targets, expected, expect_regex in MATCH_CASES:
        for expected_value, module_name in zip(expected, MODULE_NAMES):
            is_module_matched, is_regex = check_target_module_exists(targets, module_name, return_is_regex=True)
            assert is_module_matched == expected_value, (targets, module_name)
            if is_module_matched:
                assert is_regex == expect_regex, (targets, module_name)


@pytest.mark.parametrize("optim", ["galore_adamw", "galore_adamw_layerwise", "galore_adamw_8bit"])
def test_galore(tmp_path, optim):
    train_with_llama(tmp_path, optim, optim_target_modules=ATTN_MLP_TARGET_MODULES)


def test_galore_extra_args(tmp_path):
    train_with_llama(
        tmp_path,
        "galore_adamw",
        optim_target_modules=ATTN_MLP_TARGET_MODULES,
        optim_args="rank=64, update_proj_gap=100, scale=0.10",
    )


def test_galore_layerwise_with_scheduler(tmp_path):
    train_with_llama(
        tmp_path, "galore_adamw_layerwise", optim_target_modules=ATTN_MLP_TARGET_MODULES, lr_scheduler_type="cosine"
    )


@pytest.mark.gpu  # asserts a window of CUDA peak memory (transformers' TorchTracemalloc measures the CUDA allocator)
@pytest.mark.parametrize(
    "optim_target_modules", [ATTN_MLP_TARGET_MODULES, ["q_proj", "k_proj", "v_proj"], "all-linear"]
)
def test_galore_adafactor(tmp_path, optim_target_modules):
    upper_bound_pm, lower_bound_pm = 700, 650
    model, train_dataset = llama_and_dataset()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    begin = torch.cuda.memory_allocated()
    args = TrainingArguments(
        str(tmp_path),
        learning_rate=1e-9,
        logging_steps=5,
        optim="galore_adafactor",
        optim_target_modules=optim_target_modules,
    )
    Trainer(model, args, train_dataset=train_dataset).train()
    peaked = (torch.cuda.max_memory_allocated() - begin) / 2**20
    galore_peak_memory = peaked + begin / 2**20
    assert lower_bound_pm < galore_peak_memory < upper_bound_pm


def test_galore_lr_display_without_scheduler(tmp_path):
    model, train_dataset = llama_and_dataset()
    learning_rate = 1e-9
    args = TrainingArguments(
        str(tmp_path),
        learning_rate=learning_rate,
        logging_steps=5,
        optim="galore_adamw",
        optim_target_modules=ATTN_MLP_TARGET_MODULES,
    )
    trainer = Trainer(model, args, train_dataset=train_dataset)
    trainer.create_optimizer_and_scheduler(num_training_steps=10)
    assert trainer.get_learning_rates() == [learning_rate, learning_rate]


def test_galore_lr_display_with_scheduler(tmp_path):
    model, train_dataset = llama_and_dataset()
    learning_rate, num_warmup_steps = 2e-4, 5
    args = TrainingArguments(
        str(tmp_path),
        num_train_epochs=2,
        learning_rate=learning_rate,
        warmup_steps=num_warmup_steps,
        lr_scheduler_type="cosine",
        logging_steps=1,
        optim="galore_adamw",
        optim_target_modules=ATTN_MLP_TARGET_MODULES,
    )
    trainer = Trainer(model, args, train_dataset=train_dataset)
    trainer.train()
    logs = trainer.state.log_history[1:-1]

    assert logs[num_warmup_steps - 1]["learning_rate"] == learning_rate
    assert np.allclose(logs[-1]["learning_rate"], 0, atol=5e-6)
    increasing = [logs[i]["learning_rate"] < logs[i + 1]["learning_rate"] for i in range(num_warmup_steps - 1)]
    decreasing = [
        logs[i]["learning_rate"] > logs[i + 1]["learning_rate"] for i in range(num_warmup_steps - 1, len(logs) - 1)
    ]
    assert all(increasing)
    assert all(decreasing)
    assert len(decreasing) > len(increasing)
