"""Resume after SIGKILL: a training process killed at a random step, resumed from its last complete checkpoint,
ends with the same parameters, buffers and logged losses as a run that was never interrupted, exactly.

The worker is this file's ``__main__``: it trains one case of :data:`CASES` with ``save_steps=SAVE_STEPS`` and a
callback that writes a marker file at the kill step. The test starts it as a subprocess, waits for the marker, sends
SIGKILL at once (the worker keeps training meanwhile, so the kill may land in a later step or in the middle of writing
a checkpoint), resumes in this process from :func:`hf_memopt.tools.checkpoints.last_complete_checkpoint` into the same
output folder, and compares with a straight run. The kill step is drawn from a generator seeded per case.

A second worker mode stops inside ``Trainer._save_checkpoint`` (after the optimizer and scheduler files, before the RNG
and trainer state), so a SIGKILL deterministically leaves a half-written checkpoint: the stock
``get_last_checkpoint`` picks it and the resume fails; ``last_complete_checkpoint`` skips it and the resume is exact.

Both processes run torch with one thread: CPU kernels may sum in a different order with another thread count, and
the comparison is exact.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import TokenDataset, assert_same_trained_model, tiny_llama, training_args
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import get_last_checkpoint

from hf_memopt import BlockLLMConfig, GaLoreConfig, LoQTConfig, ZOConfig, attach
from hf_memopt.tools.checkpoints import is_complete_checkpoint, last_complete_checkpoint

SAVE_STEPS = 3
MAX_STEPS = 40
# the kill step is drawn from [SAVE_STEPS + 1, KILL_BEFORE]; the 15+ steps after it leave the test time to kill the
# worker before it finishes (the test checks that it did)
KILL_BEFORE = 24
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
MARKER = "kill-marker"


@dataclass
class Case:
    configs: list[Any]
    args: dict[str, Any] = field(default_factory=dict)
    model: dict[str, Any] = field(default_factory=dict)  # tiny_llama overrides


CASES: dict[str, Case] = {
    # width 64: the 64 x 64 weights reach the 8-bit threshold of 4096 elements; refreshes every 4 updates
    "galore_layerwise_8bit": Case(
        [GaLoreConfig(rank=4, update_proj_gap=4, target_modules=LLAMA_TARGETS, layerwise=True, optimizer="adamw_8bit")],
        model={"hidden": 64},
    ),
    # patience 1 at lr 3e-2: several re-selections in 40 steps
    "blockllm": Case([BlockLLMConfig(sparsity=0.8, patience=1, mask_fraction=0.5)], {"learning_rate": 3e-2}),
    # merges every 5 updates, with error compensation and quantized P
    "loqt": Case(
        [
            LoQTConfig(
                rank=3,
                quant="nf4",
                quantize_projection=True,
                merge_every=5,
                merge_growth=1.0,
                error_compensation_steps=2,
            )
        ],
        {"learning_rate": 3e-3},
    ),
    "zo": Case([ZOConfig(eps=1e-2)], {"learning_rate": 2e-3}),
}
FAST = ("blockllm",)  # one subprocess costs 6-10 s here; the other rows are `slow`


def _trainer(name: str, output_dir, **overrides) -> Trainer:
    case = CASES[name]
    saving = {"save_strategy": "steps", "save_steps": SAVE_STEPS}
    args = training_args(output_dir, max_steps=MAX_STEPS, **{**saving, **case.args, **overrides})
    trainer = Trainer(model=tiny_llama(seed=7, **case.model), args=args, train_dataset=TokenDataset(n=48))
    for config in case.configs:
        attach(trainer, config)
    return trainer


# ---- the worker (this file run as a script) --------------------------------------------------------------------------
class _MarkAt(TrainerCallback):
    """Writes ``marker`` at the end of update ``step`` (``on_step_end``: the step is complete, its checkpoint, if
    any, is about to be written) and lets training go on."""

    def __init__(self, step: int, marker: Path):
        self.step, self.marker = step, marker

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            self.marker.write_text(str(state.global_step))


def _stall_inside_save(trainer: Trainer, step: int, marker: Path) -> None:
    """Make the checkpoint of ``step`` stop half-written: mark, then wait for the kill before the RNG state and
    ``trainer_state.json`` are written. ``_save_rng_state`` is private (transformers 5.x); the test fails loudly if it
    disappears."""
    save_rng_state = trainer._save_rng_state

    def stalled(output_dir):
        if trainer.state.global_step == step:
            marker.write_text(str(step))
            time.sleep(600)
        return save_rng_state(output_dir)

    trainer._save_rng_state = stalled


def _worker(name: str, output_dir: str, step: int, mode: str) -> None:
    torch.set_num_threads(1)
    marker = Path(output_dir) / MARKER
    trainer = _trainer(name, output_dir)
    if mode == "in-save":
        _stall_inside_save(trainer, step, marker)
    else:
        trainer.add_callback(_MarkAt(step, marker))
    trainer.train()


# ---- the test side ---------------------------------------------------------------------------------------------------
def _kill_worker_at(name: str, output_dir: Path, step: int, mode: str = "free") -> None:
    """Run the worker until it writes the marker at ``step``, then SIGKILL it (its stderr goes to a file beside
    ``output_dir``: a pipe nobody reads could fill up and stall it)."""
    output_dir.mkdir(parents=True)
    marker, log = output_dir / MARKER, output_dir.with_suffix(".log")
    cmd = [sys.executable, __file__, name, str(output_dir), str(step), mode]  # sys.path[0] = tests/: conftest imports
    with open(log, "wb") as stderr:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=stderr)
        try:
            deadline = time.monotonic() + 300
            while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.002)
            if marker.exists():
                os.kill(proc.pid, signal.SIGKILL)
        finally:
            if proc.poll() is None and not marker.exists():
                proc.kill()
            proc.wait(timeout=60)
    assert marker.exists(), f"the worker never reached step {step}:\n{log.read_text()[-3000:]}"
    assert proc.returncode == -signal.SIGKILL, f"the worker was not killed (rc {proc.returncode})"


def _kill_step(name: str) -> int:
    return random.Random(f"kill-{name}").randint(SAVE_STEPS + 1, KILL_BEFORE)


def _resumed(name: str, output_dir: Path) -> Trainer:
    checkpoint = last_complete_checkpoint(output_dir)
    assert checkpoint is not None
    trainer = _trainer(name, output_dir)
    trainer.train(resume_from_checkpoint=checkpoint)
    assert trainer.state.global_step == MAX_STEPS
    return trainer


def _assert_same_run(straight: Trainer, resumed: Trainer, name: str) -> None:
    assert_same_trained_model(straight.model, resumed.model, tiny_llama(seed=7, **CASES[name].model).state_dict())
    logged_a = [h for h in straight.state.log_history if "loss" in h]
    logged_b = [h for h in resumed.state.log_history if "loss" in h]
    assert len(logged_a) == MAX_STEPS
    assert logged_b == logged_a  # loss, grad norm (or ZO's projected gradient), learning rate, epoch, step


_STRAIGHT: dict[str, Trainer] = {}


def _straight(name: str, tmp_path_factory) -> Trainer:
    """The uninterrupted run of ``name`` (cached: two tests compare against it)."""
    if name not in _STRAIGHT:
        trainer = _trainer(name, tmp_path_factory.mktemp(f"straight_{name}"), save_strategy="no")
        trainer.train()
        _STRAIGHT[name] = trainer
    return _STRAIGHT[name]


@pytest.mark.parametrize("name", [pytest.param(n, marks=() if n in FAST else (pytest.mark.slow,)) for n in CASES])
def test_sigkill_at_a_random_step_then_resume_gives_the_same_parameters_and_losses(
    tmp_path, tmp_path_factory, one_thread, name
):
    step = _kill_step(name)
    _kill_worker_at(name, tmp_path / "run", step)
    checkpoint = last_complete_checkpoint(tmp_path / "run")
    assert checkpoint is not None, f"no complete checkpoint after a kill at step {step} or later"
    resumed_from = int(Path(checkpoint).name.split("-")[1])
    assert SAVE_STEPS <= resumed_from < MAX_STEPS, "the kill landed after training ended: nothing was resumed"
    resumed = _resumed(name, tmp_path / "run")
    _assert_same_run(_straight(name, tmp_path_factory), resumed, name)
    # the resumed run rewrote any checkpoint the kill cut short
    assert all(is_complete_checkpoint(p) for p in (tmp_path / "run").glob("checkpoint-*"))


@pytest.mark.slow
def test_sigkill_while_writing_a_checkpoint_resumes_from_the_previous_complete_one(
    tmp_path, tmp_path_factory, one_thread
):
    name, step = "blockllm", 4 * SAVE_STEPS
    run = tmp_path / "run"
    _kill_worker_at(name, run, step, mode="in-save")
    partial = run / f"checkpoint-{step}"
    assert (partial / "model.safetensors").exists() and (partial / "optimizer.pt").exists()
    assert not (partial / "trainer_state.json").exists()
    # the stock lookup picks the half-written folder, and resuming from it fails
    assert get_last_checkpoint(str(run)) == str(partial)
    with pytest.raises(FileNotFoundError, match="trainer_state.json"):
        _trainer(name, run).train(resume_from_checkpoint=str(partial))
    assert last_complete_checkpoint(run) == str(run / f"checkpoint-{step - SAVE_STEPS}")
    _assert_same_run(_straight(name, tmp_path_factory), _resumed(name, run), name)


# ---- last_complete_checkpoint on folders cut at each point of the write ---------------------------------------------
@pytest.fixture(scope="module")
def two_checkpoints(tmp_path_factory) -> Path:
    """A real output folder with checkpoint-1 and checkpoint-2 (2 steps of plain AdamW)."""
    out = tmp_path_factory.mktemp("two_checkpoints")
    args = training_args(out, max_steps=2, save_strategy="steps", save_steps=1)
    Trainer(model=tiny_llama(), args=args, train_dataset=TokenDataset(n=8)).train()
    return out


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize(
    "damage",
    [
        pytest.param(lambda c: (c / "trainer_state.json").unlink(), id="no_trainer_state"),
        pytest.param(lambda c: _truncate(c / "trainer_state.json"), id="truncated_trainer_state"),
        pytest.param(
            lambda c: (c / "trainer_state.json").write_text(json.dumps({"global_step": 1})), id="state_of_another_step"
        ),
        pytest.param(lambda c: [p.unlink() for p in c.iterdir()], id="empty_folder"),
    ],
)
def test_last_complete_checkpoint_skips_a_checkpoint_cut_short(two_checkpoints, tmp_path, damage):
    out = tmp_path / "out"
    shutil.copytree(two_checkpoints, out)
    assert last_complete_checkpoint(out) == str(out / "checkpoint-2")
    damage(out / "checkpoint-2")
    assert get_last_checkpoint(str(out)) == str(out / "checkpoint-2")  # the stock lookup does not look inside
    assert last_complete_checkpoint(out) == str(out / "checkpoint-1")


def test_last_complete_checkpoint_accepts_engine_specific_weight_layouts(two_checkpoints, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(two_checkpoints, out)
    newest = out / "checkpoint-2"
    (newest / "model.safetensors").rename(tmp_path / "moved.safetensors")  # FSDP's sharded state dict layout instead
    (newest / "pytorch_model_fsdp_0").mkdir()
    assert last_complete_checkpoint(out) == str(newest)


def test_last_complete_checkpoint_orders_by_step_and_ignores_other_folders(two_checkpoints, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(two_checkpoints / "checkpoint-2", out / "checkpoint-2")
    (out / "checkpoint-10").mkdir()  # incomplete, numerically largest
    (out / "checkpoint-2-tmp").mkdir()
    (out / "runs").mkdir()
    assert last_complete_checkpoint(out) == str(out / "checkpoint-2")
    assert last_complete_checkpoint(tmp_path / "missing") is None
    assert last_complete_checkpoint(out / "runs") is None


if __name__ == "__main__":
    _worker(sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4])
