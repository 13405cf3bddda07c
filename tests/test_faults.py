"""Faults: a NaN / Inf loss or gradient skips the update and changes nothing; too many in a row stop training with a
clear message; out of memory at a BlockLLM re-selection or a LoQT merge leaves a consistent state and says what to do.

One table, one row per method (``pytest -k loqt`` runs one): a tiny Trainer run whose loss (hence every gradient, or
for ZO both perturbed losses) is poisoned at chosen updates by a forward hook.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from conftest import TokenDataset, tiny_llama, training_args
from test_resume_matrix import _assert_same_state
from transformers import Trainer, TrainerCallback

from hf_memopt import BlockLLMConfig, GaLoreConfig, LoQTConfig, ZOConfig, attach
from hf_memopt.blockllm import create_blockllm_optimizer
from hf_memopt.blockllm.optimizer import BlockLLMAdamW
from hf_memopt.core.plan import OptimizerHyperparameters
from hf_memopt.galore import GaLoreAdamW
from hf_memopt.loqt import LoQTCallback, convert_to_loqt
from hf_memopt.shared.faults import NonFiniteError, SkipCounter, all_finite, skip_counter_of
from hf_memopt.shared.optim_state import unwrap_optimizer
from hf_memopt.zo.perturb import perturbation

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
POISONED = 2  # 0-based update index: a GaLore refresh (gap 2), a LoQT merge (updates 0, 2, ...), after BlockLLM's
# first selection (update 0 scores)


@dataclass
class Case:
    config: Any
    args: dict[str, Any] = field(default_factory=dict)
    loss_drops: bool = True  # ZO's progress in a few steps is below its noise: its updates are checked instead
    prepare: Any = None  # applied to the fresh model before the trainer is built


def _loqt(**kw):
    return LoQTConfig(rank=3, quant="nf4", quantize_projection=True, merge_every=2, merge_growth=1.0,
                      error_compensation_steps=1, target_modules=["q_proj", "up_proj"], **kw)  # fmt: skip


def _min_memory(model):
    from hf_memopt.shared.chunked_loss import use_chunked_lm_loss
    from hf_memopt.shared.frozen import freeze_modules
    from hf_memopt.shared.swiglu import use_recomputed_swiglu

    freeze_modules(model, ["embed_tokens", "lm_head"], "bfloat16")
    use_recomputed_swiglu(model)
    return use_chunked_lm_loss(model, chunk_size=16)


CASES = {
    "galore": Case(GaLoreConfig(rank=4, update_proj_gap=2, target_modules=TARGETS)),
    # without clipping each hook skips its own parameter; with clipping finish_step skips the whole update
    "galore_layerwise": Case(
        GaLoreConfig(rank=4, update_proj_gap=2, target_modules=TARGETS, layerwise=True), {"max_grad_norm": 0.0}
    ),  # fmt: skip
    "galore_layerwise_clipped": Case(GaLoreConfig(rank=4, update_proj_gap=2, target_modules=TARGETS, layerwise=True)),
    "blockllm": Case(BlockLLMConfig(sparsity=0.8, patience=1, mask_fraction=0.5), {"learning_rate": 3e-2}),
    "loqt": Case(_loqt(), {"learning_rate": 1e-2}),
    "loqt_layerwise": Case(_loqt(layerwise=True), {"learning_rate": 1e-2, "max_grad_norm": 0.0}),
    "zo": Case(ZOConfig(eps=1e-2), {"learning_rate": 3e-2}, loss_drops=False),
    # recipes/instruct/smollm2_min_memory.yaml: LoQT layer-wise, 8-bit states, checkpointing, frozen bf16 embeddings
    # and head, the chunked loss
    "min_memory_loqt": Case(
        _loqt(layerwise=True, init_weight="quantized"),
        {"learning_rate": 1e-2, "max_grad_norm": 0.0, "optim": "adamw_bnb_8bit", "gradient_checkpointing": True},
        prepare=_min_memory,
    ),
}


def _with(config: Any, **changes: Any) -> Any:
    config = copy.deepcopy(config)
    for key, value in changes.items():
        setattr(config, key, value)
    config.__post_init__()
    return config


class _Poison(TrainerCallback):
    """Makes the loss NaN during the updates in ``steps``; snapshots the model and optimizer around the first one.

    ``on_step_begin`` (before the update's forward) and ``on_optimizer_step`` (after ``optimizer.step()`` and LoQT's
    merge, before anything that reacts to the loss at ``on_step_end``).
    """

    def __init__(self, model: torch.nn.Module, steps: set[int], batch: dict[str, torch.Tensor]):
        self.steps, self.batch, self.active = steps, batch, False
        self.before: dict[str, Any] | None = None
        self.after: dict[str, Any] | None = None
        self.eval_losses: list[float] = []
        self.zo_restored: dict[str, torch.Tensor] = {}
        model.register_forward_hook(self._poison_loss)

    def _poison_loss(self, module, args, output):
        if self.active and getattr(output, "loss", None) is not None:
            output.loss = output.loss * float("nan")
        return output

    def _snapshot(self, model, optimizer) -> dict[str, Any]:
        state = copy.deepcopy(unwrap_optimizer(optimizer).state_dict())
        state.pop("nonfinite_skips", None)
        return {"model": {k: v.clone() for k, v in model.state_dict().items()}, "optimizer": state}

    def on_step_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        self.active = False
        with torch.no_grad():
            self.eval_losses.append(model(**self.batch).loss.item())
        self.active = state.global_step in self.steps
        if state.global_step == min(self.steps):
            self.before = self._snapshot(model, optimizer)
            self.zo_restored = _zo_replay(model, unwrap_optimizer(optimizer))

    def on_optimizer_step(self, args, state, control, model=None, optimizer=None, **kwargs):
        if state.global_step == min(self.steps):
            self.after = self._snapshot(model, optimizer)


def _zo_replay(model, optimizer) -> dict[str, torch.Tensor]:
    """ZO only: theta after the training step's +eps z, -2 eps z, +eps z (what an update-free step leaves)."""
    if not hasattr(optimizer, "sample_seed"):
        return {}
    eps, seed = 1e-2, optimizer.sample_seed(0)
    names = {p: n for n, p in model.named_parameters()}
    restored = {}
    for index, p in optimizer.trainable():
        theta = p.detach().clone()
        for scale in (eps, -2 * eps, eps):
            theta.add_(perturbation(theta, seed, index), alpha=scale)
        restored[names[p]] = theta
    return restored


def _run(case: Case, tmp_path, steps: set[int], max_steps: int = 6, config: Any = None):
    dataset = TokenDataset(n=32)
    model = tiny_llama(seed=3)
    model = case.prepare(model) if case.prepare is not None else model
    trainer = Trainer(model=model, args=training_args(tmp_path, max_steps=max_steps, **case.args),
                      train_dataset=dataset)  # fmt: skip
    attach(trainer, config or case.config)
    batch = {k: torch.stack([dataset[i][k] for i in range(8)]) for k in ("input_ids", "labels")}
    poison = _Poison(model, steps, batch)
    trainer.add_callback(poison)
    return trainer, poison


@pytest.mark.parametrize("name", list(CASES))
def test_a_poisoned_update_changes_nothing_and_training_goes_on(name, tmp_path):
    trainer, poison = _run(CASES[name], tmp_path, {POISONED})
    trainer.train()

    # model (parameters, quantized weights, projections) and optimizer state (moments, projectors, step counters,
    # masks, BlockLLM's selection, ZO's step and seed) are bit-identical across the skipped update
    _assert_same_state(poison.before["optimizer"], poison.after["optimizer"], "optimizer")
    for key, before in poison.before["model"].items():
        after = poison.after["model"][key]
        if key in poison.zo_restored:  # ZO's in-place perturbation round trip is the only change
            torch.testing.assert_close(after, poison.zo_restored[key], rtol=0, atol=0)
        else:
            torch.testing.assert_close(after, before, rtol=0, atol=0, msg=key)

    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert [h["skipped_updates"] for h in logs] == [0] * POISONED + [1] * (len(logs) - POISONED)
    assert skip_counter_of(trainer.optimizer).consecutive == 0
    assert all(p.isfinite().all() for p in trainer.model.parameters())
    # training went on: the fixed-batch loss after the skipped update keeps falling (ZO: the updates resumed)
    if CASES[name].loss_drops:
        assert poison.eval_losses[-1] < poison.eval_losses[POISONED], poison.eval_losses
    else:
        assert unwrap_optimizer(trainer.optimizer).zo_step == trainer.state.global_step - 1
        assert not torch.equal(trainer.model.lm_head.weight, poison.after["model"]["lm_head.weight"])


@pytest.mark.parametrize("name", ["galore", "blockllm", "loqt", "zo"])
def test_too_many_poisoned_updates_in_a_row_stop_with_a_clear_message(name, tmp_path):
    config = _with(CASES[name].config, max_consecutive_skips=2)
    trainer, _ = _run(CASES[name], tmp_path, {1, 2, 3}, max_steps=4, config=config)
    with pytest.raises(NonFiniteError, match=r"update 4 \(3 in a row, max_consecutive_skips=2\).*resume"):
        trainer.train()
    assert all(p.isfinite().all() for p in trainer.model.parameters())


def test_max_consecutive_skips_zero_stops_at_the_first():
    weight = torch.nn.Parameter(torch.randn(6, 4))
    optimizer = GaLoreAdamW([{"params": [weight], "rank": 2}], lr=0.1, max_consecutive_skips=0)
    weight.grad = torch.randn_like(weight)
    optimizer.step()
    weight.grad[2, 1] = float("nan")
    with pytest.raises(NonFiniteError, match=r"update 2 \(1 in a row"):
        optimizer.step()


def test_skip_counter_travels_in_the_optimizer_state_dict(tmp_path):
    weight = torch.nn.Parameter(torch.randn(6, 4))
    optimizer = GaLoreAdamW([{"params": [weight], "rank": 2}], lr=0.1, max_consecutive_skips=3)
    for value in (float("inf"), float("nan")):
        weight.grad = torch.full_like(weight, value)
        optimizer.step()
    assert not optimizer.state[weight]  # nothing was initialised or stepped
    torch.save(optimizer.state_dict(), tmp_path / "optimizer.pt")

    fresh = GaLoreAdamW([{"params": [weight], "rank": 2}], lr=0.1, max_consecutive_skips=3)
    fresh.load_state_dict(torch.load(tmp_path / "optimizer.pt", weights_only=True))
    assert (fresh.nonfinite_skips.consecutive, fresh.nonfinite_skips.total, fresh.nonfinite_skips.updates) == (2, 2, 2)
    weight.grad = torch.full_like(weight, float("nan"))
    fresh.step()  # the third in a row is still allowed
    with pytest.raises(NonFiniteError, match=r"\(4 in a row"):
        fresh.step()


def test_all_finite_finds_one_bad_element_without_overflowing():
    big = torch.full((3,), 3e38)  # its sum or squared norm overflows float32; its max-norm does not
    assert all_finite([big, None, torch.zeros(0)])
    for bad in (float("nan"), float("inf"), float("-inf")):
        t = torch.zeros(5, dtype=torch.bfloat16)
        t[3] = bad
        assert not all_finite([big, t])


def test_skip_counter_rejects_a_negative_limit():
    with pytest.raises(ValueError, match="max_consecutive_skips"):
        SkipCounter(-1)


# ---- BlockLLM: re-selection ------------------------------------------------------------------------------------------
def _blockllm_after_first_selection():
    model = tiny_llama(seed=3)
    hparams = OptimizerHyperparameters(1e-2, 0.0, (0.9, 0.999), 1e-8, 0.0, 1)
    optimizer = create_blockllm_optimizer(model, BlockLLMConfig(sparsity=0.8, patience=1), hparams)
    batch = {k: torch.stack([TokenDataset(n=8)[i][k] for i in range(8)]) for k in ("input_ids", "labels")}
    optimizer.begin_scoring()
    model(**batch).loss.backward()
    optimizer.step()
    optimizer.finish_scoring()
    model.zero_grad()
    model(**batch).loss.backward()
    return model, optimizer


def _oom(*args, **kwargs):
    raise torch.OutOfMemoryError("CUDA out of memory (simulated)")


def test_blockllm_out_of_memory_allocating_new_blocks_state_changes_nothing(monkeypatch):
    model, optimizer = _blockllm_after_first_selection()
    params = {k: v.clone() for k, v in model.state_dict().items()}
    real, calls = BlockLLMAdamW._init_moments, []

    def init_then_fail(self, state, p):
        calls.append(p)
        if len(calls) == 2:
            _oom()
        real(self, state, p)

    monkeypatch.setattr(BlockLLMAdamW, "_init_moments", init_then_fail)
    with pytest.raises(torch.OutOfMemoryError, match=r"newly selected blocks .*no parameter or optimizer state was "
                       r"changed.*per_device_train_batch_size.*resume_from_checkpoint"):  # fmt: skip
        optimizer.step()
    assert not any(optimizer.state.values())  # the one state created before the error was dropped again
    _assert_same_state(params, model.state_dict(), "model")
    monkeypatch.undo()
    optimizer.step()  # the same step succeeds once memory is available
    assert len(optimizer.state) == sum(len(b.params) for b, s in zip(optimizer.blocks, optimizer.selected) if s)


def test_blockllm_reselection_out_of_memory_or_nan_norms_keep_the_selection(monkeypatch):
    model, optimizer = _blockllm_after_first_selection()
    optimizer.step()
    selected, visits = optimizer.selected.clone(), optimizer.visits.clone()
    optimizer.begin_scoring()
    model.zero_grad()
    model(**{"input_ids": torch.arange(8)[None], "labels": torch.arange(8)[None]}).loss.backward()

    monkeypatch.setattr("hf_memopt.blockllm.optimizer.select_blocks", _oom)
    with pytest.raises(torch.OutOfMemoryError, match="selection 2; nothing was changed"):
        optimizer.finish_scoring()
    monkeypatch.undo()
    assert optimizer.scoring and torch.equal(optimizer.selected, selected) and torch.equal(optimizer.visits, visits)

    optimizer._norms_sq[0] = float("nan")  # NaN norms would rank blocks at random: the next step scores again
    assert torch.equal(optimizer.finish_scoring(), selected)
    assert optimizer.scoring and optimizer.num_selections == 1 and torch.equal(optimizer.visits, visits)


# ---- LoQT: merge -----------------------------------------------------------------------------------------------------
def _loqt_layers_with_gradients():
    model = tiny_llama(seed=3)
    config = _loqt()
    layers = convert_to_loqt(model, config)
    for layer in layers.values():
        layer._grad_sum = torch.randn(layer.out_features, layer.in_features)
        layer.merge(0)  # initialise P
        layer._grad_sum = torch.randn(layer.out_features, layer.in_features)
        layer.B.data.normal_()
    return model, config, layers


def _buffers(layer) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in layer.state_dict().items()}


def test_loqt_out_of_memory_in_a_merge_leaves_each_layer_whole(monkeypatch):
    _, config, layers = _loqt_layers_with_gradients()
    names = list(layers)
    before = {n: _buffers(layer) for n, layer in layers.items()}
    import hf_memopt.loqt.layer as loqt_layer

    real, calls = loqt_layer.quantize_with_error_compensation, []

    def quantize_then_fail(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            _oom()
        return real(*args, **kwargs)

    monkeypatch.setattr(loqt_layer, "quantize_with_error_compensation", quantize_then_fail)
    callback = LoQTCallback(config, layers)
    message = rf"merging layer {names[1]} at update 5; 1 of {len(names)} layers were merged.*unchanged.*resume_from"
    with pytest.raises(torch.OutOfMemoryError, match=message):
        callback._merge_all(None, 5)
    assert int(layers[names[0]].merges) == 2
    for name in names[1:]:  # the failed layer and the later ones: W_q, P, B and the merge count as before
        _assert_same_state(before[name], _buffers(layers[name]), name)


def test_loqt_never_merges_a_non_finite_adapter_and_never_takes_p_from_a_non_finite_gradient():
    _, _, layers = _loqt_layers_with_gradients()
    first, second = list(layers.values())[:2]
    first_before, second_before = _buffers(first), _buffers(second)
    first.B.data[0, 0] = float("inf")
    with pytest.raises(FloatingPointError, match="non-finite at merge 2.*not merged"):
        first.merge(0)
    first_before["B"][0, 0] = float("inf")
    _assert_same_state(first_before, _buffers(first), "first")

    second._grad_sum[1, 2] = float("nan")
    second._reduce_gradient()
    assert second.gradient_nonfinite and second._next_proj is None
    second.discard_collected()
    _assert_same_state(second_before, _buffers(second), "second")


def test_loqt_out_of_memory_finding_p_on_the_cpu_names_the_layer(monkeypatch):
    _, _, layers = _loqt_layers_with_gradients()
    name, layer = next(iter(layers.items()))
    before = _buffers(layer)
    monkeypatch.setattr("hf_memopt.loqt.layer.refresh_projector", _oom)
    with pytest.raises(torch.OutOfMemoryError, match=f"new projection of {name} \\(merge 2\\); the layer is unchanged"):
        layer.merge(0)
    _assert_same_state(before, _buffers(layer), name)
