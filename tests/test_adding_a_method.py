"""``docs/adding_a_method.md`` is true, and every method goes through the one spine.

The page's example method (sign-SGD) is run from the page itself: its code block is executed as a module, which
registers the method; the fixture unregisters it afterwards. The checks are the page's promises: the shared pieces
``attach()`` adds for any method (a non-finite update skipped and counted, the true ``grad_norm`` logged, the model
card naming the method, ``hf-memopt methods`` listing it). The builtin methods' table checks that each plan, alone
or combined, is applied by the same code path: fault reporting, the model card and the ``grad_norm`` correction
installed once per trainer, and combinations that cannot work refused before the trainer changes.
"""

from __future__ import annotations

import copy
import dataclasses
import re
import sys
import types
from pathlib import Path

import pytest
import torch
from conftest import TokenDataset, tiny_llama, training_args
from transformers import Trainer, TrainerCallback, TrainingArguments

from hf_memopt import BlockLLMConfig, GaLoreConfig, LoQTConfig, VeLoRAConfig, ZOConfig, attach
from hf_memopt.core.attach import applied_plans
from hf_memopt.core.plan import MethodPlan
from hf_memopt.core.registry import METHODS, register_method, unregister_method
from hf_memopt.core.trainer_hooks import GradNormCallback
from hf_memopt.loqt import loqt_layers
from hf_memopt.shared.faults import SkippedUpdatesCallback
from hf_memopt.tools.cli import main
from hf_memopt.tools.modelcard import ModelCardCallback

DOC = Path(__file__).resolve().parents[1] / "docs" / "adding_a_method.md"
NAN_UPDATE = 2  # the 1-based optimizer update whose gradient the test poisons


def example_code() -> str:
    """The first Python block after the page's "Example" heading."""
    text = DOC.read_text()
    example = text[text.index("## Example") :]
    return re.search(r"```python\n(.*?)```", example, re.DOTALL).group(1)


@pytest.fixture
def signsgd():
    """The page's example, run as the module ``signsgd_example`` (registering ``"signsgd"``); unregistered after."""
    module = types.ModuleType("signsgd_example")
    sys.modules[module.__name__] = module  # dataclasses resolve the module of the class they decorate
    try:
        exec(compile(example_code(), str(DOC), "exec"), module.__dict__)
        yield module
    finally:
        sys.modules.pop(module.__name__, None)
        if "signsgd" in METHODS:
            unregister_method("signsgd")


class PoisonGradient(TrainerCallback):
    """``on_pre_optimizer_step`` of update ``NAN_UPDATE``: one gradient entry becomes NaN; records the weights around
    that update (the optimizer must leave them as they were)."""

    def __init__(self):
        self.before = self.after = None

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if state.global_step + 1 == NAN_UPDATE:
            weight = model.model.layers[0].mlp.up_proj.weight
            weight.grad[0, 0] = float("nan")
            self.before = [p.detach().clone() for p in model.parameters()]

    def on_optimizer_step(self, args, state, control, model=None, **kwargs):
        if state.global_step + 1 == NAN_UPDATE:
            self.after = [p.detach().clone() for p in model.parameters()]


def first_batch_grad_norm(model: torch.nn.Module, dataset: TokenDataset, batch: int) -> float:
    """The norm of the gradient of the first (sequential) batch, computed directly."""
    model = copy.deepcopy(model)
    ids = torch.stack([dataset[i]["input_ids"] for i in range(batch)])
    model(input_ids=ids, labels=ids).loss.backward()
    return torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()])).item()


def test_the_example_method_trains_through_attach_with_every_shared_piece(signsgd, tmp_path):
    dataset = TokenDataset()
    model = tiny_llama()
    expected_first_norm = first_batch_grad_norm(model, dataset, batch=4)
    args = training_args(tmp_path, max_steps=5, learning_rate=1e-3, train_sampling_strategy="sequential")
    trainer = Trainer(model=model, args=args, train_dataset=dataset)
    attach(trainer, signsgd.SignSGDConfig())
    poison = PoisonGradient()
    trainer.add_callback(poison)
    trainer.train()

    assert isinstance(trainer.optimizer.optimizer, signsgd.SignSGD)
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 5
    # the NaN update was skipped whole, and counted in the logs from that update on
    for before, after in zip(poison.before, poison.after):
        torch.testing.assert_close(after, before, rtol=0, atol=0)
    assert [h["skipped_updates"] for h in logs] == [0, 1, 1, 1, 1]
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
    # the Trainer's grad_norm stays (the method updates after backward), and it is the true one
    torch.testing.assert_close(logs[0]["grad_norm"], expected_first_norm, rtol=1e-5, atol=0)
    assert all(h["grad_norm"] > 0 for h in logs)
    # the example's own callback went first in line and its figure reached the logs
    first = [type(cb) for cb in trainer.callback_handler.callbacks[:2]]
    assert first == [SkippedUpdatesCallback, signsgd.SignAgreementCallback]
    assert all(0.0 <= h["sign_agreement"] <= 1.0 for h in logs[1:])

    trainer.save_model(str(tmp_path / "final"))
    card = (tmp_path / "final" / "README.md").read_text()
    assert "signsgd" in card and "SignSGD" in card


def test_hf_memopt_methods_lists_the_registered_example(signsgd, capsys):
    assert main(["methods"]) == 0
    line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("signsgd "))
    assert "SignSGDConfig" in line and "Sign of the gradient" in line


def test_unregistering_the_example_removes_it_from_the_registry(signsgd):
    assert METHODS["signsgd"].config_cls is signsgd.SignSGDConfig
    unregister_method("signsgd")
    assert "signsgd" not in METHODS
    with pytest.raises(KeyError, match="no method 'signsgd'"):
        unregister_method("signsgd")


# ---------------------------------------------------------------------------------------------------------------
# The builtin methods: one code path for every plan

# case -> configs in attach order, and the TrainingArguments overrides the case needs
BUILTIN_CASES = {
    "galore": ([GaLoreConfig(rank=4)], {}),
    "galore_layerwise": ([GaLoreConfig(rank=4, layerwise=True)], {"max_grad_norm": 0.0}),
    "blockllm": ([BlockLLMConfig(sparsity=0.5)], {}),
    "loqt": ([LoQTConfig(rank=4)], {}),
    "loqt_layerwise": ([LoQTConfig(rank=4, layerwise=True)], {"max_grad_norm": 0.0}),
    "velora": ([VeLoRAConfig(num_groups=4)], {}),
    "zo": ([ZOConfig()], {}),
    "velora+galore": ([VeLoRAConfig(num_groups=4), GaLoreConfig(rank=4)], {}),
    "velora+loqt": (
        [VeLoRAConfig(num_groups=4, target_modules=["q_proj"]), LoQTConfig(rank=4, target_modules=["up_proj"])],
        {},
    ),
    "loqt+galore_layerwise": (
        [LoQTConfig(rank=4, target_modules=["up_proj"]), GaLoreConfig(rank=4, layerwise=True)],
        {"max_grad_norm": 0.0},
    ),
    "velora+zo": ([VeLoRAConfig(num_groups=4), ZOConfig()], {}),
}
MEASURE_GRAD_NORM = {"galore_layerwise", "loqt_layerwise", "zo", "loqt+galore_layerwise", "velora+zo"}


def test_every_registered_method_has_a_row_in_the_builtin_table():
    covered = {name for case in BUILTIN_CASES for name in case.replace("_layerwise", "").split("+")}
    assert set(METHODS) <= covered


def _trainer(tmp_path, **overrides) -> Trainer:
    return Trainer(model=tiny_llama(), args=training_args(tmp_path, **overrides), train_dataset=TokenDataset())


def _count(trainer: Trainer, cls: type) -> int:
    return sum(isinstance(cb, cls) for cb in trainer.callback_handler.callbacks)


@pytest.mark.parametrize("case", BUILTIN_CASES)
def test_every_builtin_plan_is_applied_by_the_spine_once_per_trainer(case, tmp_path):
    configs, overrides = BUILTIN_CASES[case]
    trainer = _trainer(tmp_path, **overrides)
    for config in configs:
        attach(trainer, config)
    assert [name for name, _ in applied_plans(trainer)] == case.replace("_layerwise", "").split("+")
    assert _count(trainer, SkippedUpdatesCallback) == 1
    assert _count(trainer, ModelCardCallback) == 1
    assert _count(trainer, GradNormCallback) == (case in MEASURE_GRAD_NORM)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    # counted by every optimizer with a skip counter: all but the Trainer's own AdamW beside VeLoRA alone
    assert logs and all(("skipped_updates" in h) == (case != "velora") for h in logs)
    if case in MEASURE_GRAD_NORM and "zo" in case:  # no gradient: the Trainer's 0 is removed, not shown
        assert not any("grad_norm" in h for h in logs)
    elif case in MEASURE_GRAD_NORM:  # measured by the hooks, not the Trainer's 0
        assert all(h["grad_norm"] > 0 for h in logs)


def test_two_methods_measuring_grad_norm_are_refused_before_the_trainer_changes(tmp_path):
    trainer = _trainer(tmp_path, max_grad_norm=0.0)
    attach(trainer, ZOConfig())
    callbacks = list(trainer.callback_handler.callbacks)
    with pytest.raises(ValueError, match="loqt and zo both update the parameters outside"):
        attach(trainer, LoQTConfig(rank=4, layerwise=True))
    assert not loqt_layers(trainer.model)
    assert trainer.callback_handler.callbacks == callbacks
    assert [name for name, _ in applied_plans(trainer)] == ["zo"]


def test_ddp_averaging_beside_a_method_that_keeps_the_model_out_of_ddp_is_refused(tmp_path, monkeypatch):
    trainer = _trainer(tmp_path, max_grad_norm=0.0)
    attach(trainer, GaLoreConfig(rank=4))
    monkeypatch.setattr(TrainingArguments, "world_size", property(lambda self: 2))
    prepare_model = trainer.accelerator.prepare_model
    with pytest.raises(ValueError, match="galore steps on gradients DDP averages, but loqt averages its own"):
        attach(trainer, LoQTConfig(rank=4, layerwise=True))
    assert not loqt_layers(trainer.model)
    assert trainer.accelerator.prepare_model == prepare_model


# ---------------------------------------------------------------------------------------------------------------
# The spine's own contract: plans compose in attach order, and a plan must match its registration


class Recorder:
    """Two toy methods that keep the Trainer's optimizer; each plan records when its pieces run."""

    def __init__(self):
        self.events: list[str] = []

    def planner(self, tag: str, **fields):
        def plan(trainer, config):
            def wrap(current):
                def training_step(*args, **kwargs):
                    self.events.append(f"{tag}:step")
                    return current(*args, **kwargs)

                return training_step

            def created(optimizer):
                self.events.append(f"{tag}:created:{len(optimizer.state)}")

            return MethodPlan(wrap_training_step=wrap, on_optimizer_created=created, data_parallel="any", **fields)

        return plan


@pytest.fixture
def two_toy_methods():
    recorder = Recorder()
    configs = {tag: dataclasses.make_dataclass(f"Toy{tag}Config", []) for tag in ("a", "b")}
    try:
        for tag, cls in configs.items():
            register_method(f"toy_{tag}", cls, recorder.planner(tag), "toy", sets_optimizer=False)
        yield recorder, configs
    finally:
        for tag in configs:
            if f"toy_{tag}" in METHODS:
                unregister_method(f"toy_{tag}")


def test_training_step_wrappers_and_optimizer_hooks_compose_in_attach_order(two_toy_methods, tmp_path):
    recorder, configs = two_toy_methods
    trainer = _trainer(tmp_path, max_steps=1)
    attach(trainer, configs["a"]())
    attach(trainer, configs["b"]())
    trainer.train()
    # hooks in attach order, on the optimizer before any state exists; the later wrapper is the outer one
    assert recorder.events == ["a:created:0", "b:created:0", "b:step", "a:step"]


def test_a_plan_that_contradicts_its_registration_is_refused(tmp_path):
    config_cls = type("LiarConfig", (), {})
    register_method("liar", config_cls, lambda trainer, config: MethodPlan(), "toy", sets_optimizer=True)
    try:
        trainer = _trainer(tmp_path)
        with pytest.raises(TypeError, match="liar is registered with sets_optimizer=True, but its plan has no"):
            attach(trainer, config_cls())
        assert applied_plans(trainer) == []
    finally:
        unregister_method("liar")
