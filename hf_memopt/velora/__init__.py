"""VeLoRA: compress the inputs Linear layers save for backward with rank-1 sub-token projections
(https://arxiv.org/abs/2405.17991)."""

from hf_memopt.core.registry import ENGINES, register_method
from hf_memopt.velora.builder import apply_velora, plan_velora, remove_velora, without_velora_buffers
from hf_memopt.velora.config import VeLoRAConfig
from hf_memopt.velora.estimate import estimate_velora
from hf_memopt.velora.function import VeLoRALinearFunction, compress, reconstruct, velora_linear
from hf_memopt.velora.targets import AUTO_TARGETS, CompressionReport, compression_report

__all__ = [
    "AUTO_TARGETS",
    "CompressionReport",
    "VeLoRAConfig",
    "VeLoRALinearFunction",
    "apply_velora",
    "compress",
    "compression_report",
    "plan_velora",
    "reconstruct",
    "remove_velora",
    "velora_linear",
    "without_velora_buffers",
]

register_method(
    "velora",
    VeLoRAConfig,
    plan_velora,
    "Rank-1 sub-token projections: Linear layers save num_groups scalars per token instead of their input",
    sets_optimizer=False,
    # a model transform: the compressed coefficients come from the input, with the weight the engine gathered
    engines=frozenset(ENGINES),
    estimate=estimate_velora,
)
