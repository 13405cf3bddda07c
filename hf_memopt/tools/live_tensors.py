"""Exact live-tensor bookkeeping: the peak bytes of tensor storages an operation allocated and still alive.

On a GPU ``torch.cuda.max_memory_allocated`` answers "how much did this step hold at most"; on a CPU nothing does
(the resident set size keeps freed pages and mixes in the Python heap). :class:`LiveTensorTracker` answers it for the
tensors themselves: a ``TorchDispatchMode`` sees every ATen operation, and each output whose storage is none of the
operation's inputs' storages is a fresh allocation; a ``weakref.finalize`` on that storage (PyTorch keeps one Python
storage object per storage, so the finalizer runs when its last tensor or view dies) takes it off the count. Storages
that existed before the tracker was entered (parameters, buffers, the batch) are never counted, nor are views of them.

Used by ``tests/test_zo_offload_memory.py`` to pin ZO2's working set and by ``scripts/zo2_working_set.py`` to
attribute its peak to the operations that allocated it.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from hf_memopt.core import compat

__all__ = ["Allocation", "LiveTensorTracker"]


def tree_leaves(tree: Any) -> list[Any]:
    """The leaves of nested tuples, lists and dicts (the containers ATen operations take and return)."""
    if isinstance(tree, (tuple, list)):
        return [leaf for item in tree for leaf in tree_leaves(item)]
    if isinstance(tree, dict):
        return [leaf for item in tree.values() for leaf in tree_leaves(item)]
    return [tree]


@dataclass(frozen=True)
class Allocation:
    """One storage allocated while tracking: its bytes, the ATen operation, and the caller's label at the time."""

    nbytes: int
    op: str
    label: str


class LiveTensorTracker(compat.torch_dispatch_mode()):
    """Tracks the storages allocated inside the ``with`` block: ``live`` bytes now, ``peak`` bytes, ``at_peak``.

    Args:
        label: called at each allocation; its string is stored with it (e.g. which pass or block is running), so
            ``at_peak`` says where the peak's tensors came from. ``None``: no label.
    """

    def __init__(self, label: Callable[[], str] | None = None):
        super().__init__()
        self.label = label
        self.live = 0
        self.peak = 0
        self.allocations: dict[int, Allocation] = {}
        self.at_peak: list[Allocation] = []

    def _freed(self, key: int) -> None:
        allocation = self.allocations.pop(key, None)
        if allocation is not None:
            self.live -= allocation.nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {
            id(t.untyped_storage()) for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor) and t.layout
            is torch.strided
        }  # fmt: skip
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor) or t.layout is not torch.strided or t.device.type == "meta":
                continue
            storage = t.untyped_storage()
            key = id(storage)
            if key in inputs or key in self.allocations or storage.nbytes() == 0:
                continue
            self.allocations[key] = Allocation(storage.nbytes(), str(func), self.label() if self.label else "")
            weakref.finalize(storage, self._freed, key)
            self.live += storage.nbytes()
            if self.live > self.peak:
                self.peak = self.live
                self.at_peak = list(self.allocations.values())
        return out

    def summary(self, top: int = 12) -> list[tuple[str, str, int, int]]:
        """The tensors alive at the peak grouped by (label, op): ``(label, op, count, bytes)``, largest first."""
        groups: dict[tuple[str, str], list[int]] = {}
        for a in self.at_peak:
            groups.setdefault((a.label, a.op), []).append(a.nbytes)
        rows = [(label, op, len(sizes), sum(sizes)) for (label, op), sizes in groups.items()]
        return sorted(rows, key=lambda r: -r[3])[:top]
