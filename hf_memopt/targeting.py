"""Which modules a method targets.

``target_modules`` follows the conventions of peft and of ``TrainingArguments.optim_target_modules``:

* a list of names: a module matches when its qualified name equals an entry or ends with ``"." + entry``
  (``"q_proj"`` matches ``model.layers.0.self_attn.q_proj``); every entry must match at least one module;
* a single string: a regular expression that must match the whole qualified name;
* ``"all-linear"``: every ``nn.Linear`` (the output head included; exclude it with a regex if wanted).

Unlike transformers, a pattern that matches nothing is an error, never a silent no-op.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from torch import nn

__all__ = ["ALL_LINEAR", "match_target_modules", "validate_target_modules"]

ALL_LINEAR = "all-linear"


def validate_target_modules(value: object, field: str = "target_modules") -> str | list[str]:
    """Check the type of a ``target_modules`` value and return it as ``str`` or ``list[str]``."""
    if isinstance(value, str):
        if not value:
            raise ValueError(f"{field} must not be empty")
        if value.replace("_", "-") != ALL_LINEAR:
            try:
                re.compile(value)
            except re.error as err:
                raise ValueError(f"{field}={value!r} is not a valid regular expression: {err}") from None
        return value
    if isinstance(value, Sequence) and value and all(isinstance(v, str) and v for v in value):
        return list(value)
    raise ValueError(
        f"{field} must be a non-empty list of module names, a regular expression, or {ALL_LINEAR!r}; got {value!r}"
    )


def _name_matches(name: str, key: str) -> bool:
    return name == key or name.endswith("." + key)


def match_target_modules(
    model: nn.Module,
    target_modules: str | Sequence[str],
    *,
    allowed_types: tuple[type[nn.Module], ...] = (nn.Linear,),
    field: str = "target_modules",
) -> dict[str, nn.Module]:
    """Return ``{qualified name: module}`` for the targeted modules, in ``named_modules`` order.

    Raises ``ValueError`` naming ``field`` when nothing matches, when a listed name matches nothing, or when a listed
    name matches a module that is not one of ``allowed_types`` (a regex silently skips other types, as it is expected
    to match containers too).
    """
    target_modules = validate_target_modules(target_modules, field)
    allowed_names = ", ".join(t.__name__ for t in allowed_types)
    found: dict[str, nn.Module] = {}
    if isinstance(target_modules, str):
        if target_modules.replace("_", "-") == ALL_LINEAR:
            found = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
        else:
            pattern = re.compile(target_modules)
            found = {
                n: m for n, m in model.named_modules() if pattern.fullmatch(n) and isinstance(m, allowed_types)
            }
        if not found:
            raise ValueError(f"{field}={target_modules!r} matches no {allowed_names} layer of {type(model).__name__}")
        return found

    for key in target_modules:
        hits = [(n, m) for n, m in model.named_modules() if n and _name_matches(n, key)]
        if not hits:
            raise ValueError(
                f"{field} entry {key!r} matches no module of {type(model).__name__}; "
                f"leaf names look like {_example_leaf_names(model)}"
            )
        wrong = [n for n, m in hits if not isinstance(m, allowed_types)]
        if wrong:
            raise ValueError(
                f"{field} entry {key!r} matches {wrong[0]!r} of type {type(dict(hits)[wrong[0]]).__name__}; "
                f"only {allowed_names} layers can be targeted"
            )
        found.update(hits)
    return {n: m for n, m in model.named_modules() if n in found}


def _example_leaf_names(model: nn.Module, limit: int = 8) -> list[str]:
    names: list[str] = []
    for name, module in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if isinstance(module, (nn.Linear, nn.Embedding)) and leaf not in names and not leaf.isdigit():
            names.append(leaf)
        if len(names) == limit:
            break
    return names
