"""hf_memopt: memory-efficient training methods for the stock Hugging Face ``Trainer``.

``attach(trainer, config)`` installs a method; ``METHODS`` is the registry of method names. Importing the package
also makes the stock ``TrainingArguments(optim="galore_*")`` names use hf_memopt's GaLore, where transformers'
private handler table has the tested shape (otherwise one warning says they are not rerouted; see ``compat``).

The names below are imported when first used (PEP 562), so ``import hf_memopt`` (and the ``hf-memopt`` command's
``--help``) does not load torch and transformers; ``METHODS`` imports the method packages when first read, and the
stock GaLore names are rerouted as soon as ``transformers.trainer`` is imported (now, if it already is).
"""

import importlib
import logging

from hf_memopt.core._post_import import call_after_import

# bitsandbytes warns on import on CPU-only machines about optional 4-bit CPU kernels it cannot load; the 8-bit and
# 4-bit functions hf_memopt uses work without them.
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
# ... and, looking for those kernels with the Hub offline, the `kernels` package warns it skips their trust check.
logging.getLogger("kernels._internals.hf_hub").setLevel(logging.ERROR)

_EXPORTS = {
    "METHODS": "hf_memopt.core.registry",
    "BlockLLMConfig": "hf_memopt.blockllm",
    "GaLoreConfig": "hf_memopt.galore",
    "LoQTConfig": "hf_memopt.loqt",
    "MemoryBreakdown": "hf_memopt.tools.memory",
    "MemoryReportCallback": "hf_memopt.tools.memory",
    "VeLoRAConfig": "hf_memopt.velora",
    "ZOConfig": "hf_memopt.zo",
    "attach": "hf_memopt.core.attach",
    "last_complete_checkpoint": "hf_memopt.tools.checkpoints",
    "plot_memory_breakdown": "hf_memopt.tools.memory",
}
__all__ = sorted(_EXPORTS)
__version__ = "0.1.0"


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'hf_memopt' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})


def _route_stock_galore_names() -> None:
    """Point transformers' stock ``galore_*`` handlers at :func:`_stock_galore_handler` (or warn once and leave them).

    Runs inside the import of ``transformers.trainer``, which hf_memopt's own modules may be importing half-way
    (``hf_memopt.core.attach``), so only the light ``compat`` module is imported here; the first use of a stock name
    hands over to ``hf_memopt.galore.stock``.
    """
    from hf_memopt.core.compat import reroute_stock_galore_names

    reroute_stock_galore_names(_stock_galore_handler)


def _stock_galore_handler(ctx):
    from hf_memopt.galore.stock import _galore_handler, reroute_stock_galore_names

    reroute_stock_galore_names()  # replaces this stand-in by hf_memopt's handler for every stock name
    return _galore_handler(ctx)


call_after_import("transformers.trainer", _route_stock_galore_names)
