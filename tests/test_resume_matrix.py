"""Resume matrix: for every method and combination, 2N steps straight equal N steps + save + a fresh process-like
resume + N steps, exactly: parameters, buffers (quantized weights, projections, VeLoRA's v), optimizer state and every
logged loss / grad norm / learning rate.

The interrupted run really stops after step N (a callback ends training once checkpoint-N is written); the resumed run
starts from a freshly built model and trainer, as a new process would. One table, one row per case: ``pytest -k loqt``
runs one. The per-method test files pin down what their own state holds; this file checks them all the same way.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from conftest import TokenDataset, tiny_llama, training_args
from transformers import Trainer, TrainerCallback

from hf_memopt import BlockLLMConfig, GaLoreConfig, LoQTConfig, VeLoRAConfig, ZOConfig, attach

N = 3
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
MLP = ["gate_proj", "up_proj", "down_proj"]


@dataclass
class Case:
    configs: list[Any]
    args: dict[str, Any] = field(default_factory=dict)
    marks: tuple = ()


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


CASES: dict[str, Case] = {
    "galore": Case([_galore()]),
    "galore_layerwise": Case([_galore(layerwise=True)]),
    "blockllm": Case([_blockllm()], {"learning_rate": 3e-2}),
    "loqt": Case([_loqt()], {"learning_rate": 3e-3}),
    "velora": Case([VeLoRAConfig(num_groups=8)]),
    "zo": Case([ZOConfig(eps=1e-2)], {"learning_rate": 2e-3}),
    "velora+galore": Case([VeLoRAConfig(num_groups=8), _galore()]),
    "velora+blockllm": Case([VeLoRAConfig(num_groups=8), _blockllm()], {"learning_rate": 3e-2}),
    # LoQT replaces the Linear layers it targets, so the two methods split the layers between them
    "velora+loqt": Case([VeLoRAConfig(num_groups=8, target_modules=MLP), _loqt(ATTENTION)], {"learning_rate": 3e-3}),
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
    trainer = Trainer(model=tiny_llama(seed=7), args=args, train_dataset=TokenDataset(n=48))
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


@pytest.mark.parametrize("name", [pytest.param(n, marks=c.marks) for n, c in CASES.items()])
def test_n_steps_save_resume_n_steps_equals_2n_straight(tmp_path, name):
    case = CASES[name]
    straight = _trainer(case, tmp_path / "straight")
    straight.train()

    interrupted = _trainer(case, tmp_path / "interrupted", save_strategy="steps", save_steps=N)
    interrupted.add_callback(_StopAfter(N))
    interrupted.train()
    assert interrupted.state.global_step == N
    checkpoint = tmp_path / "interrupted" / f"checkpoint-{N}"
    assert (checkpoint / "model.safetensors").exists() and not (checkpoint / "pytorch_model.bin").exists()

    resumed = _trainer(case, tmp_path / "resumed")
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert resumed.state.global_step == 2 * N

    a, b = straight.model.state_dict(), resumed.model.state_dict()
    assert set(a) == set(b)
    moved = 0
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=0, msg=key)
    initial = tiny_llama(seed=7).state_dict()
    moved = sum(not torch.equal(a[k], initial[k]) for k in initial if k in a)
    assert moved > 0, "nothing trained: the comparison would be vacuous"
    _assert_same_state(straight.optimizer.state_dict(), resumed.optimizer.state_dict(), "optimizer")

    logged_a, logged_b = _logged(straight), _logged(resumed)
    assert len(logged_a) == 2 * N
    assert logged_b == logged_a  # loss, grad_norm (or zo_projected_grad), learning_rate, epoch, step
