"""Reroute transformers' stock ``optim="galore_*"`` names to hf_memopt's GaLore (done once, at ``import hf_memopt``).

transformers 5.x dispatches ``TrainingArguments.optim`` through the dict ``trainer_optimizer._OPTIMIZER_HANDLERS``;
its GaLore handlers import ``galore_torch`` and pass only ``lr`` on. This is the one place that touches a private
name of transformers, so it checks the version and the shape of what it patches and fails loudly if they change.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from hf_memopt.galore.builder import check_layerwise_supported, create_galore_optimizer
from hf_memopt.galore.config import GaLoreConfig
from hf_memopt.integration import OptimizerHyperparameters, _ModelOptimizerFactory, no_decay_parameter_names

__all__ = ["STOCK_GALORE_NAMES", "config_from_optim_args", "reroute_stock_galore_names"]

# stock name -> (GaLoreConfig.optimizer, layerwise)
STOCK_GALORE_NAMES: dict[str, tuple[str, bool]] = {
    "galore_adamw": ("adamw", False),
    "galore_adamw_8bit": ("adamw_8bit", False),
    "galore_adafactor": ("adafactor", False),
    "galore_adamw_layerwise": ("adamw", True),
    "galore_adamw_8bit_layerwise": ("adamw_8bit", True),
    "galore_adafactor_layerwise": ("adafactor", True),
}
_SUPPORTED_MAJOR = 5
_FROM_OPTIM_ARGS = ("rank", "update_proj_gap", "scale", "proj_type", "svd_method", "svd_iterations", "seed")


def config_from_optim_args(optim_args: dict[str, str], **fields: Any) -> GaLoreConfig:
    """A ``GaLoreConfig`` from ``TrainingArguments.optim_args`` strings (``"rank=128,scale=0.25"``), typed."""
    defaults = {f.name: f.default for f in dataclasses.fields(GaLoreConfig)}
    for key, text in optim_args.items():
        if key not in _FROM_OPTIM_ARGS:
            raise ValueError(f"optim_args key {key!r} is not a GaLore option; allowed keys: {', '.join(_FROM_OPTIM_ARGS)}")
        kind = type(defaults[key])
        try:
            fields[key] = kind(text) if kind is not int else int(text, 10)
        except ValueError:
            raise ValueError(f"optim_args {key}={text!r} must be of type {kind.__name__}") from None
    return GaLoreConfig(**fields)


def _galore_handler(ctx: Any) -> tuple[Any, dict[str, Any]]:
    """transformers optimizer handler for the six stock GaLore names."""
    args = ctx.args
    optimizer, layerwise = STOCK_GALORE_NAMES[str(getattr(args.optim, "value", args.optim))]
    if args.optim_target_modules is None:
        raise ValueError(f"optim={args.optim.value!r} needs optim_target_modules (names, a regex, or 'all-linear')")
    config = config_from_optim_args(
        ctx.optim_args, target_modules=args.optim_target_modules, optimizer=optimizer, layerwise=layerwise
    )
    if layerwise:
        check_layerwise_supported(args)
    hparams = OptimizerHyperparameters.from_args(args)

    def build(model: Any) -> Any:
        return create_galore_optimizer(model, config, hparams, no_decay_names=no_decay_parameter_names(model))

    return _ModelOptimizerFactory(build), {}


def reroute_stock_galore_names() -> None:
    """Point the stock GaLore ``optim`` names at hf_memopt; raise ``ImportError`` if transformers changed shape."""
    import transformers
    from transformers import trainer as trainer_module
    from transformers import trainer_optimizer
    from transformers.training_args import OptimizerNames

    version = transformers.__version__
    handlers = getattr(trainer_optimizer, "_OPTIMIZER_HANDLERS", None)
    try:
        names = [OptimizerNames(name) for name in STOCK_GALORE_NAMES]
    except ValueError:
        names = []
    if (
        int(version.split(".")[0]) != _SUPPORTED_MAJOR
        or not isinstance(handlers, dict)
        or getattr(trainer_module, "_OPTIMIZER_HANDLERS", None) is not handlers
        or len(names) != len(STOCK_GALORE_NAMES)
        or any(name not in handlers for name in names)
    ):
        raise ImportError(
            f"hf_memopt reroutes optim='galore_*' through transformers.trainer_optimizer._OPTIMIZER_HANDLERS, "
            f"which transformers {version} does not provide as expected (hf_memopt supports transformers "
            f"{_SUPPORTED_MAJOR}.x). Install transformers>={_SUPPORTED_MAJOR},<{_SUPPORTED_MAJOR + 1}, or use "
            f"hf_memopt.attach(trainer, GaLoreConfig(...)), which needs no rerouting"
        )
    for name in names:
        handlers[name] = _galore_handler
