"""The one table of method names.

Each method package registers itself once, at the bottom of its ``__init__.py``::

    register_method("galore", GaLoreConfig, plan_galore, "Gradient low-rank projection of optimizer states")

Everything else (``attach``, the CLI, the memory estimator, model cards, docs) looks the name up here, so a method's
name is written exactly once.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

__all__ = [
    "ENGINES",
    "METHODS",
    "MethodSpec",
    "attached_configs",
    "method_name_of",
    "register_method",
    "unregister_method",
]

# The sharding engines a method may declare it runs under (``MethodSpec.engines``); hf_memopt.shared.parallel
# detects which one a Trainer runs under. Engine key -> (what the message calls it, what it does to the optimizer's view of the parameters)
ENGINES: dict[str, tuple[str, str]] = {
    "fsdp": ("FSDP", "FSDP gives each rank a shard of rows of every parameter and gradient"),
    "zero0": (
        "DeepSpeed ZeRO-0",
        "DeepSpeed ZeRO-0 all-reduces the gradients after the whole backward, inside its own engine step",
    ),
    "zero0_lowp": (
        "DeepSpeed ZeRO-0 with fp16/bf16",
        "DeepSpeed wraps the optimizer in its own mixed-precision optimizer, which steps flat fp32 master copies",
    ),
    "zero1": ("DeepSpeed ZeRO-1", "DeepSpeed ZeRO-1 steps the optimizer on flat 1-D partitions of all parameters"),
    "zero2": ("DeepSpeed ZeRO-2", "DeepSpeed ZeRO-2 steps the optimizer on flat 1-D partitions of all parameters"),
    "zero3": (
        "DeepSpeed ZeRO-3",
        "DeepSpeed ZeRO-3 partitions the parameters themselves and steps the optimizer on flat 1-D partitions",
    ),
}


@dataclass(frozen=True)
class MethodSpec:
    """What the registry knows about a method.

    Args:
        name: the method's public name (``"galore"``, ``"blockllm"`` ...).
        config_cls: the typed dataclass that configures it.
        planner: ``planner(trainer, config) -> MethodPlan``; validates the config against the trainer and declares
            what the method needs (:class:`hf_memopt.core.plan.MethodPlan`), changing nothing: ``attach()`` applies
            the plan.
        summary: one line for ``hf-memopt methods`` and the docs.
        sets_optimizer: whether the plan supplies the optimizer. Two such methods cannot be attached to one trainer.
        engines: the sharding engines the method runs under, keys of :data:`ENGINES` (``"fsdp"``,
            ``"zero0"`` ... ``"zero3"``), or a function of the config when the method's modes differ. One process and
            DDP are not listed: the plan declares those (``MethodPlan.data_parallel``). Empty by default, so a new
            method refuses FSDP and DeepSpeed until it is shown to work there.
        engine_requirement: what the method needs that sharding takes away, for the refusal message.
        estimate: ``estimate(model, config, trace) -> hf_memopt.shared.estimate.MemoryEstimate``, the method's memory
            for ``hf_memopt.tools.estimate`` (the estimator and ``hf-memopt estimate``), from a model on the ``meta``
            device; ``None``: the estimator does not offer the method.
    """

    name: str
    config_cls: type
    planner: Callable[[Any, Any], Any]
    summary: str
    sets_optimizer: bool = True
    engines: frozenset[str] | Callable[[Any], frozenset[str]] = frozenset()
    engine_requirement: str = ""
    estimate: Callable[[Any, Any, Callable[[Any], int]], Any] | None = None


# the packages that register hf_memopt's own methods; reading METHODS imports them
BUILTIN_METHOD_PACKAGES = (
    "hf_memopt.blockllm",
    "hf_memopt.galore",
    "hf_memopt.loqt",
    "hf_memopt.velora",
    "hf_memopt.zo",
)


class _Registry(Mapping[str, MethodSpec]):
    """The read-only view of the registered methods. The first read imports :data:`BUILTIN_METHOD_PACKAGES` (which
    register themselves), so ``import hf_memopt`` loads no method, and so no torch, until one is looked up."""

    def __init__(self) -> None:
        self._specs: dict[str, MethodSpec] = {}
        self._state = "unloaded"  # -> "loading" -> "loaded"

    def _load(self) -> None:
        if self._state != "unloaded":
            return
        self._state = "loading"
        try:
            for package in BUILTIN_METHOD_PACKAGES:
                importlib.import_module(package)
        except BaseException:
            self._state = "unloaded"
            raise
        self._state = "loaded"

    def __getitem__(self, name: str) -> MethodSpec:
        self._load()
        return self._specs[name]

    def __iter__(self) -> Iterator[str]:
        self._load()
        return iter(self._specs)

    def __len__(self) -> int:
        self._load()
        return len(self._specs)

    def __repr__(self) -> str:
        self._load()
        return f"METHODS({self._specs!r})"


METHODS = _Registry()


def register_method(
    name: str,
    config_cls: type,
    planner: Callable[[Any, Any], Any],
    summary: str,
    *,
    sets_optimizer: bool = True,
    engines: frozenset[str] | Callable[[Any], frozenset[str]] = frozenset(),
    engine_requirement: str = "",
    estimate: Callable[[Any, Any, Callable[[Any], int]], Any] | None = None,
) -> MethodSpec:
    """Add a method to :data:`METHODS`; a name or config class may be registered only once."""
    specs = METHODS._specs  # not the public view: reading that would import the packages registering now
    if name in specs:
        raise ValueError(f"method {name!r} is already registered")
    for spec in specs.values():
        if spec.config_cls is config_cls:
            raise ValueError(f"{config_cls.__name__} is already registered as {spec.name!r}")
    unknown = set() if callable(engines) else set(engines) - set(ENGINES)
    if unknown:
        raise ValueError(f"engines: unknown engine(s) {sorted(unknown)} for {name!r}; known: {sorted(ENGINES)}")
    if estimate is not None and not callable(estimate):
        raise ValueError(f"estimate: must be a function estimate(model, config, trace) or None for {name!r}")
    spec = MethodSpec(name, config_cls, planner, summary, sets_optimizer, engines, engine_requirement, estimate)
    specs[name] = spec
    return spec


def unregister_method(name: str) -> MethodSpec:
    """Remove a method from :data:`METHODS` and return its spec: for a method registered for a while only (a test, a
    notebook cell). Trainers it is attached to keep it; ``register_method`` may reuse the name afterwards."""
    METHODS._load()  # a builtin name removed before the first read would come back when the packages load
    try:
        return METHODS._specs.pop(name)
    except KeyError:
        raise KeyError(f"no method {name!r} is registered; registered: {sorted(METHODS._specs)}") from None


def method_name_of(config: Any) -> str:
    """The registered name of a config instance (raises ``TypeError`` for an unregistered type)."""
    for spec in METHODS.values():
        if type(config) is spec.config_cls:
            return spec.name
    known = ", ".join(f"{s.config_cls.__name__} ({s.name})" for s in METHODS.values())
    raise TypeError(f"{type(config).__name__} is not a registered hf_memopt config; known configs: {known}")


_ATTACHED = "hf_memopt_configs"


def attached_configs(trainer: Any) -> list[Any]:
    """The configs ``attach()`` installed on ``trainer`` so far, in attachment order (the model card reads this)."""
    return trainer.__dict__.setdefault(_ATTACHED, [])
