"""Field checks shared by every config's ``__post_init__``: each raises ``ValueError`` naming the field and range."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

__all__ = ["check_bool", "check_choice", "check_float", "check_int"]


def check_int(field: str, value: Any, low: int | None = None, high: int | None = None) -> int:
    """``value`` as an int in ``[low, high]`` (either bound optional)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{field} must be an integer{_range(low, high)}; got {value!r}")
    if (low is not None and value < low) or (high is not None and value > high):
        raise ValueError(f"{field} must be an integer{_range(low, high)}; got {value!r}")
    return value


def check_float(
    field: str,
    value: Any,
    low: float | None = None,
    high: float | None = None,
    *,
    low_inclusive: bool = True,
    high_inclusive: bool = True,
) -> float:
    """``value`` as a finite float within the given bounds."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok and low is not None:
        ok = value >= low if low_inclusive else value > low
    if ok and high is not None:
        ok = value <= high if high_inclusive else value < high
    if not ok:
        lo = "" if low is None else f"{'[' if low_inclusive else '('}{low}"
        hi = "" if high is None else f"{high}{']' if high_inclusive else ')'}"
        bounds = f" in {lo or '(-inf'}, {hi or 'inf)'}" if (low is not None or high is not None) else ""
        raise ValueError(f"{field} must be a finite number{bounds}; got {value!r}")
    return float(value)


def check_choice(field: str, value: Any, choices: Sequence[Any]) -> Any:
    if value not in choices:
        raise ValueError(f"{field} must be one of {tuple(choices)}; got {value!r}")
    return value


def check_bool(field: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{field} must be True or False; got {value!r}")
    return value


def _range(low: int | None, high: int | None) -> str:
    if low is not None and high is not None:
        return f" in [{low}, {high}]"
    if low is not None:
        return f" >= {low}"
    if high is not None:
        return f" <= {high}"
    return ""
