"""Zeroth-order fine-tuning: MeZO (https://arxiv.org/abs/2305.17333) with ZO2 offloading
(https://arxiv.org/abs/2503.12668)."""

from hf_memopt.core.registry import register_method
from hf_memopt.zo.blocks import find_block_list
from hf_memopt.zo.builder import ZOCallback, create_zo_optimizer, plan_zo, zo_engine, zo_training_step
from hf_memopt.zo.config import ZOConfig
from hf_memopt.zo.estimate import estimate_zo
from hf_memopt.zo.offload import ZO2Engine
from hf_memopt.zo.optimizer import ZOSGD

__all__ = [
    "ZOSGD",
    "ZO2Engine",
    "ZOCallback",
    "ZOConfig",
    "create_zo_optimizer",
    "find_block_list",
    "plan_zo",
    "zo_engine",
    "zo_training_step",
]

register_method(
    "zo",
    ZOConfig,
    plan_zo,
    "Zeroth-order MeZO-SGD: two forwards per step, no backward (ZO2 block offloading)",
    engine_requirement="ZO replaces the training step with two forwards around an in-place perturbation of every "
    "whole parameter, bypassing the engine's backward and optimizer step",
    estimate=estimate_zo,
)
