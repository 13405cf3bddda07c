"""GaLore: gradient low-rank projection (https://arxiv.org/abs/2403.03507)."""

from hf_memopt.galore.builder import build_galore, create_galore_optimizer
from hf_memopt.galore.config import GaLoreConfig
from hf_memopt.galore.optimizer import GaLoreAdafactor, GaLoreAdamW, GaLoreAdamW8bit
from hf_memopt.registry import register_method

__all__ = [
    "GaLoreAdafactor",
    "GaLoreAdamW",
    "GaLoreAdamW8bit",
    "GaLoreConfig",
    "build_galore",
    "create_galore_optimizer",
]

register_method("galore", GaLoreConfig, build_galore, "Gradient low-rank projection: optimizer states in a rank-r subspace")
