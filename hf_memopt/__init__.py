"""hf_memopt: memory-efficient training methods for the stock Hugging Face ``Trainer``.

``attach(trainer, config)`` installs a method; ``METHODS`` is the registry of method names. Importing the package
also makes the stock ``TrainingArguments(optim="galore_*")`` names use hf_memopt's GaLore.
"""

from hf_memopt.blockllm import BlockLLMConfig
from hf_memopt.galore import GaLoreConfig
from hf_memopt.galore.stock import reroute_stock_galore_names
from hf_memopt.integration import attach
from hf_memopt.loqt import LoQTConfig
from hf_memopt.memory import MemoryBreakdown, MemoryReportCallback, plot_memory_breakdown
from hf_memopt.registry import METHODS
from hf_memopt.velora import VeLoRAConfig
from hf_memopt.zo import ZOConfig

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
    "plot_memory_breakdown",
]
__version__ = "0.1.0"

reroute_stock_galore_names()
