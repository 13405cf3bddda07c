"""The behaviour every hf_memopt optimizer shares through ``hf_memopt.shared.optimizer_base._MemoptOptimizer``.

One row per public optimizer class (``TEST_CASES``, in the way of peft's common tester): bad hyperparameters are
refused naming the argument, the closure runs with gradients enabled and its loss is returned, a non-finite gradient
skips the update whole and is counted (``max_consecutive_skips`` stops training), and the ``state_dict`` survives
``torch.save`` / ``torch.load(weights_only=True)`` with every state dtype kept, so the resumed optimizer steps exactly
as the original. A new optimizer on the base is covered by adding one row (a test fails while it has none).
``pytest -k galore`` runs one method. The method's math is pinned in its own test file against float64 twins.

Parameters are bfloat16 (a 64 x 64 weight, 4096 values: the 8-bit optimizers' smallest 8-bit tensor, and a bias),
so every row keeps state in a dtype other than its parameter's (float32 moments and projectors, uint8 codes, ZO's
float64 accumulators), which a plain ``Optimizer.load_state_dict`` would cast.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch

from hf_memopt.blockllm import BlockLLMAdamW, BlockLLMAdamW8bit
from hf_memopt.blockllm.blocks import Block
from hf_memopt.galore import GaLoreAdafactor, GaLoreAdamW, GaLoreAdamW8bit
from hf_memopt.shared.faults import NonFiniteError
from hf_memopt.shared.optimizer_base import _MemoptOptimizer
from hf_memopt.zo import ZOSGD

DTYPE = torch.bfloat16


def _params(seed: int = 0) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    return [
        torch.nn.Parameter(torch.randn(64, 64, generator=g).to(DTYPE)),
        torch.nn.Parameter(torch.randn(64, generator=g).to(DTYPE)),
    ]


def _galore(cls: type) -> Callable[..., _MemoptOptimizer]:
    def build(params, **kwargs):
        weight, bias = params
        return cls([{"params": [weight], "rank": 4, "update_proj_gap": 2}, {"params": [bias]}], **kwargs)

    return build


def _blockllm(cls: type) -> Callable[..., _MemoptOptimizer]:
    def build(params, **kwargs):
        blocks = [Block("weight", [params[0]], ["weight"]), Block("bias", [params[1]], ["bias"])]
        optimizer = cls(params, blocks=blocks, budget=sum(p.numel() for p in params), **kwargs)
        optimizer.select_at_random(seed=0)  # the budget holds every block: both are selected
        return optimizer

    return build


def _set_grads(optimizer, params, step: int, value: float | None = None) -> None:
    """Gradients of a backward pass: ``.grad`` of every parameter (``value``: filled with it)."""
    g = torch.Generator().manual_seed(100 + step)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g).to(p.dtype) if value is None else torch.full_like(p, value)


def _set_projected_grads(optimizer, params, step: int, value: float | None = None) -> None:
    """ZO's gradient: the training step reports each SPSA sample's projected gradient, not ``.grad``."""
    g = torch.Generator().manual_seed(100 + step)
    for k in range(optimizer.n_samples):
        optimizer.accumulate(k, float(torch.randn(1, generator=g)) if value is None else value)


@dataclass
class Case:
    name: str
    build: Callable[..., _MemoptOptimizer]
    cls: type
    set_grads: Callable[..., None] = _set_grads
    # (argument, invalid value) pairs the constructor must refuse with a ValueError naming the argument
    bad: list[tuple[str, Any]] = field(default_factory=list)


_COMMON_BAD = [("lr", -1e-3), ("lr", math.nan), ("weight_decay", -0.1), ("weight_decay", math.nan)]
_ADAM_BAD = [("betas", (1.0, 0.999)), ("betas", (0.9, -0.1)), ("betas", (0.9, 0.99, 0.9)), ("eps", -1e-8)]

TEST_CASES = [
    Case("galore_adamw", _galore(GaLoreAdamW), GaLoreAdamW, bad=_COMMON_BAD + _ADAM_BAD),
    Case("galore_adamw8bit", _galore(GaLoreAdamW8bit), GaLoreAdamW8bit, bad=_COMMON_BAD + _ADAM_BAD),
    Case(
        "galore_adafactor",
        _galore(GaLoreAdafactor),
        GaLoreAdafactor,
        bad=_COMMON_BAD + [("eps", (-1e-30, 1e-3)), ("eps", (1e-30, math.nan))],
    ),
    Case("blockllm_adamw", _blockllm(BlockLLMAdamW), BlockLLMAdamW, bad=_COMMON_BAD + _ADAM_BAD),
    Case("blockllm_adamw8bit", _blockllm(BlockLLMAdamW8bit), BlockLLMAdamW8bit, bad=_COMMON_BAD + _ADAM_BAD),
    Case("zo_sgd", lambda params, **kw: ZOSGD(params, **kw), ZOSGD, _set_projected_grads, bad=_COMMON_BAD),
]
CASES = [pytest.param(case, id=case.name) for case in TEST_CASES]


def _public_subclasses(cls: type) -> set[type]:
    found = set()
    for sub in cls.__subclasses__():
        found |= _public_subclasses(sub)
        if not sub.__name__.startswith("_") and sub.__module__.startswith("hf_memopt."):
            found.add(sub)
    return found


def test_every_public_optimizer_on_the_base_has_a_row():
    assert _public_subclasses(_MemoptOptimizer) == {case.cls for case in TEST_CASES}


@pytest.mark.parametrize("case", CASES)
def test_out_of_range_hyperparameters_are_refused_naming_the_argument(case):
    for argument, value in case.bad:
        with pytest.raises(ValueError, match=rf"^{argument} must .*got"):
            case.build(_params(), **{argument: value})


@pytest.mark.parametrize("case", CASES)
def test_closure_runs_with_grad_enabled_and_its_loss_is_returned(case):
    params = _params()
    optimizer = case.build(params, lr=1e-2)
    before = [p.detach().clone() for p in params]
    seen = []

    def closure():
        seen.append(torch.is_grad_enabled())
        case.set_grads(optimizer, params, 0)
        return torch.tensor(3.5)

    with torch.no_grad():  # as the Trainer's optimizer step: the closure must still build a graph
        loss = optimizer.step(closure)
    assert seen == [True]
    assert loss.item() == 3.5
    assert any(not torch.equal(p, b) for p, b in zip(params, before)), "the closure's gradients were not applied"
    assert optimizer.step() is None


def _snapshot(optimizer, params) -> tuple[list[torch.Tensor], dict[str, Any]]:
    state = torch.load(_saved(optimizer), weights_only=True)
    state.pop("nonfinite_skips")
    return [p.detach().clone() for p in params], state


def _assert_identical(actual: Any, expected: Any, where: str = "state_dict") -> None:
    """Equal structure and values; tensors bit for bit with the same dtype (NaN equal to NaN)."""
    if torch.is_tensor(expected):
        assert torch.is_tensor(actual) and actual.dtype == expected.dtype, where
        assert torch.equal(actual.nan_to_num(), expected.nan_to_num()) and torch.equal(
            actual.isnan(), expected.isnan()
        ), where
    elif isinstance(expected, dict):
        assert isinstance(actual, dict) and actual.keys() == expected.keys(), where
        for key in expected:
            _assert_identical(actual[key], expected[key], f"{where}[{key!r}]")
    elif isinstance(expected, list | tuple):
        assert type(actual) is type(expected) and len(actual) == len(expected), where
        for i, (a, e) in enumerate(zip(actual, expected)):
            _assert_identical(a, e, f"{where}[{i}]")
    else:
        assert actual == expected or (actual != actual and expected != expected), where


def _saved(optimizer) -> io.BytesIO:
    buffer = io.BytesIO()
    torch.save(optimizer.state_dict(), buffer)
    buffer.seek(0)
    return buffer


@pytest.mark.parametrize("value", [math.nan, math.inf])
@pytest.mark.parametrize("case", CASES)
def test_non_finite_gradient_skips_the_whole_update_and_is_counted(case, value):
    params = _params()
    optimizer = case.build(params, lr=1e-2, max_consecutive_skips=1)
    case.set_grads(optimizer, params, 0)
    optimizer.step()  # a finite update first, so moments, projectors and step counters exist
    weights, state = _snapshot(optimizer, params)
    case.set_grads(optimizer, params, 1, value)
    optimizer.step()
    assert (optimizer.nonfinite_skips.total, optimizer.nonfinite_skips.consecutive) == (1, 1)
    after_weights, after_state = _snapshot(optimizer, params)
    torch.testing.assert_close(after_weights, weights, rtol=0, atol=0)
    _assert_identical(after_state, state)
    case.set_grads(optimizer, params, 2, value)
    with pytest.raises(NonFiniteError, match="max_consecutive_skips=1"):
        optimizer.step()


@pytest.mark.parametrize("case", CASES)
def test_state_dict_reloads_with_weights_only_keeping_dtypes_and_resumes_exactly(case):
    params, resumed_params = _params(), _params()
    optimizer = case.build(params, lr=1e-2)
    for step in range(3):  # GaLore refreshes its projector at steps 0 and 2 (update_proj_gap=2)
        case.set_grads(optimizer, params, step)
        optimizer.step()
    case.set_grads(optimizer, params, 3, math.nan)
    optimizer.step()  # a skip, so the counter has something to carry
    saved = torch.load(_saved(optimizer), weights_only=True)
    dtypes = {
        (i, k): v.dtype for i, s in optimizer.state_dict()["state"].items() for k, v in s.items() if torch.is_tensor(v)
    }
    assert any(dtype != DTYPE for dtype in dtypes.values()), "the row must keep state in another dtype"

    with torch.no_grad():
        for p, q in zip(resumed_params, params):
            p.copy_(q)
    resumed = case.build(resumed_params, lr=1e-2)
    resumed.load_state_dict(saved)
    resumed_state = resumed.state_dict()
    assert {
        (i, k): v.dtype for i, s in resumed_state["state"].items() for k, v in s.items() if torch.is_tensor(v)
    } == dtypes
    assert resumed_state["nonfinite_skips"] == optimizer.state_dict()["nonfinite_skips"]
    assert resumed.nonfinite_skips.total == 1

    for step in range(4, 7):  # crosses GaLore's next projector refresh
        case.set_grads(optimizer, params, step)
        case.set_grads(resumed, resumed_params, step)
        optimizer.step()
        resumed.step()
    torch.testing.assert_close(resumed_params, params, rtol=0, atol=0)
    _assert_identical(resumed.state_dict(), optimizer.state_dict())


@pytest.mark.parametrize("case", [c for c in CASES if c.values[0].set_grads is _set_grads])
def test_sparse_gradient_is_refused_naming_the_class(case):
    params = _params()
    optimizer = case.build(params, lr=1e-2)
    _set_grads(optimizer, params, 0)
    params[0].grad = params[0].grad.to_sparse()
    with pytest.raises(RuntimeError, match=rf"^{case.cls.__name__} does not support sparse gradients"):
        optimizer.step()
