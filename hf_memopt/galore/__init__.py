"""GaLore: gradient low-rank projection (https://arxiv.org/abs/2403.03507)."""

from hf_memopt.core.registry import register_method
from hf_memopt.galore.builder import create_galore_optimizer, plan_galore
from hf_memopt.galore.config import GaLoreConfig
from hf_memopt.galore.estimate import estimate_galore
from hf_memopt.galore.optimizer import GaLoreAdafactor, GaLoreAdamW, GaLoreAdamW8bit

__all__ = [
    "GaLoreAdafactor",
    "GaLoreAdamW",
    "GaLoreAdamW8bit",
    "GaLoreConfig",
    "create_galore_optimizer",
    "plan_galore",
]

register_method(
    "galore",
    GaLoreConfig,
    plan_galore,
    "Gradient low-rank projection: optimizer states in a rank-r subspace",
    # ZeRO-0 in fp32 steps the optimizer on whole, all-reduced gradients, as DDP; layer-wise hooks would fire before it
    engines=lambda config: frozenset() if config.layerwise else frozenset({"zero0"}),
    engine_requirement="GaLore needs each whole m x n gradient, averaged across ranks, for its SVD (Sec. 3 of the "
    "paper; layer-wise mode also steps inside per-parameter gradient hooks)",
    estimate=estimate_galore,
)
