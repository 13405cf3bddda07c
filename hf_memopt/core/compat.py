"""Names of other libraries that are not part of their documented API, reached in one place.

Each accessor checks the library version against the range hf_memopt was tested with and the shape of what it
reads, and returns ``None`` with the reason instead of raising, so a changed library degrades one feature (with one
logged warning, decided by the caller) rather than ``import hf_memopt``. ``tests/test_stock_optim.py`` pins every
accessor against the installed versions, so an upgrade that changes one fails loudly there.

transformers (tested range ``TRANSFORMERS_TESTED``):

* ``transformers.trainer_optimizer._OPTIMIZER_HANDLERS``: the dict through which ``Trainer`` turns
  ``TrainingArguments.optim`` into an optimizer (``Trainer.get_optimizer_cls_and_kwargs`` looks the name up in the
  same dict object, imported into ``transformers.trainer``). Rerouting the stock ``galore_*`` names means replacing
  six of its entries.
* ``transformers.trainer_utils.check_target_module_exists``: the rule by which the stock ``optim_target_modules``
  selects modules. It has no leading underscore but is not documented; the stock path calls it rather than copying
  it, so the selection is transformers' own.
* ``Trainer.get_decay_parameter_names`` called without a ``Trainer`` (``self=None``): the stock path has no trainer
  instance, and the method reads no instance state in the tested versions; it decides which parameters (biases,
  normalisation weights) get no weight decay.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any

from packaging.version import Version

__all__ = [
    "STOCK_GALORE_NAMES",
    "TRANSFORMERS_TESTED",
    "decay_rule",
    "optimizer_handlers",
    "reroute_stock_galore_names",
    "target_module_rule",
]

# transformers' stock GaLore ``optim`` names -> (GaLoreConfig.optimizer, layerwise)
STOCK_GALORE_NAMES: dict[str, tuple[str, bool]] = {
    "galore_adamw": ("adamw", False),
    "galore_adamw_8bit": ("adamw_8bit", False),
    "galore_adafactor": ("adafactor", False),
    "galore_adamw_layerwise": ("adamw", True),
    "galore_adamw_8bit_layerwise": ("adamw_8bit", True),
    "galore_adafactor_layerwise": ("adafactor", True),
}
_warned_not_rerouted = False

# [lowest, first untested) version of transformers whose private names below were checked
TRANSFORMERS_TESTED = (Version("5.0.0"), Version("6.0.0"))


def _transformers_version_problem() -> str | None:
    import transformers

    version = Version(transformers.__version__)
    low, high = TRANSFORMERS_TESTED
    if not low <= Version(version.base_version) < high:
        return f"transformers {transformers.__version__} is outside the tested range [{low}, {high})"
    return None


def optimizer_handlers(names: Iterable[str]) -> tuple[dict[Any, Any] | None, str]:
    """transformers' ``optim`` name -> handler table, if it has the tested shape and holds every one of ``names``.

    Returns ``(table, "")``, or ``(None, reason)`` when the version is untested, the table is missing or not a dict,
    ``transformers.trainer`` looks names up in another object, or a name is not an ``OptimizerNames`` member in it.
    """
    problem = _transformers_version_problem()
    if problem:
        return None, problem
    from transformers import trainer as trainer_module
    from transformers import trainer_optimizer
    from transformers.training_args import OptimizerNames

    table = getattr(trainer_optimizer, "_OPTIMIZER_HANDLERS", None)
    if not isinstance(table, dict):
        return None, "transformers.trainer_optimizer._OPTIMIZER_HANDLERS is missing or not a dict"
    if getattr(trainer_module, "_OPTIMIZER_HANDLERS", None) is not table:
        return None, "transformers.trainer no longer looks optim names up in trainer_optimizer._OPTIMIZER_HANDLERS"
    for name in names:
        try:
            member = OptimizerNames(name)
        except ValueError:
            return None, f"{name!r} is no longer a transformers OptimizerNames value"
        if member not in table:
            return None, f"{name!r} has no entry in transformers.trainer_optimizer._OPTIMIZER_HANDLERS"
    return table, ""


def target_module_rule() -> tuple[Callable[..., Any] | None, str]:
    """``transformers.trainer_utils.check_target_module_exists(targets, name, return_is_regex=True)``, checked.

    Returns ``(function, "")`` or ``(None, reason)``. The function returns ``(matched, is_regex)``: a list entry
    matches a full module name by equality, as a substring, or as a full-match regex; a single string as a
    full-match regex.
    """
    problem = _transformers_version_problem()
    if problem:
        return None, problem
    from transformers import trainer_utils

    rule = getattr(trainer_utils, "check_target_module_exists", None)
    if not callable(rule):
        return None, "transformers.trainer_utils.check_target_module_exists is missing"
    try:
        if rule(["attn"], "h.0.attn.q", return_is_regex=True) != (True, False):
            return None, "transformers.trainer_utils.check_target_module_exists changed behaviour"
    except TypeError:
        return None, "transformers.trainer_utils.check_target_module_exists changed signature"
    return rule, ""


def decay_rule() -> tuple[Callable[[Any], list[str]] | None, str]:
    """``model -> names of the parameters that get weight decay``, by the Trainer's rule, without a Trainer.

    Returns ``(function, "")`` or ``(None, reason)``; checked on a Linear + LayerNorm probe (only the Linear weight
    decays).
    """
    problem = _transformers_version_problem()
    if problem:
        return None, problem
    from torch import nn
    from transformers import Trainer

    def rule(model: Any) -> list[str]:
        return list(Trainer.get_decay_parameter_names(None, model))

    try:
        decayed = rule(nn.Sequential(nn.Linear(2, 2), nn.LayerNorm(2)))
    except (AttributeError, TypeError) as err:
        return None, f"Trainer.get_decay_parameter_names needs a Trainer instance now ({err})"
    if decayed != ["0.weight"]:
        return None, f"Trainer.get_decay_parameter_names changed behaviour (probe gave {decayed})"
    return rule, ""


def reroute_stock_galore_names(handler: Callable[[Any], Any]) -> bool:
    """Point the six stock GaLore names of transformers' handler table at ``handler``; returns whether it did.

    When the table, the target rule or the decay rule the handler relies on is missing or changed, the names are
    left to transformers and one warning (the first time only, in this process) says so.
    """
    global _warned_not_rerouted
    table, reason = optimizer_handlers(STOCK_GALORE_NAMES)
    for accessor in (target_module_rule, decay_rule):
        reason = reason or accessor()[1]
    if table is None or reason:
        if not _warned_not_rerouted:
            _warned_not_rerouted = True
            logging.getLogger("hf_memopt.galore.stock").warning(
                "hf_memopt: TrainingArguments(optim='galore_*') is NOT rerouted to hf_memopt (%s); those names use "
                "transformers' own GaLore handler. hf_memopt.attach(trainer, GaLoreConfig(...)) works as usual",
                reason,
            )
        return False
    from transformers.training_args import OptimizerNames

    for name in STOCK_GALORE_NAMES:
        table[OptimizerNames(name)] = handler
    return True
