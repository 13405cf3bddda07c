"""A method-neutral mark on modules whose computation a method has rewritten in place.

A method that changes what a module computes without changing its type (VeLoRA patches the forward of an
``nn.Linear`` instance) marks it here; a method that would replace such a module (LoQT swaps ``nn.Linear`` for its own
layer) checks the mark and refuses, instead of silently dropping the other method's work. Neither imports the other.
"""

from __future__ import annotations

from torch import nn

__all__ = ["mark_rewritten", "rewritten_by", "unmark_rewritten"]

_ATTRIBUTE = "_hf_memopt_rewritten_by"


def mark_rewritten(module: nn.Module, method: str) -> None:
    """Record that ``method`` (its display name) rewrote ``module``'s computation."""
    object.__setattr__(module, _ATTRIBUTE, method)


def unmark_rewritten(module: nn.Module) -> None:
    """Remove the mark (the method restored the module)."""
    module.__dict__.pop(_ATTRIBUTE, None)


def rewritten_by(module: nn.Module) -> str | None:
    """The method that rewrote ``module``, or None."""
    return module.__dict__.get(_ATTRIBUTE)
