"""BlockLLM: block coordinate descent over parameter blocks chosen by the gradient (https://arxiv.org/abs/2406.17296)."""

from hf_memopt.blockllm.blocks import Block, build_blocks, select_blocks
from hf_memopt.blockllm.builder import BlockLLMCallback, create_blockllm_optimizer, plan_blockllm
from hf_memopt.blockllm.config import BlockLLMConfig
from hf_memopt.blockllm.estimate import estimate_blockllm
from hf_memopt.blockllm.optimizer import BlockLLMAdamW, BlockLLMAdamW8bit
from hf_memopt.core.registry import register_method

__all__ = [
    "Block",
    "BlockLLMAdamW",
    "BlockLLMAdamW8bit",
    "BlockLLMCallback",
    "BlockLLMConfig",
    "build_blocks",
    "create_blockllm_optimizer",
    "plan_blockllm",
    "select_blocks",
]

register_method(
    "blockllm",
    BlockLLMConfig,
    plan_blockllm,
    "Block coordinate descent: only the blocks with the largest (visit-discounted) gradient norms train",
    engine_requirement="BlockLLM scores whole parameter blocks by gradient norm and flips their `requires_grad` "
    "at each re-selection",
    estimate=estimate_blockllm,
)
