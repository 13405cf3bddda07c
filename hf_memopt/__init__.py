"""hf_memopt: memory-efficient training methods for the stock Hugging Face ``Trainer``.

``attach(trainer, config)`` installs a method; ``METHODS`` is the registry of method names. Importing the package
also makes the stock ``TrainingArguments(optim="galore_*")`` names use hf_memopt's GaLore.
"""

import logging

# bitsandbytes warns on import on CPU-only machines about optional 4-bit CPU kernels it cannot load; the 8-bit and
# 4-bit functions hf_memopt uses work without them.
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
# ... and, looking for those kernels with the Hub offline, the `kernels` package warns it skips their trust check.
logging.getLogger("kernels._internals.hf_hub").setLevel(logging.ERROR)

from hf_memopt.blockllm import BlockLLMConfig  # noqa: E402
from hf_memopt.checkpoints import last_complete_checkpoint  # noqa: E402
from hf_memopt.galore import GaLoreConfig  # noqa: E402
from hf_memopt.galore.stock import reroute_stock_galore_names  # noqa: E402
from hf_memopt.integration import attach  # noqa: E402
from hf_memopt.loqt import LoQTConfig  # noqa: E402
from hf_memopt.memory import MemoryBreakdown, MemoryReportCallback, plot_memory_breakdown  # noqa: E402
from hf_memopt.registry import METHODS  # noqa: E402
from hf_memopt.velora import VeLoRAConfig  # noqa: E402
from hf_memopt.zo import ZOConfig  # noqa: E402

__all__ = [
    "METHODS",
    "BlockLLMConfig",
    "GaLoreConfig",
    "LoQTConfig",
    "MemoryBreakdown",
    "MemoryReportCallback",
    "VeLoRAConfig",
    "ZOConfig",
    "attach",
    "last_complete_checkpoint",
    "plot_memory_breakdown",
]
__version__ = "0.1.0"

reroute_stock_galore_names()
