"""Reroute transformers' stock ``optim="galore_*"`` names to hf_memopt's GaLore (done once, at ``import hf_memopt``).

transformers dispatches ``TrainingArguments.optim`` through a private handler table (see :mod:`hf_memopt.core.compat`);
its GaLore handlers import ``galore_torch`` and pass only ``lr`` on. The rerouted handler keeps what the stock names
promise a user of galore-torch:

* the targets are exactly the ``nn.Linear`` layers transformers' own rule selects from ``optim_target_modules``
  (``check_target_module_exists``: a list entry matches a full module name by equality, as a substring or as a
  full-match regex; a single string is a full-match regex; ``"all-linear"`` is every ``nn.Linear``, the output
  head included); matched modules of other types are ignored, as there;
* ``optim_args`` ``rank``, ``update_proj_gap``, ``scale``, ``proj_type`` with galore-torch's defaults, the exact SVD
  refresh (``svd_method="exact"``), and a rank above a layer's smaller side capped at it (logged once);

and adds what hf_memopt's optimizers do themselves: all ``TrainingArguments`` optimizer settings, non-finite updates
skipped, exact layer-wise mode. What needs the ``Trainer`` object (callbacks, the model card) cannot be installed from
a handler, which receives only the arguments and the model; ``docs/methods/galore.md`` lists the differences.

If the private table is missing or changed, the stock names are left to transformers (one warning says so) and
``attach()`` is unaffected.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

from torch import nn

from hf_memopt.core import compat
from hf_memopt.core.attach import check_data_parallel, warn_ignored_fp16
from hf_memopt.core.compat import STOCK_GALORE_NAMES, decay_rule, target_module_rule
from hf_memopt.core.plan import OptimizerHyperparameters
from hf_memopt.core.trainer_hooks import ModelOptimizerFactory
from hf_memopt.galore.builder import create_galore_optimizer, galore_plan
from hf_memopt.galore.config import GaLoreConfig
from hf_memopt.shared.targeting import ALL_LINEAR

__all__ = ["STOCK_GALORE_NAMES", "config_from_optim_args", "reroute_stock_galore_names", "stock_target_parameters"]

logger = logging.getLogger(__name__)

# what the stock names gave with galore-torch: its exact SVD refresh (attach() defaults to the subspace refresh)
STOCK_SVD_METHOD = "exact"
_FROM_OPTIM_ARGS = (
    "rank",
    "update_proj_gap",
    "scale",
    "proj_type",
    "svd_method",
    "svd_iterations",
    "seed",
    "max_consecutive_skips",
)


def config_from_optim_args(optim_args: dict[str, str], **fields: Any) -> GaLoreConfig:
    """A ``GaLoreConfig`` from ``TrainingArguments.optim_args`` strings (``"rank=128,scale=0.25"``), typed.

    ``fields`` are defaults that ``optim_args`` may override.
    """
    defaults = {f.name: f.default for f in dataclasses.fields(GaLoreConfig)}
    for key, text in optim_args.items():
        if key not in _FROM_OPTIM_ARGS:
            raise ValueError(
                f"optim_args key {key!r} is not a GaLore option; allowed keys: {', '.join(_FROM_OPTIM_ARGS)}"
            )
        kind = type(defaults[key])
        try:
            fields[key] = kind(text) if kind is not int else int(text, 10)
        except ValueError:
            raise ValueError(f"optim_args {key}={text!r} must be of type {kind.__name__}") from None
    return GaLoreConfig(**fields)


def stock_target_parameters(model: nn.Module, target_modules: str | list[str], optim: str) -> dict[str, nn.Parameter]:
    """``{name: weight}`` of the trainable ``nn.Linear`` weights transformers' rule selects for ``optim=`` GaLore.

    Mirrors transformers' low-rank optimizer setup: every module name is tested with
    ``check_target_module_exists``; non-Linear modules are skipped (named in one log line when a non-regex entry
    matched them); a weight shared with an earlier parameter (a tied output head) is not projected, since only its
    first name appears in ``named_parameters()``. Raises ``ValueError`` when nothing is selected.
    """
    rule, reason = target_module_rule()
    if rule is None:
        raise RuntimeError(f"optim={optim!r}: cannot apply transformers' optim_target_modules rule: {reason}")
    all_linear = isinstance(target_modules, str) and target_modules.replace("_", "-") == ALL_LINEAR
    selected: set[str] = set()
    ignored: list[str] = []
    for name, module in model.named_modules():
        matched, is_regex = rule(target_modules, name, return_is_regex=True)
        if not isinstance(module, nn.Linear):
            if matched and not is_regex:
                ignored.append(name)
            continue
        if matched or all_linear:
            selected.add(f"{name}.weight")
    if ignored:
        logger.warning(
            "optim=%s: only nn.Linear layers are projected; matched but ignored: %s", optim, ", ".join(ignored)
        )
    targets = {n: p for n, p in model.named_parameters() if n in selected and p.requires_grad}
    if not targets:
        raise ValueError(
            f"optim={optim!r}: optim_target_modules={target_modules!r} selects no trainable nn.Linear layer of "
            f"{type(model).__name__} (transformers' rule: a list entry matches a full module name exactly, as a "
            "substring or as a full-match regex; a single string is a full-match regex)"
        )
    return targets


def _no_decay_names(model: nn.Module) -> set[str]:
    """Biases and normalisation weights, by the Trainer's rule (through :func:`hf_memopt.core.compat.decay_rule`)."""
    rule, reason = decay_rule()
    if rule is None:
        raise RuntimeError(f"cannot apply the Trainer's weight-decay rule without a Trainer: {reason}")
    return {n for n, _ in model.named_parameters()} - set(rule(model))


def _galore_handler(ctx: Any) -> tuple[Any, dict[str, Any]]:
    """transformers optimizer handler for the six stock GaLore names."""
    args = ctx.args
    optim = str(getattr(args.optim, "value", args.optim))
    optimizer, layerwise = STOCK_GALORE_NAMES[optim]
    if args.optim_target_modules is None:
        raise ValueError(f"optim={optim!r} needs optim_target_modules (names, a regex, or 'all-linear')")
    if ctx.model is None:
        raise ValueError(f"optim={optim!r} needs the model to select the optim_target_modules layers")
    warn_ignored_fp16(args)
    config = config_from_optim_args(
        ctx.optim_args,
        target_modules=args.optim_target_modules,
        optimizer=optimizer,
        layerwise=layerwise,
        svd_method=STOCK_SVD_METHOD,
    )
    # attach()'s refusals, from the same plan; a handler cannot keep the model out of DDP (it has no Trainer) and
    # cannot install the plan's grad_norm callback
    plan = galore_plan(config, args, lambda: None)
    check_data_parallel(
        args,
        [("galore", plan)],
        cannot_keep_out_of_ddp=f"optim={optim!r} cannot run under distributed training: the Trainer wraps the model in "
        "DDP, whose gradients are not yet averaged when the layer-wise hooks fire. Use "
        "hf_memopt.attach(trainer, GaLoreConfig(layerwise=True, ...)), which handles DDP",
    )
    hparams = OptimizerHyperparameters.from_args(args)
    selected = stock_target_parameters(ctx.model, config.target_modules, optim)  # fails now, as the stock handler

    def build(model: nn.Module) -> Any:
        targets = selected if model is ctx.model else stock_target_parameters(model, config.target_modules, optim)
        return create_galore_optimizer(model, config, hparams, no_decay_names=_no_decay_names(model), targets=targets)

    return ModelOptimizerFactory(build), {}


def reroute_stock_galore_names() -> bool:
    """Point the stock GaLore ``optim`` names at hf_memopt; returns whether they were rerouted.

    When transformers' private table, its target rule or its decay rule is missing or changed, the names are left to
    transformers and one warning (the first time only) says so; ``attach()`` depends on none of them.
    """
    return compat.reroute_stock_galore_names(_galore_handler)
