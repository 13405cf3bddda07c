"""Resume matrix: for every method and combination, 2N steps straight equal N steps + save + a fresh process-like
resume + N steps, exactly: parameters, buffers (quantized weights, projections, VeLoRA's v), optimizer state and every
logged loss / grad norm / learning rate.

The interrupted run really stops after step N (a callback ends training once checkpoint-N is written); the resumed run
starts from a freshly built model and trainer, as a new process would. One table, one row per case: ``pytest -k loqt``
runs one. The per-method test files pin down what their own state holds; this file checks them all the same way.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import pytest
import torch
from conftest import TokenDataset, assert_same_trained_model, tiny_llama, training_args
from transformers import Trainer, TrainerCallback

from hf_memopt import BlockLLMConfig, GaLoreConfig, LoQTConfig, VeLoRAConfig, ZOConfig, attach
from hf_memopt.shared.chunked_loss import use_chunked_lm_loss
from hf_memopt.shared.frozen import freeze_modules
from hf_memopt.shared.swiglu import use_recomputed_swiglu

N = 3
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
MLP = ["gate_proj", "up_proj", "down_proj"]


@dataclass
class Case:
    configs: list[Any]
    args: dict[str, Any] = field(default_factory=dict)
    model: dict[str, Any] = field(default_factory=dict)  # tiny_llama overrides
    marks: tuple = ()  # marks of the whole row
    state_marks: tuple = ()  # marks of the optimizer-state check only
    prepare: Callable[[Any], Any] | None = None  # applied to the fresh model before the trainer is built


def _galore(**kw):
    # refreshes at updates 0, 2, 4: one on each side of the checkpoint at N = 3
    return GaLoreConfig(rank=4, update_proj_gap=2, target_modules=LLAMA_TARGETS, **kw)


def _blockllm():
    # patience 1 at lr 3e-2 re-selects within 2N steps, so selection, visit counts and masks cross the checkpoint
    return BlockLLMConfig(sparsity=0.8, patience=1, mask_fraction=0.5)


def _loqt(targets="all-linear"):
    # merges at updates 0, 2, 5: one before the checkpoint at N = 3 and one after it, with error compensation
    return LoQTConfig(
        rank=3, quant="nf4", quantize_projection=True, merge_every=2, merge_growth=1.5, error_compensation_steps=2,
        target_modules=targets,
    )  # fmt: skip


def _min_memory(model):
    """The min-memory recipe's model settings: frozen bfloat16 embeddings and head, the chunked LM loss, SwiGLU MLPs
    recomputing SiLU."""
    freeze_modules(model, ["embed_tokens", "lm_head"], "bfloat16")
    use_recomputed_swiglu(model)
    return use_chunked_lm_loss(model, chunk_size=16)


# recipes/instruct/smollm2_min_memory.yaml and its GaLore switch (8-bit states need the width-64 model's sizes)
_MIN_MEMORY_ARGS = {"max_grad_norm": 0.0, "gradient_checkpointing": True}

CASES: dict[str, Case] = {
    "galore": Case([_galore()]),
    # slow: also pinned by tests/test_galore.py's layer-wise resume test
    "galore_layerwise": Case([_galore(layerwise=True)], marks=(pytest.mark.slow,)),
    "blockllm": Case([_blockllm()], {"learning_rate": 3e-2}),
    # slow: the slowest row; LoQT's resume (quantized P, merges across the checkpoint) also runs fast in velora+loqt
    "loqt": Case([_loqt()], {"learning_rate": 3e-3}, marks=(pytest.mark.slow,)),
    "velora": Case([VeLoRAConfig(num_groups=8)]),
    "zo": Case([ZOConfig(eps=1e-2)], {"learning_rate": 2e-3}),
    "velora+galore": Case([VeLoRAConfig(num_groups=8), _galore()]),
    "velora+blockllm": Case([VeLoRAConfig(num_groups=8), _blockllm()], {"learning_rate": 3e-2}),
    # width 64: the 64 x 64 embeddings reach GaLore's 8-bit threshold of 4096 elements
    "galore_8bit": Case([_galore(optimizer="adamw_8bit")], model={"hidden": 64}),
    "blockllm_8bit": Case(
        [BlockLLMConfig(sparsity=0.8, patience=1, optimizer="adamw_8bit", min_8bit_size=64)],
        {"learning_rate": 3e-2},
    ),
    # LoQT replaces the Linear layers it targets, so the two methods split the layers between them
    "velora+loqt": Case([VeLoRAConfig(num_groups=8, target_modules=MLP), _loqt(ATTENTION)], {"learning_rate": 3e-3}),
    "min_memory_loqt": Case(
        [replace(_loqt(), layerwise=True, init_weight="quantized")],
        {"learning_rate": 3e-3, "optim": "adamw_bnb_8bit", **_MIN_MEMORY_ARGS},
        model={"hidden": 64},
        prepare=_min_memory,
    ),
    "min_memory_galore": Case(
        [VeLoRAConfig(num_groups=8), _galore(optimizer="adamw_8bit", layerwise=True)],
        _MIN_MEMORY_ARGS,
        model={"hidden": 64},
        prepare=_min_memory,
    ),
}


class _StopAfter(TrainerCallback):
    """Ends training after step ``step`` (its checkpoint is written first: the save follows ``on_step_end``)."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


def _trainer(case: Case, output_dir, **overrides) -> Trainer:
    args = training_args(output_dir, max_steps=2 * N, **{**case.args, **overrides})
    model = tiny_llama(seed=7, **case.model)
    model = case.prepare(model) if case.prepare is not None else model
    trainer = Trainer(model=model, args=args, train_dataset=TokenDataset(n=48))
    for config in case.configs:
        attach(trainer, config)
    return trainer


def _logged(trainer: Trainer) -> list[dict[str, float]]:
    return [h for h in trainer.state.log_history if "loss" in h]


def _assert_same_state(a: Any, b: Any, where: str) -> None:
    """Recursive exact comparison of two optimizer ``state_dict``s."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor), where
        torch.testing.assert_close(b, a, rtol=0, atol=0, equal_nan=True, msg=where)
    elif isinstance(a, dict):
        assert set(a) == set(b), (where, set(a) ^ set(b))
        for key in a:
            _assert_same_state(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same_state(x, y, f"{where}[{i}]")
    elif isinstance(a, float) and math.isnan(a):
        assert isinstance(b, float) and math.isnan(b), where
    else:
        assert a == b, (where, a, b)


_RUNS: dict[str, tuple[Trainer, Trainer]] = {}


def _straight_and_resumed(name: str, tmp_path_factory) -> tuple[Trainer, Trainer]:
    """2N steps straight, and N steps + save + stop, then a fresh trainer resumed for N more (cached per row)."""
    if name in _RUNS:
        return _RUNS[name]
    case, root = CASES[name], tmp_path_factory.mktemp(name.replace("+", "_"))
    straight = _trainer(case, root / "straight")
    straight.train()

    interrupted = _trainer(case, root / "interrupted", save_strategy="steps", save_steps=N)
    interrupted.add_callback(_StopAfter(N))
    interrupted.train()
    assert interrupted.state.global_step == N
    checkpoint = root / "interrupted" / f"checkpoint-{N}"
    assert (checkpoint / "model.safetensors").exists() and not (checkpoint / "pytorch_model.bin").exists()
    torch.load(checkpoint / "optimizer.pt", weights_only=True)  # plain tensors / numbers only

    resumed = _trainer(case, root / "resumed")
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert resumed.state.global_step == 2 * N
    _RUNS[name] = straight, resumed
    return straight, resumed


@pytest.mark.parametrize("name", [pytest.param(n, marks=c.marks) for n, c in CASES.items()])
def test_resume_gives_the_same_parameters_buffers_and_logged_losses(tmp_path_factory, name):
    straight, resumed = _straight_and_resumed(name, tmp_path_factory)
    assert_same_trained_model(straight.model, resumed.model, tiny_llama(seed=7, **CASES[name].model).state_dict())

    logged_a, logged_b = _logged(straight), _logged(resumed)
    assert len(logged_a) == 2 * N
    assert logged_b == logged_a  # loss, grad_norm (or zo_projected_grad), learning_rate, epoch, step


@pytest.mark.parametrize("name", [pytest.param(n, marks=c.marks + c.state_marks) for n, c in CASES.items()])
def test_resume_gives_the_same_optimizer_state_values_and_dtypes(tmp_path_factory, name):
    straight, resumed = _straight_and_resumed(name, tmp_path_factory)
    _assert_same_state(straight.optimizer.state_dict(), resumed.optimizer.state_dict(), "optimizer")
