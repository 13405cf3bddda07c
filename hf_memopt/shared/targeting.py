"""Which modules a method targets.

``target_modules`` follows the conventions of peft and of ``TrainingArguments.optim_target_modules``:

* a list of names: a module matches when its qualified name equals an entry or ends with ``"." + entry``
  (``"q_proj"`` matches ``model.layers.0.self_attn.q_proj``); every entry must match at least one module;
* a single string: a regular expression that must match the whole qualified name;
* ``"all-linear"``: every ``nn.Linear`` (and GPT-2 ``Conv1D`` where the method accepts it) except the output layer,
  with peft's rule (``peft.tuners.tuners_utils._maybe_include_all_linear_layers``): the output embedding
  (``get_output_embeddings()``, e.g. ``lm_head``) and the task head of a classification model (the module named
  ``classifier`` or ``score``, peft's ``SEQ_CLS_HEAD_NAMES``; ``classification_head`` of BART / T5;
  ``sequence_summary`` and ``logits_proj`` of XLNet; ``qa_outputs``) are left out, every Linear inside them included
  (RoBERTa's ``classifier`` and BART's ``classification_head`` hold two). These heads map the hidden size to the vocabulary or to a few
  labels: a rank-r projection of a 2 x hidden head is meaningless, and the papers leave the output layer dense.
  Name a head explicitly to target it.

On a peft model (``get_peft_model``) the trainable layers are the adapters, so a wrapper stands for them:

* a name or regex that matches a LoRA layer (``lora.Linear`` ...) targets its adapters ``lora_A`` / ``lora_B``;
  one that matches a ``modules_to_save`` wrapper targets the trainable copy ``modules_to_save.<adapter>``;
* the frozen originals inside the wrappers (``base_layer``, ``original_module``) are never targeted;
* ``"all-linear"`` is the same rule as above applied to what remains, so the adapters, not the head copy.

Unlike transformers, a pattern that matches nothing is an error, never a silent no-op.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Sequence

from torch import nn
from transformers import PreTrainedModel
from transformers.pytorch_utils import Conv1D

__all__ = [
    "ALL_LINEAR",
    "HEAD_NAMES",
    "head_module_names",
    "match_target_modules",
    "peft_wrappers",
    "refuse_peft_model",
    "validate_target_modules",
]

ALL_LINEAR = "all-linear"
# peft's SEQ_CLS_HEAD_NAMES (peft/utils/constants.py), the sequence-classification heads of the encoder-decoder and
# XLNet families (which peft's list misses), and the span head of question-answering models.
HEAD_NAMES = ("score", "classifier", "classification_head", "sequence_summary", "logits_proj", "qa_outputs")
_LINEAR_TYPES = (nn.Linear, Conv1D)


def validate_target_modules(value: object, field: str = "target_modules") -> str | list[str]:
    """Check the type of a ``target_modules`` value and return it as ``str`` or ``list[str]``."""
    if isinstance(value, str):
        if not value:
            raise ValueError(f"{field} must not be empty")
        if not _is_all_linear(value):
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


def _is_all_linear(value: object) -> bool:
    return isinstance(value, str) and value.lower().replace("_", "-") == ALL_LINEAR


def _name_matches(name: str, key: str) -> bool:
    return name == key or name.endswith("." + key)


def _under(name: str, prefixes: Sequence[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def peft_wrappers(model: nn.Module) -> dict[str, nn.Module]:
    """``{name: wrapper}`` for peft's layers in ``model``: tuner layers (``lora.Linear`` ...) and the
    ``modules_to_save`` / trainable-token wrappers. Empty when peft was never imported (then no model holds one)."""
    if "peft" not in sys.modules:
        return {}
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils.other import AuxiliaryTrainingWrapper

    return {n: m for n, m in model.named_modules() if isinstance(m, (BaseTunerLayer, AuxiliaryTrainingWrapper))}


def _adapter_prefixes(name: str, wrapper: nn.Module) -> list[str]:
    """Where a peft wrapper keeps its trainable layers: its ``adapter_layer_names`` (``lora_A``, ``lora_B`` ...;
    ``modules_to_save``), as qualified names."""
    return [f"{name}.{a}" for a in wrapper.adapter_layer_names]


def _candidates(model: nn.Module, wrappers: dict[str, nn.Module]) -> dict[str, nn.Module]:
    """``named_modules`` without the frozen originals kept inside peft's wrappers (``base_layer``,
    ``original_module``): the optimizer never trains them, the adapters stand for them."""
    frozen: set[str] = set()
    for name, wrapper in wrappers.items():
        keep = _adapter_prefixes(name, wrapper)
        frozen.update(f"{name}.{s}" for s, _ in wrapper.named_modules() if s and not _under(f"{name}.{s}", keep))
    return {n: m for n, m in model.named_modules() if n and n not in frozen}


def head_module_names(model: nn.Module) -> list[str]:
    """Qualified names of the output layers ``"all-linear"`` leaves out: the output embedding and the task head.

    They are looked up on the outermost ``PreTrainedModel`` inside ``model`` (so a peft model's base model is used),
    or on ``model`` itself when it is none.
    """
    base = next((m for m in model.modules() if isinstance(m, PreTrainedModel)), model)
    heads: list[object] = []
    if hasattr(base, "get_output_embeddings"):
        try:
            heads.append(base.get_output_embeddings())
        except NotImplementedError:
            pass
    heads += [getattr(base, name, None) for name in HEAD_NAMES]
    ids = {id(h) for h in heads if isinstance(h, nn.Module)}
    return [n for n, m in model.named_modules() if id(m) in ids]


def _expand(
    name: str,
    module: nn.Module,
    wrappers: dict[str, nn.Module],
    candidates: dict[str, nn.Module],
    allowed_types: tuple[type[nn.Module], ...],
) -> dict[str, nn.Module]:
    """A peft wrapper stands for its adapter layers of ``allowed_types``; any other module for itself."""
    if name not in wrappers:
        return {name: module}
    keep = _adapter_prefixes(name, module)
    return {n: m for n, m in candidates.items() if _under(n, keep) and isinstance(m, allowed_types)}


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
    to match containers too); the message says what to write instead.
    """
    target_modules = validate_target_modules(target_modules, field)
    allowed_names = ", ".join(t.__name__ for t in allowed_types)
    wrappers = peft_wrappers(model)
    candidates = _candidates(model, wrappers)
    found: dict[str, nn.Module] = {}
    if isinstance(target_modules, str):
        if _is_all_linear(target_modules):
            linear = tuple(t for t in _LINEAR_TYPES if issubclass(t, allowed_types))
            heads = head_module_names(model)
            found = {n: m for n, m in candidates.items() if isinstance(m, linear) and not _under(n, heads)}
        else:
            pattern = re.compile(target_modules)
            for name, module in candidates.items():
                if pattern.fullmatch(name) and (name in wrappers or isinstance(module, allowed_types)):
                    found.update(_expand(name, module, wrappers, candidates, allowed_types))
        if not found:
            raise ValueError(f"{field}={target_modules!r} matches no {allowed_names} layer of {type(model).__name__}")
        return {n: m for n, m in candidates.items() if n in found}

    for key in target_modules:
        hits = [(n, m) for n, m in candidates.items() if _name_matches(n, key)]
        if not hits:
            raise ValueError(
                f"{field} entry {key!r} matches no module of {type(model).__name__}; "
                f"names look like {_example_names(model, candidates, wrappers)}"
            )
        for name, module in hits:
            expanded = _expand(name, module, wrappers, candidates, allowed_types)
            if name in wrappers and not expanded:
                raise ValueError(
                    f"{field} entry {key!r} matches {name!r}, a peft {type(module).__name__} whose adapters "
                    f"({', '.join(module.adapter_layer_names)}) hold no {allowed_names} layer; leave it out"
                )
            if name not in wrappers and not isinstance(module, allowed_types):
                raise ValueError(_wrong_type_message(field, key, name, module, candidates, wrappers, allowed_types))
            found.update(expanded)
    return {n: m for n, m in candidates.items() if n in found}


def _wrong_type_message(
    field: str,
    key: str,
    name: str,
    module: nn.Module,
    candidates: dict[str, nn.Module],
    wrappers: dict[str, nn.Module],
    allowed_types: tuple[type[nn.Module], ...],
) -> str:
    """Why a listed name cannot be targeted, and what to write instead."""
    inner = [n for n, m in candidates.items() if n.startswith(name + ".") and isinstance(m, allowed_types)]
    allowed_names = ", ".join(t.__name__ for t in allowed_types)
    message = (
        f"{field} entry {key!r} matches {name!r} of type {type(module).__name__}; only {allowed_names} layers can be "
        "targeted"
    )
    owner = next((w for w in wrappers if name.startswith(w + ".")), None)
    if owner is not None:
        leaf = owner.rsplit(".", 1)[-1]
        return (
            f"{message}: it is inside peft's {type(wrappers[owner]).__name__} {owner!r}; write {leaf!r} (its adapters)"
        )
    if inner:
        leaves = sorted({n[len(name) + 1 :] for n in inner}, key=lambda s: (s.count("."), s))[:4]
        return f"{message}: name the layers inside it instead, e.g. {leaves}, or write a regex"
    return f"{message}: leave it out"


def _example_names(
    model: nn.Module, candidates: dict[str, nn.Module], wrappers: dict[str, nn.Module], limit: int = 8
) -> list[str]:
    """A few leaf names a user can write: Linear / Embedding layers and peft wrappers (not their insides)."""
    names: list[str] = []
    for name, module in candidates.items():
        leaf = name.rsplit(".", 1)[-1]
        inside = any(name.startswith(w + ".") for w in wrappers)
        if (isinstance(module, (nn.Linear, nn.Embedding)) or name in wrappers) and not inside:
            if leaf not in names and not leaf.isdigit():
                names.append(leaf)
        if len(names) == limit:
            break
    return names


def refuse_peft_model(model: nn.Module, method: str, instead: str) -> None:
    """Raise ``ValueError`` when ``model`` holds peft layers and ``method`` cannot work on top of them.

    Methods that rewrite the layers themselves (LoQT's quantized base, VeLoRA's compressed input) would act on peft's
    frozen ``base_layer`` copies or fight peft's own forward; ``instead`` says what to do.
    """
    wrappers = peft_wrappers(model)
    if wrappers:
        name, wrapper = next(iter(wrappers.items()))
        raise ValueError(
            f"{method} cannot be attached to a peft model ({name} is peft's {type(wrapper).__module__}."
            f"{type(wrapper).__name__}); {instead}"
        )
