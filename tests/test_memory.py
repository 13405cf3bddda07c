"""Memory accounting: each category is measured from real tensors, shared storages counted once."""

from __future__ import annotations

import torch
from conftest import TokenDataset, tiny_llama, training_args
from torch import nn
from transformers import Trainer

from hf_memopt.memory import (
    GradientMeter,
    MemoryBreakdown,
    MemoryReportCallback,
    SavedActivationMeter,
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
    trainer = Trainer(model=tiny_llama(), args=training_args(tmp_path, max_steps=3), train_dataset=TokenDataset(),
                      callbacks=[callback])
    trainer.train()
    params = sum(p.numel() * 4 for p in trainer.model.parameters())
    b = callback.breakdown
    assert b.parameters == params and b.gradients == params
    assert 2 * params <= b.optimizer_state <= 2 * params + 4096  # AdamW: two fp32 moments (+ step counters)
    assert b.activations > 0 and b.peak_process > 0
    assert "mem/optimizer_state_mb" in trainer.state.log_history[0]
    assert "| this run |" in capsys.readouterr().out


def test_breakdown_table_and_chart(tmp_path):
    runs = {"adamw": MemoryBreakdown(100, 100, 200, 50, 1000, "peak_rss"), "galore": MemoryBreakdown(100, 100, 20, 50)}
    table = format_breakdown_table(runs)
    assert table.count("\n| ") == 2 and "peak_rss" in table
    path = plot_memory_breakdown(runs, str(tmp_path / "chart.png"))
    assert (tmp_path / "chart.png").stat().st_size > 1000 and path.endswith("chart.png")
