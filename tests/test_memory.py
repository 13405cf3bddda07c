"""Memory accounting: each category is measured from real tensors, shared storages counted once."""

from __future__ import annotations

import pytest
import torch
from conftest import TokenDataset, tiny_llama, training_args
from torch import nn
from transformers import Trainer, TrainerCallback

from hf_memopt.tools.memory import (
    GradientMeter,
    MemoryBreakdown,
    MemoryReportCallback,
    SavedActivationMeter,
    add_memory_report,
    format_breakdown_table,
    optimizer_state_bytes,
    parameter_bytes,
    plot_memory_breakdown,
    tensor_bytes,
)


def test_views_of_one_storage_count_once():
    t = torch.zeros(10, 10)
    assert tensor_bytes([t, t[2:], t.T]) == 400
    assert tensor_bytes([t, torch.zeros(5)]) == 420


class SharedInputBlock(nn.Module):
    """Three projections of one normalised input, as q/k/v in attention."""

    def __init__(self, width: int = 16):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.q, self.k, self.v = (nn.Linear(width, width, bias=False) for _ in range(3))

    def forward(self, x):
        h = self.norm(x)
        return self.q(h) + self.k(h) + self.v(h)


def test_saved_activations_count_a_shared_input_once_and_exclude_parameters():
    block = SharedInputBlock()
    x = torch.randn(4, 16, requires_grad=True)
    with SavedActivationMeter(block) as meter:
        block(x).sum().backward()
    h_bytes = 4 * 16 * 4
    # saved: x and LayerNorm's mean/rstd (norm backward), h once for the three linears; no weight storages
    assert meter.peak >= h_bytes
    assert meter.peak < 3 * h_bytes + 2 * h_bytes  # h is not counted three times, weights never
    with SavedActivationMeter(block) as meter_no_exclusion:
        meter_no_exclusion._exclude = set()
        block(x).sum().backward()
    assert meter.peak <= meter_no_exclusion.peak


def test_optimizer_state_bytes_walk_real_states_including_8bit():
    import bitsandbytes as bnb

    # bitsandbytes keeps per-parameter overrides keyed by id(); earlier Trainer runs may have left some behind
    bnb.optim.GlobalOptimManager.get_instance().initialize()
    model = nn.Linear(256, 256)
    for opt_cls, expected in ((torch.optim.AdamW, 2 * 4 * 256 * 257), (bnb.optim.AdamW8bit, 2 * 256 * 256)):
        opt = opt_cls(model.parameters(), lr=1e-3)
        model(torch.randn(2, 256)).sum().backward()
        opt.step()
        measured = optimizer_state_bytes(opt)
        assert expected <= measured <= expected * 1.1 + 4096, (opt_cls, measured)


def test_optimizer_state_bytes_find_the_state_of_a_wrapped_base_optimizer():
    class BlockWrapper(torch.optim.Optimizer):  # the shape of BAdam's BlockOptimizer: state lives in base_optimizer
        def __init__(self, base):
            self.base_optimizer = base
            super().__init__(base.param_groups, base.defaults)

        def step(self, closure=None):
            return self.base_optimizer.step(closure)

    model = nn.Linear(64, 64)
    wrapped = BlockWrapper(torch.optim.AdamW(model.parameters(), lr=1e-3))
    model(torch.randn(2, 64)).sum().backward()
    wrapped.step()
    assert wrapped.state == {} or all(not v for v in wrapped.state.values())
    assert optimizer_state_bytes(wrapped) >= 2 * 4 * 64 * 65  # exp_avg + exp_avg_sq of weight and bias, once


def test_parameter_bytes_include_quantization_state():
    import bitsandbytes as bnb

    layer = nn.Module()
    layer.weight = bnb.nn.Params4bit(torch.randn(128, 128), requires_grad=False, quant_type="nf4")._quantize("cpu")
    assert layer.weight.dtype == torch.uint8
    measured = parameter_bytes(layer)
    assert 128 * 128 // 2 < measured < 128 * 128 // 2 * 1.25  # packed 4-bit codes plus absmax tables


def test_gradient_meter_sees_the_full_gradient_of_a_normal_backward():
    model = tiny_llama()
    meter = GradientMeter(model)
    ids = TokenDataset().ids[:2]
    model(input_ids=ids, labels=ids).loss.backward()
    meter.sample(model)
    assert meter.peak == sum(p.numel() * 4 for p in model.parameters())
    meter.remove()


def test_memory_report_callback_logs_and_prints_a_breakdown(tmp_path, capsys):
    callback = MemoryReportCallback()
    trainer = Trainer(
        model=tiny_llama(),
        args=training_args(tmp_path, max_steps=3),
        train_dataset=TokenDataset(),
        callbacks=[callback],
    )
    trainer.train()
    params = sum(p.numel() * 4 for p in trainer.model.parameters())
    b = callback.breakdown
    assert b.parameters == params and b.gradients == params
    assert 2 * params <= b.optimizer_state <= 2 * params + 4096  # AdamW: two fp32 moments (+ step counters)
    assert b.activations > 0 and b.peak_process > 0
    assert "mem/optimizer_state_mb" in trainer.state.log_history[0]
    assert "| this run |" in capsys.readouterr().out


class RecordingReporter(TrainerCallback):
    """Stands in for a ``report_to`` reporter: keeps a copy of each ``logs`` dict as it is handed over."""

    def __init__(self):
        self.seen: list[dict] = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.seen.append(dict(logs))


def test_memory_figures_reach_a_reporter_that_comes_first_in_the_callbacks(tmp_path):
    reporter = RecordingReporter()
    trainer = Trainer(
        model=tiny_llama(),
        args=training_args(tmp_path, max_steps=2),
        train_dataset=TokenDataset(),
        callbacks=[reporter, MemoryReportCallback(print_table=False)],
    )
    callback = add_memory_report(trainer)
    assert trainer.callback_handler.callbacks[0] is callback
    assert sum(isinstance(cb, MemoryReportCallback) for cb in trainer.callback_handler.callbacks) == 1
    trainer.train()
    losses = [logs for logs in reporter.seen if "loss" in logs]
    assert len(losses) == 2
    for logs in losses:
        assert logs["mem/optimizer_state_mb"] > 0 and logs["mem/parameters_mb"] > 0


def test_attach_moves_a_given_memory_callback_ahead_of_the_reporters(tmp_path):
    from hf_memopt import GaLoreConfig, attach

    reporter = RecordingReporter()
    callback = MemoryReportCallback(print_table=False)
    trainer = Trainer(
        model=tiny_llama(),
        args=training_args(tmp_path, max_steps=1),
        train_dataset=TokenDataset(),
        callbacks=[reporter, callback],
    )
    attach(trainer, GaLoreConfig(rank=4, target_modules="all-linear"))
    assert trainer.callback_handler.callbacks[0] is callback
    trainer.train()
    assert "mem/optimizer_state_mb" in next(logs for logs in reporter.seen if "loss" in logs)


def test_memory_figures_arrive_in_tensorboard_beside_the_loss(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logs = tmp_path / "runs"  # TensorBoardCallback writes under output_dir/runs/
    args = training_args(tmp_path, max_steps=2, report_to=["tensorboard"])
    trainer = Trainer(model=tiny_llama(), args=args, train_dataset=TokenDataset())
    add_memory_report(trainer, MemoryReportCallback(print_table=False))
    trainer.train()
    trainer.callback_handler.on_train_end(args, trainer.state, trainer.control)  # flush the writer
    (events,) = {p.parent for p in logs.rglob("events.out.tfevents.*")}
    scalars = EventAccumulator(str(events)).Reload()
    tags = scalars.Tags()["scalars"]
    assert "train/loss" in tags and "train/mem/optimizer_state_mb" in tags
    values = scalars.Scalars("train/mem/optimizer_state_mb")
    assert [v.step for v in values] == [s.step for s in scalars.Scalars("train/loss")] == [1, 2]
    assert all(v.value > 0 for v in values)


def test_breakdown_table_and_chart(tmp_path):
    runs = {"adamw": MemoryBreakdown(100, 100, 200, 50, 1000, "peak_rss"), "galore": MemoryBreakdown(100, 100, 20, 50)}
    table = format_breakdown_table(runs)
    assert table.count("\n| ") == 2 and "peak_rss" in table
    path = plot_memory_breakdown(runs, str(tmp_path / "chart.png"))
    assert (tmp_path / "chart.png").stat().st_size > 1000 and path.endswith("chart.png")
