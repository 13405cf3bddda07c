"""LoQT: low-rank adapters for quantized pretraining (https://arxiv.org/abs/2405.16528)."""

from hf_memopt.core.registry import register_method
from hf_memopt.loqt.builder import (
    LoQTCallback,
    convert_to_loqt,
    loqt_layers,
    plain_linear_modules,
    plan_loqt,
    save_plain_pretrained,
)
from hf_memopt.loqt.config import LoQTConfig
from hf_memopt.loqt.estimate import estimate_loqt
from hf_memopt.loqt.layer import LoQTLinear, quantize_with_error_compensation

__all__ = [
    "LoQTCallback",
    "LoQTConfig",
    "LoQTLinear",
    "convert_to_loqt",
    "loqt_layers",
    "plain_linear_modules",
    "plan_loqt",
    "quantize_with_error_compensation",
    "save_plain_pretrained",
]

register_method(
    "loqt",
    LoQTConfig,
    plan_loqt,
    "Quantized frozen weights + gradient-initialised low-rank factors, merged back periodically",
    sets_optimizer=False,
    engine_requirement="LoQT holds its frozen weights as quantized uint8 buffers and initialises its factors from an "
    "SVD of each whole gradient",
    estimate=estimate_loqt,
)
