"""Property tests over every registered config class: valid values construct, invalid ones raise ``ValueError`` naming
the field.

The documented range of every field (read from each config's docstring and ``help``) is written once in ``RANGES``;
the kind of value (int, float, bool, choice, target modules, dotted name) comes from the field's annotation. A new
method or field fails ``test_every_registered_config_field_has_a_documented_range`` until its row is added here.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import hf_memopt
from hf_memopt import METHODS

SETTINGS = settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# ---- the documented ranges ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Int:
    low: int | None = None
    high: int | None = None


@dataclass(frozen=True)
class Float:
    low: float | None = None
    high: float | None = None
    low_inclusive: bool = True
    high_inclusive: bool = True


@dataclass(frozen=True)
class Choice:
    choices: tuple


@dataclass(frozen=True)
class Bool:
    pass


@dataclass(frozen=True)
class Targets:
    """``target_modules``: names, a regex, or ``"all-linear"``; ``auto`` also allows ``"auto"``."""

    auto: bool = False


@dataclass(frozen=True)
class Name:
    """A non-empty dotted attribute path."""


SEED = Int(0, 2**32 - 1)  # what torch.Generator.manual_seed and the per-layer seed offsets accept

RANGES: dict[str, dict[str, Any]] = {
    "galore": {
        "rank": Int(1),
        "update_proj_gap": Int(1),
        "scale": Float(0.0, low_inclusive=False),
        "proj_type": Choice(("std", "reverse_std", "left", "right", "full")),
        "target_modules": Targets(),
        "optimizer": Choice(("adamw", "adamw_8bit", "adafactor")),
        "adafactor_beta1": Float(0.0, 1.0, high_inclusive=False),  # or None
        "layerwise": Bool(),
        "svd_method": Choice(("subspace", "exact")),
        "svd_iterations": Int(1),
        "seed": SEED,
        "max_consecutive_skips": Int(0),
    },
    "blockllm": {
        "sparsity": Float(0.0, 1.0, high_inclusive=False),
        "patience": Int(1),
        "optimizer": Choice(("adamw", "adamw_8bit")),
        "block_granularity": Choice(("parameter", "layer")),
        "train_embeddings": Bool(),
        "mask_fraction": Float(0.0, 1.0, low_inclusive=False),
        "visit_penalty": Float(0.0),
        "min_8bit_size": Int(1),
        "selection": Choice(("full_backward", "stored_norms")),
        "explore_blocks": Int(0),
        "stall_check_interval": Int(1),
        "max_consecutive_skips": Int(0),
    },
    "loqt": {
        "rank": Int(1),
        "quant": Choice(("nf4", "fp4", "int8", None)),
        "quantize_projection": Bool(),
        "quant_block_size": Choice((64, 128, 256, 512, 1024, 2048, 4096)),
        "merge_every": Int(1),
        "merge_growth": Float(1.0),
        "merge_schedule": Choice(("exponential", "static", "geometric")),
        "max_merge_interval": Int(1),  # or None
        "error_compensation_steps": Int(0),
        "scale": Float(0.0, low_inclusive=False),
        "proj_type": Choice(("std", "reverse_std", "left", "right")),
        "target_modules": Targets(),
        "svd_method": Choice(("subspace", "exact")),
        "svd_iterations": Int(1),
        "optimizer_state_on_merge": Choice(("reset", "keep")),
        "seed": SEED,
        "max_consecutive_skips": Int(0),
        "layerwise": Bool(),
        "init_weight": Choice(("full_precision", "quantized")),
        "train_only_factors": Bool(),
        "dequantize_chunk_mib": Float(0.0, low_inclusive=False),  # or None
    },
    "velora": {
        "target_modules": Targets(auto=True),
        "num_groups": Int(1),
        "init": Choice(("batch_average_once", "batch_average", "random", "svd")),
        "scale": Float(0.0, low_inclusive=False),
        "coefficient_dtype": Choice(("bfloat16", "float16", "float32")),
        "seed": SEED,
    },
    "zo": {
        "eps": Float(0.0, 1.0, low_inclusive=False),
        "n_samples": Int(1),
        "weight_decay": Float(0.0),  # or None
        "seed": Int(0),  # or None; mixed into a 64-bit hash, so any size works
        "offload": Choice(("none", "cpu")),
        "offload_dtype": Choice((None, "float32", "bfloat16", "float16")),
        "blocks_attr": Name(),  # or None
        "overlap": Bool(),
        "max_consecutive_skips": Int(0),
    },
}


# Cross-field rules from the docstrings, applied to a drawn set of valid values so that it stays valid.
def _make_consistent(method: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    if method == "loqt" and kwargs.get("quant") is None:
        kwargs["quantize_projection"] = False  # quantize_projection needs a quant type
        kwargs["init_weight"] = "full_precision"  # so does a quantized initialisation
    if method == "galore" and kwargs.get("adafactor_beta1") is not None:
        kwargs["optimizer"] = "adafactor"  # adafactor_beta1 needs the Adafactor base optimizer
    if method == "zo" and kwargs.get("offload_dtype") not in (None, "float32"):
        kwargs["offload"] = "cpu"  # a storage dtype needs offloading
    return kwargs


def _optional(field: dataclasses.Field) -> bool:
    return "None" in str(field.type)


def _fields(method: str) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(METHODS[method].config_cls)}


# ---- strategies -----------------------------------------------------------------------------------------------------
_IDENT = st.builds(
    str.__add__,
    st.sampled_from("abcdefghijklmnopqrstuvwxyz"),
    st.text("abcdefghijklmnopqrstuvwxyz0123456789_", max_size=8),
)
_OTHER_TYPES = st.one_of(
    st.none(), st.lists(st.integers(), max_size=2), st.dictionaries(_IDENT, st.integers(), max_size=1)
)


def valid_values(spec: Any, optional: bool) -> st.SearchStrategy:
    if isinstance(spec, Int):
        low = spec.low if spec.low is not None else -(2**31)
        high = spec.high if spec.high is not None else max(low, 0) + 100_000
        s = st.integers(low, high)
    elif isinstance(spec, Float):
        low = spec.low if spec.low is not None else -1e6
        high = spec.high if spec.high is not None else 1e6
        s = st.floats(
            low, high, exclude_min=not spec.low_inclusive, exclude_max=not spec.high_inclusive, allow_nan=False
        )
        ints = [i for i in range(math.ceil(low), math.floor(high) + 1) if (spec.low_inclusive or i > low)]
        ints = [i for i in ints[:10] if spec.high_inclusive or i < high]
        if ints:
            s = s | st.sampled_from(ints)  # a float field also takes an int (HfArgumentParser may give one)
    elif isinstance(spec, Choice):
        s = st.sampled_from(spec.choices)
    elif isinstance(spec, Bool):
        s = st.booleans()
    elif isinstance(spec, Targets):
        names = st.lists(_IDENT, min_size=1, max_size=3)
        regexes = st.lists(_IDENT, min_size=1, max_size=3).map(lambda xs: r".*\.(" + "|".join(xs) + ")")
        s = st.sampled_from(["all-linear", "all_linear"]) | names | regexes
        if spec.auto:
            s = s | st.sampled_from(["auto", None])
    elif isinstance(spec, Name):
        s = st.lists(_IDENT, min_size=1, max_size=3).map(".".join)
    else:  # pragma: no cover - a new kind of range needs a strategy
        raise TypeError(spec)
    return s | st.none() if optional else s


def invalid_values(spec: Any, optional: bool) -> st.SearchStrategy:
    not_none = st.just(None).filter(lambda _: not optional)
    if isinstance(spec, Int):
        parts = [
            st.booleans(),
            st.floats(allow_nan=True, allow_infinity=True),  # 2.0 included: an int field takes ints only
            st.text(max_size=4),
            st.lists(st.integers(), max_size=2),
        ]
        if spec.low is not None:
            parts.append(st.integers(max_value=spec.low - 1))
        if spec.high is not None:
            parts.append(st.integers(min_value=spec.high + 1))
    elif isinstance(spec, Float):
        parts = [
            st.booleans(),
            st.sampled_from([math.nan, math.inf, -math.inf]),
            st.text(max_size=4),
            st.lists(st.floats(), max_size=2),
        ]
        if spec.low is not None:
            below = st.floats(max_value=spec.low, exclude_max=spec.low_inclusive, allow_nan=False)
            parts.append(below.filter(lambda v: v > -math.inf))
        if spec.high is not None:
            above = st.floats(min_value=spec.high, exclude_min=spec.high_inclusive, allow_nan=False)
            parts.append(above.filter(lambda v: v < math.inf))
    elif isinstance(spec, Choice):
        parts = [
            st.text(max_size=12).filter(lambda v: v not in spec.choices),
            st.sampled_from([c.upper() + " " for c in spec.choices if isinstance(c, str)] or ["x"]),
            st.integers().filter(lambda v: v not in spec.choices),
            st.floats(allow_nan=False),
            st.sampled_from([float(c) for c in spec.choices if isinstance(c, int)] or [0.5]),
            st.sampled_from([True, False]),
            st.lists(st.text(max_size=3), max_size=2),
        ]
        if None not in spec.choices:
            parts.append(not_none)
    elif isinstance(spec, Bool):
        parts = [st.integers(), st.sampled_from(["true", "False", "yes", ""]), st.floats(), not_none]
    elif isinstance(spec, Targets):
        parts = [
            st.sampled_from(["", "(", "[a-", "*", "q_proj)"]),  # empty or not a regular expression
            st.just([]),
            st.lists(st.sampled_from(["", 1, None, 2.5]), min_size=1, max_size=2),
            st.integers(),
            st.floats(allow_nan=False),
        ]
        if not spec.auto:
            parts.append(not_none)
    elif isinstance(spec, Name):
        parts = [st.just(""), st.integers(), st.lists(_IDENT, min_size=1, max_size=2), st.booleans()]
    else:  # pragma: no cover
        raise TypeError(spec)
    parts.append(_OTHER_TYPES.filter(lambda v: v is not None or not optional))
    return st.one_of(parts).filter(lambda v: not (optional and v is None))


# ---- the tests ------------------------------------------------------------------------------------------------------
def test_every_registered_config_field_has_a_documented_range():
    assert {"galore", "blockllm", "loqt", "velora", "zo"} <= set(METHODS)
    for name, spec in METHODS.items():
        assert name in RANGES, f"add a RANGES row for the new method {name!r}"
        assert set(_fields(name)) == set(RANGES[name]), f"{name}: fields and documented ranges differ"
        assert dataclasses.is_dataclass(spec.config_cls)
        assert spec.config_cls in {getattr(hf_memopt, n) for n in hf_memopt.__all__ if n.endswith("Config")}


def test_every_field_has_help_and_the_docstring_links_the_paper_and_lists_every_field():
    for name, spec in METHODS.items():
        doc = spec.config_cls.__doc__ or ""
        assert re.search(r"https://arxiv\.org/abs/\d{4}\.\d{4,5}", doc.split("Args:")[0]), name
        args = doc.split("Args:", 1)[1]
        for field in dataclasses.fields(spec.config_cls):
            assert field.metadata.get("help"), f"{name}.{field.name} has no help"
            assert re.search(rf"^\s+{field.name}:", args, re.M), f"{name}.{field.name} is not in the Args: block"


def test_defaults_construct():
    for spec in METHODS.values():
        spec.config_cls()


@pytest.mark.parametrize("method", sorted(RANGES))
@SETTINGS
@given(data=st.data())
def test_valid_values_construct_and_are_kept(method, data):
    fields = _fields(method)
    kwargs = {
        name: data.draw(valid_values(RANGES[method][name], _optional(f)), label=name) for name, f in fields.items()
    }
    kwargs = _make_consistent(method, kwargs)
    config = METHODS[method].config_cls(**kwargs)
    for name, value in kwargs.items():
        kept = getattr(config, name)
        if isinstance(RANGES[method][name], Targets):
            expected = "auto" if value is None else value
            assert kept == expected, name
        elif isinstance(RANGES[method][name], Float) and value is not None:
            assert isinstance(kept, float) and kept == value, name
        else:
            assert kept == value and type(kept) is type(value), name


@pytest.mark.parametrize("method, name", [(m, f) for m in sorted(RANGES) for f in RANGES[m]])
@settings(max_examples=12, deadline=None)
@given(data=st.data())
def test_an_invalid_value_raises_value_error_naming_its_field(method, name, data):
    fields = _fields(method)
    spec = RANGES[method][name]
    value = data.draw(invalid_values(spec, _optional(fields[name])))
    with pytest.raises(ValueError) as err:
        METHODS[method].config_cls(**{name: value})
    assert name in str(err.value), f"{method}.{name}={value!r}: {err.value}"


@pytest.mark.parametrize(
    "method, kwargs, field",
    [
        ("loqt", {"quant": None, "quantize_projection": True}, "quantize_projection"),
        ("loqt", {"quant": None, "quantize_projection": False, "init_weight": "quantized"}, "init_weight"),
        ("zo", {"offload_dtype": "bfloat16", "offload": "none"}, "offload_dtype"),
        ("zo", {"offload_dtype": "float16"}, "offload_dtype"),
        ("galore", {"adafactor_beta1": 0.9, "optimizer": "adamw"}, "adafactor_beta1"),
    ],
)
def test_cross_field_rules_raise_naming_the_field(method, kwargs, field):
    with pytest.raises(ValueError, match=field):
        METHODS[method].config_cls(**kwargs)


# Inputs that used to construct and then fail at training time with an error that did not name the field.
@pytest.mark.parametrize(
    "method, kwargs, field",
    [
        # bitsandbytes: "Expected a value of type 'int' for argument 'blocksize'" at the first quantization
        ("loqt", {"quant_block_size": 64.0}, "quant_block_size"),
        # torch.Generator.manual_seed: "Overflow when unpacking long long" at the first projector refresh
        ("galore", {"seed": 2**64}, "seed"),
        # seed * 1_000_003 exceeds 64 bits at the first subspace SVD
        ("loqt", {"seed": 10**14, "svd_method": "subspace"}, "seed"),
        # manual_seed(seed + i) overflows at the first forward with init="random"
        ("velora", {"seed": 2**64, "init": "random"}, "seed"),
    ],
)
def test_values_that_would_fail_during_training_are_rejected_by_the_config(method, kwargs, field):
    with pytest.raises(ValueError, match=field):
        METHODS[method].config_cls(**kwargs)
