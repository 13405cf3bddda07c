"""Build GaLore optimizers from a config: parameter groups, the optimizer, and the Trainer wiring."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

from torch import nn
from transformers import Trainer
from transformers.pytorch_utils import Conv1D

from hf_memopt.core.attach import no_decay_parameter_names, trainable_parameters
from hf_memopt.core.plan import MethodPlan, OptimizerHyperparameters
from hf_memopt.galore.config import GaLoreConfig
from hf_memopt.galore.layerwise import LayerwiseUpdates
from hf_memopt.galore.optimizer import GaLoreAdafactor, GaLoreAdamW, GaLoreAdamW8bit, _GaLoreOptimizer
from hf_memopt.shared.optim_state import unwrap_optimizer
from hf_memopt.shared.targeting import match_target_modules

__all__ = ["capped_ranks", "create_galore_optimizer", "galore_plan", "galore_target_parameters", "plan_galore"]

logger = logging.getLogger(__name__)

OPTIMIZER_CLASSES: dict[str, type[_GaLoreOptimizer]] = {
    "adamw": GaLoreAdamW,
    "adamw_8bit": GaLoreAdamW8bit,
    "adafactor": GaLoreAdafactor,
}
_TARGET_TYPES = (nn.Linear, nn.Embedding, Conv1D)


def galore_target_parameters(model: nn.Module, config: GaLoreConfig) -> dict[str, nn.Parameter]:
    """``{name: weight}`` of the trainable 2-D weights GaLore projects (``attach()``'s selection, see targeting)."""
    modules = match_target_modules(model, config.target_modules, allowed_types=_TARGET_TYPES)
    targets: dict[str, nn.Parameter] = {}
    seen: set[int] = set()
    for name, module in modules.items():
        weight = module.weight
        if not weight.requires_grad or id(weight) in seen:
            continue
        seen.add(id(weight))
        if weight.dim() != 2:
            raise ValueError(f"target_modules: {name} has a {weight.dim()}-D weight; GaLore projects 2-D weights only")
        targets[f"{name}.weight"] = weight
    if not targets:
        raise ValueError(f"target_modules={config.target_modules!r} matches no trainable weight")
    return targets


def capped_ranks(targets: Mapping[str, nn.Parameter], rank: int) -> dict[str, int]:
    """The rank each target is projected to: ``rank``, capped at the weight's smaller side.

    galore-torch does the same implicitly (``U[:, :rank]`` of a matrix with fewer columns keeps them all), so a rank
    tuned for a large model runs unchanged on a small one; a capped weight is projected onto its whole column/row
    space (no memory saved on it). The capped weights are logged in one line, so the cap is never silent.
    """
    ranks = {name: min(rank, *p.shape) for name, p in targets.items()}
    capped = [f"{name} {tuple(targets[name].shape)}" for name, r in ranks.items() if r < rank]
    if capped:
        logger.warning(
            "GaLore rank=%d exceeds the smaller side of %d weight(s); each is projected at that side's size: %s",
            rank, len(capped), ", ".join(capped),
        )  # fmt: skip
    return ranks


def create_galore_optimizer(
    model: nn.Module,
    config: GaLoreConfig,
    hparams: OptimizerHyperparameters,
    *,
    no_decay_names: set[str] | None = None,
    is_accumulation_boundary: Callable[[], bool] | None = None,
    targets: Mapping[str, nn.Parameter] | None = None,
) -> _GaLoreOptimizer:
    """The GaLore optimizer for ``model``: projected groups for the targets, the same base rule for the rest.

    ``targets`` (``{name: weight}``) are the weights to project; by default :func:`galore_target_parameters` selects
    them from ``config.target_modules`` (the stock ``optim=`` path passes transformers' own selection). A rank above
    a weight's smaller side is capped there (:func:`capped_ranks`), so projected weights are grouped by rank. Biases
    and normalisation weights (``no_decay_names``) get no weight decay, as in the Trainer's default optimizer; with
    ``weight_decay=0`` decaying and non-decaying weights share a group.
    """
    if config.layerwise and hparams.max_grad_norm > 0 and hparams.gradient_accumulation_steps > 1:
        raise ValueError(
            "layer-wise GaLore with gradient accumulation cannot clip gradients (the full norm of accumulated "
            "projected gradients is never formed): set max_grad_norm=0, or layerwise=False, or "
            "gradient_accumulation_steps=1"
        )
    no_decay_names = no_decay_parameter_names(model) if no_decay_names is None else no_decay_names
    targets = galore_target_parameters(model, config) if targets is None else targets
    ranks = {id(targets[name]): r for name, r in capped_ranks(targets, config.rank).items()}
    projection = {
        "update_proj_gap": config.update_proj_gap,
        "scale": config.scale,
        "proj_type": config.proj_type,
        "svd_method": config.svd_method,
        "svd_iterations": config.svd_iterations,
        "seed": config.seed,
    }
    split_decay = hparams.weight_decay != 0
    buckets: dict[tuple[int, bool], list[nn.Parameter]] = {}  # (rank or 0 for unprojected, decay) -> parameters
    names: dict[nn.Parameter, str] = {}
    for name, p in trainable_parameters(model):
        names[p] = name
        buckets.setdefault((ranks.get(id(p), 0), split_decay and name not in no_decay_names), []).append(p)
    groups: list[dict[str, Any]] = []
    for (rank, decay), params in sorted(buckets.items(), reverse=True):
        group: dict[str, Any] = {"params": params, "weight_decay": hparams.weight_decay if decay else 0.0}
        if rank:
            group.update(projection, rank=rank)
        groups.append(group)
    cls = OPTIMIZER_CLASSES[config.optimizer]
    kwargs: dict[str, Any] = {"lr": hparams.lr, "weight_decay": hparams.weight_decay}
    if config.optimizer != "adafactor":
        kwargs.update(betas=hparams.betas, eps=hparams.eps)
    else:
        kwargs.update(beta1=config.adafactor_beta1)
    return cls(
        groups,
        layerwise=config.layerwise,
        max_grad_norm=hparams.max_grad_norm if config.layerwise else 0.0,
        is_accumulation_boundary=is_accumulation_boundary,
        parameter_names=names,
        max_consecutive_skips=config.max_consecutive_skips,
        **kwargs,
    )


def _layerwise_updates(trainer: Trainer) -> LayerwiseUpdates | None:
    """The layer-wise update machinery of the trainer's GaLore optimizer (None before it exists)."""
    optimizer = unwrap_optimizer(trainer.optimizer) if trainer.optimizer is not None else None
    return optimizer.layerwise if isinstance(optimizer, _GaLoreOptimizer) else None


def plan_galore(trainer: Trainer, config: GaLoreConfig) -> MethodPlan:
    """Registry planner: validate the targets against the model now (not minutes later in ``train()``), build the
    optimizer when training starts (:func:`galore_plan`)."""
    galore_target_parameters(trainer.model, config)
    return galore_plan(config, trainer.args, lambda: _layerwise_updates(trainer))


def galore_plan(
    config: GaLoreConfig, args: Any, layerwise_updates: Callable[[], LayerwiseUpdates | None]
) -> MethodPlan:
    """GaLore's plan for ``TrainingArguments`` ``args``; shared by :func:`plan_galore` and the stock ``optim=``
    handler, which applies what a handler can (the optimizer, the refusals) and cannot apply the rest.

    Whole-model mode steps on the gradients DDP averaged. Layer-wise mode updates inside backward: the hooks measure
    the true gradient norm (``layerwise_updates()`` returns them once the optimizer exists) and, under DDP, average
    the (projected) gradients themselves, so the model stays out of DDP; clipping is then impossible.
    """

    def create(model: nn.Module, hparams: OptimizerHyperparameters, no_decay_names: set[str]) -> _GaLoreOptimizer:
        return create_galore_optimizer(model, config, hparams, no_decay_names=no_decay_names)

    if not config.layerwise:
        return MethodPlan(create_optimizer=create, data_parallel="ddp")
    if args.fp16:
        raise ValueError("layer-wise GaLore cannot run with fp16=True (the gradients are loss-scaled); use bf16=True")
    distributed_error = None
    if args.max_grad_norm:
        distributed_error = ValueError(
            "layer-wise GaLore under distributed training cannot clip gradients (the norm of the averaged full "
            f"gradient of a projected weight is never formed): set max_grad_norm=0; got {args.max_grad_norm}"
        )

    def grad_norm() -> float | None:
        updates = layerwise_updates()
        return None if updates is None else updates.last_grad_norm

    return MethodPlan(
        create_optimizer=create, data_parallel="own", distributed_error=distributed_error, grad_norm=grad_norm
    )
