"""hf_memopt.shared: the per-parameter update core (float64, any stock optimizer) and the method-neutral module mark."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import TokenDataset, tiny_llama
from torch import nn

from hf_memopt import GaLoreConfig
from hf_memopt.core.plan import OptimizerHyperparameters
from hf_memopt.galore import create_galore_optimizer
from hf_memopt.shared.faults import install_skip_counter
from hf_memopt.shared.layerwise import OptimizerStepRule, PerParameterUpdates
from hf_memopt.shared.modules import mark_rewritten, rewritten_by, unmark_rewritten

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _train(model, optimizer, boundary_flag, accumulation: int, updates: int = 4):
    data = TokenDataset(n=4 * accumulation * updates, seed=2).ids
    for u in range(updates):
        for i in range(accumulation):
            boundary_flag["value"] = i == accumulation - 1
            ids = data[(u * accumulation + i) * 4 : (u * accumulation + i + 1) * 4]
            (model(input_ids=ids, labels=ids).loss / accumulation).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


@pytest.mark.parametrize("accumulation, clip", [(1, 0.0), (2, 0.0), (1, 0.05)])
def test_galore_layerwise_in_float64_equals_the_whole_model_float64_optimizer(accumulation, clip):
    base = tiny_llama(seed=1, dtype=torch.float64)
    results = []
    for layerwise in (False, True):
        model, flag = copy.deepcopy(base), {"value": True}
        config = GaLoreConfig(
            rank=4, update_proj_gap=3, target_modules=TARGETS, layerwise=layerwise, svd_method="exact"
        )
        hparams = OptimizerHyperparameters(
            lr=5e-3, weight_decay=0.0, betas=(0.9, 0.999), eps=1e-6, max_grad_norm=clip,
            gradient_accumulation_steps=accumulation,
        )  # fmt: skip
        optimizer = create_galore_optimizer(model, config, hparams, is_accumulation_boundary=lambda f=flag: f["value"])
        if clip and not layerwise:
            step = optimizer.step
            optimizer.step = lambda m=model, s=step: (torch.nn.utils.clip_grad_norm_(m.parameters(), clip), s())
        _train(model, optimizer, flag, accumulation)
        if layerwise:
            assert optimizer.last_grad_norm is not None and optimizer.last_grad_norm > 0
            optimizer.layerwise.remove()
        results.append(model)
    for (name, a), b in zip(results[0].named_parameters(), results[1].parameters()):
        assert b.dtype == torch.float64
        torch.testing.assert_close(b, a, msg=name)  # float64 defaults: rtol 1e-7, atol 1e-7
    assert not torch.equal(
        results[1].model.layers[0].self_attn.q_proj.weight, base.model.layers[0].self_attn.q_proj.weight
    )


@pytest.mark.parametrize("accumulation", [1, 3])
def test_stepping_a_stock_optimizer_one_parameter_at_a_time_equals_its_whole_step(accumulation):
    """OptimizerStepRule: torch AdamW with two parameter groups (weight decay on one), stepped inside backward."""
    base = tiny_llama(seed=4, dtype=torch.float64)
    results = []
    for layerwise in (False, True):
        model, flag = copy.deepcopy(base), {"value": True}
        params = list(model.parameters())
        optimizer = torch.optim.AdamW(
            [{"params": params[::2], "weight_decay": 0.1}, {"params": params[1::2], "weight_decay": 0.0}], lr=1e-2
        )
        if layerwise:
            install_skip_counter(optimizer, 0)
            updates = PerParameterUpdates(OptimizerStepRule(optimizer, "test"), params, 0.0, lambda f=flag: f["value"])
            step = optimizer.step

            def finish_then_step(step=step, updates=updates, params=params):
                assert all(p.grad is None for p in params)  # every gradient was used and freed inside backward
                updates.finish_step()
                step()  # finds no gradient: changes nothing

            optimizer.step = finish_then_step
        _train(model, optimizer, flag, accumulation)
        results.append((model, optimizer))
    (whole, opt_a), (layerwise, opt_b) = results
    for (name, a), b in zip(whole.named_parameters(), layerwise.parameters()):
        torch.testing.assert_close(b, a, rtol=0, atol=0, msg=name)
        for key, value in opt_a.state[a].items():
            torch.testing.assert_close(opt_b.state[b][key], value, rtol=0, atol=0)
    assert [g["weight_decay"] for g in opt_b.param_groups] == [0.1, 0.0]
    assert [len(g["params"]) for g in opt_b.param_groups] == [len(g["params"]) for g in opt_a.param_groups]


def test_rewritten_mark_names_the_method_and_is_removed_on_restore():
    module = nn.Linear(3, 2)
    assert rewritten_by(module) is None
    mark_rewritten(module, "VeLoRA")
    assert rewritten_by(module) == "VeLoRA" and "_hf_memopt_rewritten_by" not in dict(module.named_buffers())
    unmark_rewritten(module)
    assert rewritten_by(module) is None
