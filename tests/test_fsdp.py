"""Sharding engines on CPU (gloo, 2 processes): DeepSpeed ZeRO through the Trainer, FSDP2 directly, and the refusals.

What runs here and why:

* DeepSpeed ZeRO-0/1/2/3 runs on CPU through ``Trainer(args=TrainingArguments(deepspeed=...))``: the methods
  declared for an engine train, agree across ranks and equal one process with the same global batch; the others
  raise ``NotImplementedError`` at ``attach()`` on both ranks, naming the method, the engine and the reason.
* FSDP cannot run through accelerate on CPU: accelerate 1.15 leaves the FSDP plugin out of its multi-CPU state, so
  ``fsdp=True`` silently trains with DDP (FSDP1 fails on device lookup). The worker pins that, then runs VeLoRA under
  torch's own FSDP2 (``fully_shard``) to show the method itself works on sharded parameters, and GaLore's optimizer
  on FSDP2 gradient shards to show why it is refused. The FSDP refusal at ``attach()`` is checked with a Trainer whose
  engine flags are set as an FSDP run sets them.

One ``torchrun --nproc_per_node 2`` launch of this file (its ``__main__`` block is the worker) does all of it; the
single-process references run in the pytest process, as in ``tests/test_distributed.py``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from conftest import TokenDataset, launch_ranks, refusal_of, tiny_llama, training_args  # noqa: E402

WORLD = 2
PER_RANK_BATCH = 4
STEPS = 3
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
HAS_DEEPSPEED = importlib.util.find_spec("deepspeed") is not None
needs_deepspeed = pytest.mark.skipif(not HAS_DEEPSPEED, reason="deepspeed is not installed")

# case -> (configs, ZeRO stage); the single-process reference attaches the same configs without DeepSpeed
DS_TRAINED = {
    "adamw@zero2": ("adamw", 2),  # the control: if this disagrees, the data split is wrong, not a method
    "velora@zero3": ("velora", 3),  # ZeRO-3 partitions the weights VeLoRA's layers use; ZeRO-1/2 only the optimizer
    "galore@zero0": ("galore", 0),
}
# case -> (configs, ZeRO stage, words the NotImplementedError must contain)
DS_REFUSED = {
    "galore@zero2": ("galore", 2, ["galore under DeepSpeed ZeRO-2", "whole m x n gradient", "flat 1-D partitions"]),
    "galore_layerwise@zero0": ("galore_layerwise", 0, ["galore under DeepSpeed ZeRO-0", "gradient hooks"]),
    "velora+galore@zero3": ("velora+galore", 3, ["galore under DeepSpeed ZeRO-3", "partitions the parameters"]),
    "blockllm@zero1": ("blockllm", 1, ["blockllm under DeepSpeed ZeRO-1", "requires_grad"]),
    "loqt@zero2": ("loqt", 2, ["loqt under DeepSpeed ZeRO-2", "quantized uint8"]),
    "zo@zero2": ("zo", 2, ["zo under DeepSpeed ZeRO-2", "bypassing the engine"]),
}
# method -> words of its FSDP refusal (None: allowed)
FSDP_REFUSED = {
    "galore": ["galore under FSDP", "whole m x n gradient", "shard of rows"],
    "galore_layerwise": ["galore under FSDP", "gradient hooks"],
    "blockllm": ["blockllm under FSDP", "requires_grad"],
    "loqt": ["loqt under FSDP", "quantized uint8"],
    "zo": ["zo under FSDP", "bypassing the engine"],
    "velora": None,
}


def _configs(case: str) -> list:
    """The configs attached, in order, for a case name (``"velora+galore"`` attaches both)."""
    from hf_memopt import BlockLLMConfig, GaLoreConfig, LoQTConfig, VeLoRAConfig, ZOConfig

    one = {
        "adamw": [],
        "galore": [GaLoreConfig(rank=4, update_proj_gap=2, target_modules=LLAMA_TARGETS)],
        "galore_layerwise": [GaLoreConfig(rank=4, target_modules=LLAMA_TARGETS, layerwise=True)],
        "velora": [VeLoRAConfig(num_groups=8)],
        "blockllm": [BlockLLMConfig(sparsity=0.8, patience=2)],
        "loqt": [LoQTConfig(rank=4, target_modules="all-linear")],
        "zo": [ZOConfig()],
    }
    return [config for part in case.split("+") for config in one[part]]


def _deepspeed_config(stage: int) -> dict:
    """A ZeRO config whose batch sizes and clipping follow ``TrainingArguments`` (``"auto"``)."""
    auto = "auto"
    return {
        "zero_optimization": {"stage": stage},
        "train_micro_batch_size_per_gpu": auto,
        "train_batch_size": auto,
        "gradient_accumulation_steps": auto,
        "gradient_clipping": auto,
    }


def _trainer(case: str, output_dir: Path, **overrides):
    from transformers import Trainer

    from hf_memopt import attach

    args = dict(
        max_steps=STEPS,
        learning_rate=1e-2,
        max_grad_norm=1.0,
        train_sampling_strategy="sequential",
        per_device_train_batch_size=PER_RANK_BATCH,
    )
    args.update(overrides)
    trainer = Trainer(
        model=tiny_llama(seed=3), args=training_args(output_dir, **args), train_dataset=TokenDataset(n=48)
    )
    for config in _configs(case):
        attach(trainer, config)
    return trainer


def _losses(trainer) -> list[float]:
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def _full_state(trainer) -> dict[str, torch.Tensor]:
    """Every parameter and buffer, whole (ZeRO-3 keeps only a partition of each parameter between forwards)."""
    import deepspeed

    model = trainer.model
    with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None):
        return {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}


def _fsdp2_velora_states(rank: int) -> dict[str, torch.Tensor]:
    """VeLoRA on a ``fully_shard``-ed tiny LLaMA, 3 AdamW steps of ``PER_RANK_BATCH`` rows per rank: full weights."""
    from torch.distributed.fsdp import fully_shard

    model = _velora_llama()
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    _manual_steps(model, rows=slice(rank * PER_RANK_BATCH, (rank + 1) * PER_RANK_BATCH))
    state = model.state_dict()
    return {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone() for k, v in state.items()}


def _velora_llama():
    from hf_memopt import VeLoRAConfig
    from hf_memopt.velora import apply_velora

    model = tiny_llama(seed=3)
    # float32 coefficients: with bfloat16 ones, summation-order differences in the all-reduced v flip the rounding of
    # a few coefficients and the one-process comparison drifts to ~5e-5 after a few steps (not a sharding effect)
    apply_velora(model, VeLoRAConfig(num_groups=8, coefficient_dtype="float32"))
    return model


def _manual_steps(model, rows: slice) -> None:
    """``STEPS`` AdamW steps; step s uses sequences ``8 s + rows`` (a rank's half, or all 8 for one process)."""
    ids = TokenDataset(n=48).ids
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    for step in range(STEPS):
        batch = ids[step * WORLD * PER_RANK_BATCH :][rows]
        model(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()


def _galore_on_fsdp2_shards() -> dict:
    """Step GaLore's optimizer on FSDP2 gradient shards (``DTensor``): what happens, as ``{type, message}``."""
    from torch.distributed.fsdp import fully_shard

    from hf_memopt import GaLoreConfig
    from hf_memopt.core.plan import OptimizerHyperparameters
    from hf_memopt.galore.builder import create_galore_optimizer

    model = tiny_llama(seed=3)
    fully_shard(model)
    hparams = OptimizerHyperparameters(1e-2, 0.0, (0.9, 0.999), 1e-8, 0.0, 1)
    optimizer = create_galore_optimizer(model, GaLoreConfig(rank=4, target_modules=LLAMA_TARGETS), hparams)
    batch = TokenDataset(n=8).ids
    model(input_ids=batch, labels=batch).loss.backward()
    return refusal_of(optimizer.step) or {"type": None, "message": ""}


# ---- the worker (run by torchrun) --------------------------------------------------------------------------------------
def _worker(out: Path) -> None:
    from safetensors.torch import save_file

    torch.set_num_threads(1)
    rank = int(os.environ["RANK"])
    report: dict = {"trained": {}, "refused": {}}
    # FSDP through the Trainer on CPU: record what accelerate really does with it
    trainer = _trainer("adamw", out / "fsdp_args", fsdp=True, fsdp_config={"version": 2}, ddp_backend="gloo")
    report["fsdp_args_on_cpu"] = {
        "is_fsdp_enabled": trainer.is_fsdp_enabled,
        "distributed_type": str(trainer.accelerator.state.distributed_type),
    }
    save_file(_fsdp2_velora_states(rank), str(out / f"fsdp2_velora.rank{rank}.safetensors"))
    report["galore_on_fsdp2_shards"] = _galore_on_fsdp2_shards()
    for case, (configs, stage) in (DS_TRAINED if HAS_DEEPSPEED else {}).items():
        trainer = _trainer(configs, out / case, deepspeed=_deepspeed_config(stage), ddp_backend="gloo")
        trainer.train()
        save_file(_full_state(trainer), str(out / f"{case}.rank{rank}.safetensors"))
        report["world_size"] = trainer.args.world_size
        report["trained"][case] = {"losses": _losses(trainer), "wrapped": type(trainer.model_wrapped).__name__}
    for case, (configs, stage, _) in (DS_REFUSED if HAS_DEEPSPEED else {}).items():
        report["refused"][case] = refusal_of(
            lambda case=case, configs=configs, stage=stage: _trainer(
                configs, out / case, deepspeed=_deepspeed_config(stage), ddp_backend="gloo"
            ).train()
        )
    (out / f"report.rank{rank}.json").write_text(json.dumps(report))
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


# ---- the tests ------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sharded_run(tmp_path_factory):
    """Launch the 2-process run once; returns its output folder."""
    out = tmp_path_factory.mktemp("sharded")
    launch_ranks(str(Path(__file__).resolve()), out, WORLD, DS_ACCELERATOR="cpu")
    return out


@pytest.fixture(scope="module")
def reports(sharded_run):
    return [json.loads((sharded_run / f"report.rank{r}.json").read_text()) for r in range(WORLD)]


def _load_ranks(folder: Path, case: str) -> list[dict[str, torch.Tensor]]:
    from safetensors.torch import load_file

    return [load_file(str(folder / f"{case}.rank{r}.safetensors")) for r in range(WORLD)]


def _assert_ranks_identical(states: list[dict[str, torch.Tensor]]) -> None:
    assert set(states[0]) == set(states[1])
    for key in states[0]:
        torch.testing.assert_close(states[1][key], states[0][key], rtol=0, atol=0, msg=key)


@needs_deepspeed
def test_deepspeed_really_wraps_the_model_on_two_ranks(reports):
    for report in reports:
        assert report["world_size"] == WORLD
        assert all(r["wrapped"] == "DeepSpeedEngine" for r in report["trained"].values())


@needs_deepspeed
@pytest.mark.parametrize("case", DS_TRAINED)
def test_parameters_are_identical_across_ranks_under_deepspeed(sharded_run, case):
    _assert_ranks_identical(_load_ranks(sharded_run, case))


@needs_deepspeed
@pytest.mark.parametrize("case", DS_TRAINED)
def test_deepspeed_equals_one_process_with_the_same_global_batch(sharded_run, reports, case, tmp_path):
    configs, _ = DS_TRAINED[case]
    single = _trainer(configs, tmp_path, per_device_train_batch_size=WORLD * PER_RANK_BATCH)
    initial = {k: v.detach().clone() for k, v in single.model.state_dict().items()}
    single.train()
    sharded = _load_ranks(sharded_run, case)[0]
    moved = 0
    for key, value in single.model.state_dict().items():
        # float32, a different reduction order (partitioned reduce-scatter / all-reduce of two half-batch means)
        torch.testing.assert_close(sharded[key], value, rtol=1e-5, atol=1e-5, msg=key)
        moved += not torch.equal(initial[key], value)
    assert moved > 0  # the comparison is not between two untouched models
    assert reports[0]["trained"][case]["losses"] == pytest.approx(_losses(single), rel=1e-5)


@needs_deepspeed
@pytest.mark.parametrize("case", DS_REFUSED)
def test_methods_that_cannot_run_under_deepspeed_refuse_at_attach(reports, case):
    for report in reports:
        refusal = report["refused"][case]
        assert refusal is not None, f"{case} trained under DeepSpeed without refusing"
        assert refusal["type"] == "NotImplementedError", refusal
        for word in DS_REFUSED[case][2]:
            assert word in refusal["message"], (word, refusal["message"])


def test_fsdp_arguments_on_cpu_train_with_ddp_in_accelerate(reports):
    """accelerate has no FSDP on CPU: the Trainer reports FSDP off, so attach() rightly treats the run as DDP."""
    for report in reports:
        assert report["fsdp_args_on_cpu"] == {"is_fsdp_enabled": False, "distributed_type": "DistributedType.MULTI_CPU"}


def test_velora_under_fsdp2_equals_one_process(sharded_run):
    states = _load_ranks(sharded_run, "fsdp2_velora")
    _assert_ranks_identical(states)
    single = _velora_llama()
    initial = {k: v.detach().clone() for k, v in single.state_dict().items()}
    _manual_steps(single, rows=slice(0, WORLD * PER_RANK_BATCH))
    for key, value in single.state_dict().items():
        torch.testing.assert_close(states[0][key], value, rtol=1e-5, atol=1e-5, msg=key)
    assert not torch.equal(initial["model.layers.0.mlp.up_proj.weight"], single.model.layers[0].mlp.up_proj.weight)


def test_galore_optimizer_cannot_step_fsdp2_gradient_shards(reports):
    """Why GaLore is refused under FSDP: its subspace iteration multiplies the gradient shard by a whole matrix."""
    for report in reports:
        assert report["galore_on_fsdp2_shards"]["type"] == "RuntimeError"
        assert "DTensor" in report["galore_on_fsdp2_shards"]["message"]


def _as_fsdp(trainer, version: int = 2):
    """Set the engine flags the Trainer's constructor sets when accelerate runs FSDP (it cannot on CPU)."""
    trainer.is_fsdp_enabled = True
    trainer.accelerator = SimpleNamespace(state=SimpleNamespace(fsdp_plugin=SimpleNamespace(fsdp_version=version)))
    return trainer


@pytest.mark.parametrize("case", FSDP_REFUSED)
def test_attach_refuses_methods_that_cannot_run_under_fsdp(case, tmp_path):
    from transformers import Trainer

    from hf_memopt import attach

    trainer = _as_fsdp(Trainer(model=tiny_llama(), args=training_args(tmp_path), train_dataset=TokenDataset(n=8)))
    words = FSDP_REFUSED[case]
    if words is None:
        for config in _configs(case):
            attach(trainer, config)
        return
    with pytest.raises(NotImplementedError) as err:
        for config in _configs(case):
            attach(trainer, config)
    for word in words:
        assert word in str(err.value), (word, str(err.value))


def _fake_deepspeed_trainer(ds_config: dict, **args):
    plugin = SimpleNamespace(zero_stage=ds_config["zero_optimization"]["stage"], deepspeed_config=ds_config)
    return SimpleNamespace(
        is_fsdp_enabled=False,
        is_deepspeed_enabled=True,
        accelerator=SimpleNamespace(state=SimpleNamespace(deepspeed_plugin=plugin)),
        args=SimpleNamespace(**args),
    )


@pytest.mark.parametrize(
    ("ds_extra", "args", "engine"),
    [
        ({}, {}, "zero0"),
        ({"bf16": {"enabled": True}}, {}, "zero0_lowp"),
        ({"fp16": {"enabled": "auto"}}, {"fp16": True}, "zero0_lowp"),
        ({"fp16": {"enabled": "auto"}}, {"fp16": False}, "zero0"),
    ],
)
def test_zero0_with_fp16_or_bf16_is_a_different_engine(ds_extra, args, engine):
    """DeepSpeed wraps the optimizer in its mixed-precision optimizer (flat fp32 copies) at stage 0 with fp16/bf16."""
    from hf_memopt.shared.parallel import detect_engine

    assert detect_engine(_fake_deepspeed_trainer({"zero_optimization": {"stage": 0}, **ds_extra}, **args)) == engine


def test_galore_refuses_zero0_with_bf16_and_names_the_engine_that_works():
    from hf_memopt import METHODS, GaLoreConfig
    from hf_memopt.shared.parallel import check_engine_supported

    trainer = _fake_deepspeed_trainer({"zero_optimization": {"stage": 0}, "bf16": {"enabled": True}})
    with pytest.raises(NotImplementedError, match="ZeRO-0 with fp16/bf16") as err:
        check_engine_supported(trainer, METHODS["galore"], GaLoreConfig())
    assert "runs under: DeepSpeed ZeRO-0." in str(err.value)


def test_register_method_rejects_an_unknown_engine():
    from hf_memopt.core.registry import METHODS, register_method

    with pytest.raises(ValueError, match="engines"):
        register_method("not_a_method", type("NotAConfig", (), {}), lambda t, c: None, "x", engines=frozenset({"tp"}))
    assert "not_a_method" not in METHODS


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))
