"""The stock ``TrainingArguments(optim="galore_*")`` names: rerouting, transformers' target rule, rank cap, fallbacks.

The private transformers names the stock path reads (``hf_memopt.core.compat``) are pinned here against the installed
version, so an upgrade that changes one fails loudly in this file.
"""

from __future__ import annotations

import logging
import re
import subprocess
import sys

import pytest
import torch
from conftest import TokenDataset, tiny_llama, training_args
from torch import nn
from transformers import Trainer, TrainingArguments

import hf_memopt
from hf_memopt import GaLoreConfig, attach
from hf_memopt.core import compat
from hf_memopt.core.compat import TRANSFORMERS_TESTED, decay_rule, optimizer_handlers, target_module_rule
from hf_memopt.galore import stock
from hf_memopt.galore.optimizer import GaLoreAdamW
from hf_memopt.galore.stock import STOCK_GALORE_NAMES, reroute_stock_galore_names, stock_target_parameters
from hf_memopt.shared.faults import NonFiniteError
from hf_memopt.shared.optim_state import unwrap_optimizer

CAP_MESSAGE = "exceeds the smaller side"


def reference_rule(targets: str | list[str], name: str) -> bool:
    """transformers' documented ``optim_target_modules`` rule, written out: a list entry matches a full module name
    by equality, as a substring or as a full-match regex; a single string is a full-match regex."""
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or t in name or re.fullmatch(t, name) is not None for t in targets)


def stock_optimizer(tmp_path, model=None, **overrides):
    kwargs = dict(optim="galore_adamw", optim_target_modules=[r".*attn.*", r".*mlp.*"])
    kwargs.update(overrides)
    trainer = Trainer(model=model or tiny_llama(), args=training_args(tmp_path, **kwargs), train_dataset=TokenDataset())
    return trainer, unwrap_optimizer(trainer.create_optimizer())


def projected_ranks(optimizer) -> dict[tuple[int, ...], int]:
    return {tuple(p.shape): g["rank"] for g in optimizer.param_groups if g["rank"] is not None for p in g["params"]}


# ---------------------------------------------------------------------------------------------------------------
# The private names (hf_memopt.core.compat), pinned against the installed transformers


def test_installed_transformers_is_in_the_tested_range_and_its_handler_table_has_the_tested_shape():
    import transformers
    from transformers import trainer_optimizer

    low, high = TRANSFORMERS_TESTED
    assert low <= type(low)(transformers.__version__) < high
    table, reason = optimizer_handlers(STOCK_GALORE_NAMES)
    assert reason == "" and table is trainer_optimizer._OPTIMIZER_HANDLERS
    # rerouted by `import hf_memopt`: to the handler, or to the stand-in that hands over to it on first use
    assert {table[name] for name in STOCK_GALORE_NAMES} <= {stock._galore_handler, hf_memopt._stock_galore_handler}


@pytest.mark.parametrize(
    "targets, name",
    [
        (["attn"], "model.layers.0.self_attn.q_proj"),  # substring
        (["model.layers.0.mlp.up_proj"], "model.layers.0.mlp.up_proj"),  # equality
        ([r".*\.0\..*proj"], "model.layers.0.mlp.up_proj"),  # full-match regex entry
        ([r"layers\.0"], "model.layers.0.mlp.up_proj"),  # not a full match, not a substring
        (["q_proj"], "model.layers.0.self_attn.k_proj"),
        (r".*q_proj", "model.layers.0.self_attn.q_proj"),  # a single string: full-match regex
        ("q_proj", "model.layers.0.self_attn.q_proj"),  # ... so a bare name does not match a qualified one
    ],
)
def test_transformers_target_rule_is_equality_substring_or_full_match(targets, name):
    rule, reason = target_module_rule()
    assert reason == ""
    assert rule(targets, name, return_is_regex=True)[0] == reference_rule(targets, name)


def test_the_trainers_decay_rule_applies_without_a_trainer(tmp_path):
    rule, reason = decay_rule()
    model = tiny_llama()
    trainer = Trainer(model=model, args=training_args(tmp_path), train_dataset=TokenDataset())
    assert reason == "" and rule(model) == trainer.get_decay_parameter_names(model)
    assert "model.norm.weight" not in rule(model) and "lm_head.weight" in rule(model)


# ---------------------------------------------------------------------------------------------------------------
# A changed or missing table: one warning, stock names left alone, attach() unaffected


def test_a_missing_handler_table_is_warned_about_once_and_attach_still_works(tmp_path, monkeypatch, caplog):
    from transformers import trainer_optimizer

    monkeypatch.delattr(trainer_optimizer, "_OPTIMIZER_HANDLERS")
    monkeypatch.setattr(compat, "_warned_not_rerouted", False)
    with caplog.at_level(logging.WARNING, logger="hf_memopt.galore.stock"):
        assert reroute_stock_galore_names() is False
        assert reroute_stock_galore_names() is False
    warnings = [r.getMessage() for r in caplog.records if "NOT rerouted" in r.getMessage()]
    assert len(warnings) == 1 and "_OPTIMIZER_HANDLERS is missing" in warnings[0]

    trainer = Trainer(model=tiny_llama(), args=training_args(tmp_path), train_dataset=TokenDataset())
    attach(trainer, GaLoreConfig(rank=4, target_modules=["q_proj"]))
    assert isinstance(unwrap_optimizer(trainer.create_optimizer()), GaLoreAdamW)


def test_an_untested_transformers_version_leaves_the_stock_names_alone(monkeypatch):
    import transformers
    from transformers import trainer_optimizer

    monkeypatch.setattr(transformers, "__version__", "6.0.0")
    monkeypatch.setattr(compat, "_warned_not_rerouted", False)
    table = trainer_optimizer._OPTIMIZER_HANDLERS
    monkeypatch.setitem(table, "galore_adamw", "left alone")
    assert reroute_stock_galore_names() is False
    assert table["galore_adamw"] == "left alone"


def test_import_hf_memopt_succeeds_and_says_once_when_the_handler_table_is_gone():
    code = (
        "import transformers.trainer, transformers.trainer_optimizer as t\n"
        "del t._OPTIMIZER_HANDLERS\n"
        "import hf_memopt\n"
        "from hf_memopt.galore.stock import reroute_stock_galore_names\n"
        "assert reroute_stock_galore_names() is False\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.count("NOT rerouted") == 1


# ---------------------------------------------------------------------------------------------------------------
# Targets: exactly transformers' selection


@pytest.mark.parametrize(
    "targets",
    [[r".*attn.*", r".*mlp.*"], ["attn"], ["q_proj", "v_proj"], [r".*\.1\..*"], r".*mlp\.(up|down)_proj", "all-linear"],
)
def test_stock_targets_are_the_linear_layers_transformers_rule_selects(targets):
    model = tiny_llama()
    expected = {
        f"{name}.weight"
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and (targets == "all-linear" or reference_rule(targets, name))
    }
    assert set(stock_target_parameters(model, targets, "galore_adamw")) == expected
    assert expected  # not vacuous


def test_stock_all_linear_projects_the_output_head_but_not_a_tied_one():
    assert "lm_head.weight" in stock_target_parameters(tiny_llama(), "all-linear", "galore_adamw")
    tied = tiny_llama()
    tied.config.tie_word_embeddings = True
    tied.lm_head.weight = tied.model.embed_tokens.weight
    targets = stock_target_parameters(tied, "all-linear", "galore_adamw")
    assert all(p is not tied.model.embed_tokens.weight for p in targets.values())


def test_stock_targets_that_select_no_linear_layer_are_refused(tmp_path):
    with pytest.raises(ValueError, match=r"optim_target_modules=\['input_layernorm'\] selects no trainable nn.Linear"):
        stock_optimizer(tmp_path, optim_target_modules=["input_layernorm"])


# ---------------------------------------------------------------------------------------------------------------
# Rank cap (both paths), SVD defaults, parameter groups


def test_stock_rank_above_a_layer_is_capped_at_its_smaller_side_and_logged_once(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="hf_memopt.galore.builder"):
        _, optimizer = stock_optimizer(tmp_path)  # rank 128 (galore-torch's default) on a 32-wide model
    ranks = projected_ranks(optimizer)
    assert ranks == {shape: min(shape) for shape in ranks} and len(ranks) == 4  # q/o, k/v, gate/up, down shapes
    capped = [r.getMessage() for r in caplog.records if CAP_MESSAGE in r.getMessage()]
    assert len(capped) == 1 and "rank=128" in capped[0] and "model.layers.1.mlp.down_proj.weight" in capped[0]


def test_attach_caps_a_too_large_rank_the_same_way(tmp_path, caplog):
    trainer = Trainer(model=tiny_llama(), args=training_args(tmp_path), train_dataset=TokenDataset())
    attach(trainer, GaLoreConfig(rank=33, target_modules=["q_proj", "k_proj"]))  # q: 32 x 32, k: 16 x 32
    with caplog.at_level(logging.WARNING, logger="hf_memopt.galore.builder"):
        optimizer = unwrap_optimizer(trainer.create_optimizer())
    assert projected_ranks(optimizer) == {(32, 32): 32, (16, 32): 16}
    assert sum(CAP_MESSAGE in r.getMessage() for r in caplog.records) == 1


def test_a_rank_within_every_layer_is_not_capped_or_logged(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="hf_memopt.galore.builder"):
        _, optimizer = stock_optimizer(tmp_path, optim_args="rank=8")
    assert set(projected_ranks(optimizer).values()) == {8}
    assert not any(CAP_MESSAGE in r.getMessage() for r in caplog.records)


def test_stock_names_default_to_the_exact_svd_and_attach_to_the_subspace_refresh(tmp_path):
    _, optimizer = stock_optimizer(tmp_path)
    assert {g["svd_method"] for g in optimizer.param_groups if g["rank"] is not None} == {"exact"}
    _, optimizer = stock_optimizer(tmp_path, optim_args="rank=8,svd_method=subspace")
    assert {g["svd_method"] for g in optimizer.param_groups if g["rank"] is not None} == {"subspace"}
    assert GaLoreConfig().svd_method == "subspace"


@pytest.mark.parametrize("weight_decay, groups", [(0.0, 2), (0.01, 3)])
def test_parameter_groups_split_by_decay_only_when_weight_decay_is_set(tmp_path, weight_decay, groups):
    _, optimizer = stock_optimizer(tmp_path, optim_args="rank=8", weight_decay=weight_decay)
    assert len(optimizer.param_groups) == groups
    decays = sorted(g["weight_decay"] for g in optimizer.param_groups)
    assert decays == ([0.0, 0.0] if weight_decay == 0 else [0.0, 0.01, 0.01])


# ---------------------------------------------------------------------------------------------------------------
# What the stock path shares with attach(): non-finite skip, the logged grad_norm, distributed refusals


def test_stock_optimizer_skips_a_non_finite_update_whole_and_stops_past_max_consecutive_skips(tmp_path):
    trainer, optimizer = stock_optimizer(tmp_path, optim_args="rank=8,max_consecutive_skips=1")
    params = [p for g in optimizer.param_groups for p in g["params"]]
    before = [p.detach().clone() for p in params]
    for p in params:
        p.grad = torch.ones_like(p)
    params[0].grad[0, 0] = float("nan")
    optimizer.step()
    assert all(torch.equal(p, b) for p, b in zip(params, before))
    assert optimizer.nonfinite_skips.total == 1
    with pytest.raises(NonFiniteError, match="max_consecutive_skips=1"):
        optimizer.step()


def test_stock_and_attach_log_the_same_grad_norm(tmp_path):
    def grad_norms(trainer):
        trainer.train()
        return [h["grad_norm"] for h in trainer.state.log_history if "grad_norm" in h]

    common = dict(max_steps=2, optim_target_modules=["q_proj", "v_proj"], max_grad_norm=1.0)
    stock_trainer = Trainer(
        model=tiny_llama(),
        args=training_args(tmp_path / "stock", optim="galore_adamw", optim_args="rank=8", **common),
        train_dataset=TokenDataset(),
    )
    attached = Trainer(
        model=tiny_llama(), args=training_args(tmp_path / "attach", **common), train_dataset=TokenDataset()
    )
    attach(attached, GaLoreConfig(rank=8, target_modules=["q_proj", "v_proj"], svd_method="exact"))
    stock_norms, attach_norms = grad_norms(stock_trainer), grad_norms(attached)
    assert len(stock_norms) == 2 and stock_norms[0] > 0
    torch.testing.assert_close(stock_norms, attach_norms)


def test_stock_layerwise_is_refused_under_distributed_training(tmp_path, monkeypatch):
    args = training_args(tmp_path, optim="galore_adamw_layerwise", optim_target_modules=["q_proj"], max_grad_norm=0.0)
    monkeypatch.setattr(TrainingArguments, "world_size", property(lambda self: 2))
    with pytest.raises(ValueError, match="cannot run under distributed training"):
        Trainer.get_optimizer_cls_and_kwargs(args, tiny_llama())


# ---------------------------------------------------------------------------------------------------------------
# Data-parallel training (gloo, 2 processes; this file's __main__ is the worker, as in test_distributed.py)

WORLD, PER_RANK_BATCH = 2, 4
DDP_OPTIM = dict(optim_target_modules=[r".*attn.*", r".*mlp.*"], optim_args="rank=4,update_proj_gap=2")


def ddp_case_trainer(output_dir, optim: str, batch_factor: int = 1, **overrides) -> Trainer:
    args = dict(
        max_steps=3,
        max_grad_norm=1.0,
        train_sampling_strategy="sequential",
        per_device_train_batch_size=PER_RANK_BATCH * batch_factor,
        optim=optim,
        **DDP_OPTIM,
    )
    args.update(overrides)
    return Trainer(model=tiny_llama(seed=3), args=training_args(output_dir, **args), train_dataset=TokenDataset(n=48))


def _logged(trainer, key: str) -> list[float]:
    return [h[key] for h in trainer.state.log_history if key in h and "train_runtime" not in h]


def _ddp_worker(out) -> None:
    import json
    import os
    from pathlib import Path

    from conftest import refusal_of
    from safetensors.torch import save_file

    torch.set_num_threads(1)
    out, rank = Path(out), int(os.environ["RANK"])
    trainer = ddp_case_trainer(out / "run", "galore_adamw", ddp_backend="gloo")
    trainer.train()
    save_file({k: v.detach().contiguous() for k, v in trainer.model.state_dict().items()}, str(out / f"rank{rank}.st"))
    report = {
        "wrapped": type(trainer.model_wrapped).__name__,
        "losses": _logged(trainer, "loss"),
        "grad_norms": _logged(trainer, "grad_norm"),
        "refused": refusal_of(
            lambda: ddp_case_trainer(
                out / "lw", "galore_adamw_layerwise", ddp_backend="gloo", max_grad_norm=0.0
            ).train()
        ),
    }
    (out / f"report.rank{rank}.json").write_text(json.dumps(report))
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    import json
    from pathlib import Path

    from conftest import launch_ranks

    out = tmp_path_factory.mktemp("stock_ddp")
    launch_ranks(str(Path(__file__).resolve()), out, WORLD)
    return out, [json.loads((out / f"report.rank{r}.json").read_text()) for r in range(WORLD)]


def test_stock_galore_under_ddp_equals_one_process_with_the_same_global_batch(ddp_run, tmp_path):
    from safetensors.torch import load_file

    out, reports = ddp_run
    states = [load_file(str(out / f"rank{r}.st")) for r in range(WORLD)]
    single = ddp_case_trainer(tmp_path, "galore_adamw", batch_factor=WORLD)
    initial = {k: v.detach().clone() for k, v in single.model.state_dict().items()}
    single.train()
    for key, value in single.model.state_dict().items():
        torch.testing.assert_close(states[1][key], states[0][key], rtol=0, atol=0, msg=key)  # ranks agree exactly
        # float32, another reduction order (two half-batch means averaged by all-reduce); a wrong split moves 4e-2
        torch.testing.assert_close(states[0][key], value, rtol=1e-5, atol=1e-5, msg=key)
    assert any(not torch.equal(initial[k], v) for k, v in single.model.state_dict().items())
    assert reports[0]["wrapped"] == "DistributedDataParallel"
    assert reports[0]["losses"] == pytest.approx(_logged(single, "loss"), rel=1e-5)
    assert reports[0]["grad_norms"] == pytest.approx(_logged(single, "grad_norm"), rel=1e-5)  # the true norm


def test_stock_layerwise_under_ddp_is_refused_with_a_pointer_to_attach(ddp_run):
    for report in ddp_run[1]:
        assert report["refused"]["type"] == "ValueError"
        assert "cannot run under distributed training" in report["refused"]["message"]
        assert "hf_memopt.attach" in report["refused"]["message"]


if __name__ == "__main__":
    _ddp_worker(sys.argv[1])
