"""ZO2-style execution (arXiv 2503.12668): blocks offloaded, both perturbed forwards per block upload.

Generic over Hugging Face models: nothing is hand-written per architecture. The model's own ``forward`` runs; the
engine wraps two kinds of *units*:

* every transformer block (the list found by :func:`~hf_memopt.zo.blocks.find_block_list`); its parameters live
  in CPU memory (pinned with CUDA, optionally in bf16/fp16) and are uploaded to the compute device when it runs;
* every module outside the blocks that directly owns trainable parameters (embeddings, final norm, head); these
  stay on the device.

One SPSA sample of a micro-batch of B examples runs three passes of the model:

1. *capture* (only if units run before the first block): the units before the first block run with -eps z; the
   first block's inputs are recorded and the pass stops there. It costs the embeddings only.
2. *pass 1*: units before the first block run with +eps z. The first block's inputs are stacked with the
   captured ones into a batch of 2B; every block (and unit after the blocks) runs its first half with +eps z and its
   second half with -eps z on one upload (``torch.func.functional_call`` with perturbed copies of the block's
   trainable parameters; the stored ones are never perturbed). The last unit returns only its +eps half, so the
   model computes L(theta + eps z) with its own loss code; the -eps half of that unit's input is kept.
3. *pass 2*: every unit returns zeros of its recorded shape except the last, which runs with -eps z on the kept
   input, so the model computes L(theta - eps z). No block is uploaded again (the last one, if it is a block,
   stays resident between passes 1 and 2).

Each block's pending update from the previous ``optimizer.step()`` is applied when it is uploaded (and written
back to the CPU copy), so each block crosses the bus once per step each way.

Limits: a block's and a unit's batch-dependent inputs and outputs are batch-first tensors of >= 2 dimensions; the
loss must depend on the blocks only through the last unit's inputs (true of HF causal LMs and classifiers). Tensors
that are 2B along dim 0 are split; others (masks, rotary tables of the B batch) are passed whole to both halves.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from hf_memopt.zo.optimizer import ZOSGD
from hf_memopt.zo.perturb import perturbation

__all__ = ["ZO2Engine"]

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class _Captured(Exception):
    """Stops the capture pass at the first block."""


class _Spec:
    """Shape of a tensor a unit returned in pass 1; pass 2 returns zeros of it."""

    __slots__ = ("dtype", "device", "shape")

    def __init__(self, t: torch.Tensor):
        self.shape, self.dtype, self.device = t.shape, t.dtype, t.device


def _map(obj: Any, fn: Callable[[torch.Tensor], Any]) -> Any:
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, (list, tuple)) and not hasattr(obj, "_fields"):
        return type(obj)(_map(o, fn) for o in obj)
    if isinstance(obj, dict):
        return type(obj)(**{k: _map(v, fn) for k, v in obj.items()}) if type(obj) is not dict else {
            k: _map(v, fn) for k, v in obj.items()
        }
    return obj


def _map2(a: Any, b: Any, fn: Callable[[torch.Tensor, torch.Tensor], Any]) -> Any:
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return fn(a, b)
    if isinstance(a, (list, tuple)) and not hasattr(a, "_fields") and isinstance(b, (list, tuple)) and len(a) == len(b):
        return type(a)(_map2(x, y, fn) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict) and a.keys() == b.keys():
        mapped = {k: _map2(a[k], b[k], fn) for k in a}
        return mapped if type(a) is dict else type(a)(**mapped)
    return a


def _leaves(obj: Any) -> list[torch.Tensor]:
    found: list[torch.Tensor] = []
    _map(obj, lambda t: found.append(t))
    return found


class _Unit:
    def __init__(self, name: str, module: nn.Module, kind: str, index: int):
        self.name, self.module, self.kind, self.index = name, module, kind, index
        named = module.named_parameters(recurse=kind == "block", remove_duplicate=True)
        if kind == "block":
            self.params = list(named)
        else:
            self.params = [(n, p) for n, p in named if p.requires_grad]
        self.trainable = [(n, p) for n, p in self.params if p.requires_grad]
        self.compute_dtype = {n: p.dtype for n, p in self.params}
        self.busy = False
        self.orig_forward = module.forward


class ZO2Engine:
    """Runs the two perturbed forwards of MeZO through offloaded blocks (see the module docstring)."""

    def __init__(
        self,
        model: nn.Module,
        blocks: nn.ModuleList,
        *,
        eps: float,
        device: torch.device,
        offload_dtype: str | None = None,
        overlap: bool = True,
    ):
        self.model, self.eps = model, eps
        self.use_cuda = torch.cuda.is_available() and torch.device(device).type == "cuda"
        self.device = torch.device(device) if self.use_cuda else None  # None: run where the parameters are
        self.storage_dtype = _DTYPES.get(offload_dtype) if offload_dtype else None
        self.optimizer: ZOSGD | None = None
        block_ids = {id(b) for b in blocks}
        block_names = {n for n, m in model.named_modules() if id(m) in block_ids}
        self.units: list[_Unit] = []
        self.index: dict[int, int] = {}
        for i, block in enumerate(blocks):
            self.units.append(_Unit(next(n for n, m in model.named_modules() if m is block), block, "block", i))
        for name, module in model.named_modules():
            if any(name == b or name.startswith(b + ".") for b in block_names):
                continue
            if not any(p.requires_grad for p in module.parameters(recurse=False)):
                continue
            if any(b.startswith(name + ".") or name == "" for b in block_names):
                raise NotImplementedError(
                    f"{name or type(model).__name__} owns trainable parameters and encloses the transformer blocks; "
                    "ZO2 offloading cannot run it around one block at a time. Use offload='none'"
                )
            self.units.append(_Unit(name, module, "resident", -1))
        self.blocks = [u for u in self.units if u.kind == "block"]
        for unit in self.units:
            module, u = unit.module, unit
            module.forward = lambda *a, _u=u, **k: self._forward(_u, a, k)
        self._offload_storage()
        self.stream = torch.cuda.Stream(self.device) if self.use_cuda and overlap else None
        self.mode: str | None = None
        self.depth, self.sign, self.call_no = 0, 0, 0
        self.sequence: list[_Unit] | None = None
        self.first_block = self.last = -1
        self.loaded: dict[_Unit, dict[str, torch.Tensor]] = {}
        self.uploads: dict[_Unit, tuple[dict[str, torch.Tensor], Any]] = {}
        self.keep: _Unit | None = None
        self.specs: dict[int, Any] = {}
        self.captured: tuple[tuple, dict] | None = None
        self.stash: tuple[tuple, dict] | None = None
        self.seed, self.batch = 0, 0
        model.register_state_dict_pre_hook(lambda *_: self.flush())

    # ---------------------------------------------------------------- storage
    def _offload_storage(self) -> None:
        """Block parameters to CPU memory (pinned under CUDA), in the storage dtype."""
        for unit in self.blocks:
            for _, p in unit.params:
                dtype = self.storage_dtype or p.dtype
                if self.use_cuda:
                    if p.device.type != "cpu" or p.dtype != dtype or not p.data.is_pinned():
                        p.data = p.data.to("cpu", dtype=dtype).pin_memory()
                elif p.dtype != dtype:
                    p.data = p.data.to(dtype)

    def ensure_offloaded(self) -> None:
        """Undo a ``model.to(device)`` done by the Trainer or accelerate after ``attach``."""
        self._offload_storage()

    def bind(self, optimizer: ZOSGD) -> None:
        """Let ``optimizer`` queue the blocks' updates for their next upload."""
        self.optimizer = optimizer
        self.index = {id(p): i for p, i in optimizer.param_index.items()}
        for unit in self.units:
            unit.trainable = [(n, p) for n, p in unit.trainable if id(p) in self.index]
        optimizer.deferred = {p for u in self.blocks for _, p in u.trainable}
        optimizer.before_step.append(self.flush)
        optimizer.register_state_dict_pre_hook(lambda *_: self.flush())

    # ---------------------------------------------------------------- block upload
    def _upload(self, unit: _Unit) -> dict[str, torch.Tensor]:
        out = {}
        for n, p in unit.params:
            dtype = unit.compute_dtype[n]
            if self.device is None:
                out[n] = p if p.dtype == dtype else p.detach().to(dtype)
            else:
                out[n] = p.detach().to(self.device, non_blocking=True).to(dtype)
        return out

    def _prefetch(self, unit: _Unit) -> None:
        if self.stream is None or unit in self.loaded or unit in self.uploads:
            return
        # the side stream waits for work already queued (the write-back of this block's last update)
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.stream):
            working = self._upload(unit)
            event = torch.cuda.Event()
            event.record(self.stream)
        self.uploads[unit] = (working, event)

    def _working(self, unit: _Unit) -> dict[str, torch.Tensor]:
        """The block's parameters on the compute device, with the pending update applied and written back."""
        if unit in self.loaded:
            return self.loaded[unit]
        if unit in self.uploads:
            working, event = self.uploads.pop(unit)
            current = torch.cuda.current_stream(self.device)
            current.wait_event(event)
            for t in working.values():
                t.record_stream(current)
        else:
            working = self._upload(unit)
        if self.optimizer is not None:
            for n, p in unit.trainable:
                if self.optimizer.apply_pending(p, working[n]) and working[n] is not p:
                    p.data.copy_(working[n], non_blocking=self.use_cuda)  # offload the updated block back
        self.loaded[unit] = working
        if unit.index + 1 < len(self.blocks):
            self._prefetch(self.blocks[unit.index + 1])
        return working

    def _release(self, unit: _Unit) -> None:
        if unit is not self.keep:
            self.loaded.pop(unit, None)

    @torch.no_grad()
    def flush(self) -> None:
        """Apply every queued block update now (before a save, an evaluation, the end of training)."""
        if self.optimizer is None or not self.optimizer.pending:
            return
        for unit in self.blocks:
            if any(p in self.optimizer.pending for _, p in unit.trainable):
                self._working(unit)
                self._release(unit)
        self.uploads.clear()
        if self.use_cuda:
            torch.cuda.synchronize(self.device)

    # ---------------------------------------------------------------- unit calls
    def _params(self, unit: _Unit, base: dict[str, torch.Tensor], sign: int) -> dict[str, torch.Tensor]:
        if sign == 0:
            return base
        params = dict(base)
        for n, p in unit.trainable:
            w = base[n]
            params[n] = torch.add(w, perturbation(w, self.seed, self.index[id(p)]), alpha=sign * self.eps)
        return params

    def _call(self, unit: _Unit, sign: int, args: tuple, kwargs: dict) -> Any:
        base = self._working(unit) if unit.kind == "block" else {n: p for n, p in unit.params}
        self.depth += 1
        outer, self.sign = self.sign, sign
        unit.busy = True
        try:
            if sign == 0 and all(base[n] is p for n, p in unit.params):
                return unit.orig_forward(*args, **kwargs)
            params = self._params(unit, base, sign)
            return torch.func.functional_call(unit.module, params, args, kwargs, strict=False)
        finally:
            unit.busy = False
            self.sign = outer
            self.depth -= 1

    def _forward(self, unit: _Unit, args: tuple, kwargs: dict) -> Any:
        if unit.busy:
            return unit.orig_forward(*args, **kwargs)
        if self.mode in (None, "probe") or self.depth > 0:
            if self.mode == "probe" and self.depth == 0:
                self.sequence.append(unit)
            try:
                return self._call(unit, self.sign if self.depth > 0 else 0, args, kwargs)
            finally:
                if unit.kind == "block":
                    self._release(unit)
        c = self.call_no
        self.call_no += 1
        if c >= len(self.sequence) or self.sequence[c] is not unit:
            raise RuntimeError(
                f"ZO2 offload: the model called its units in a different order than in the probe pass (call {c}: "
                f"{unit.name}); data-dependent control flow is not supported, use offload='none'"
            )
        if self.mode == "capture":
            if c < self.first_block:
                return self._call(unit, -1, args, kwargs)
            self.captured = (args, kwargs)
            raise _Captured
        if self.mode == "pass2":
            if c != self.last:
                return self._zeros(self.specs[c])
            stash_args, stash_kwargs = self.stash
            self.stash = None
            try:
                return self._call(unit, -1, stash_args, stash_kwargs)
            finally:
                self.keep = None
                self._release(unit)
        # pass 1
        if c < self.first_block and c != self.last:
            out = self._call(unit, +1, args, kwargs)
            self.specs[c] = _map(out, _Spec)
            return out
        if c == self.first_block and self.captured is not None:
            args, kwargs = self._merge((args, kwargs), self.captured)
            self.captured = None
        split = any(t.dim() >= 2 and t.shape[0] == 2 * self.batch for t in _leaves((args, kwargs)))
        if split:
            plus = _map((args, kwargs), self._first_half)
            minus = _map((args, kwargs), self._second_half)
        else:
            plus = minus = (args, kwargs)
        try:
            if c == self.last:
                self.stash = minus
                if unit.kind == "block":
                    self.keep = unit
                return self._call(unit, +1, *plus)
            out_plus = self._call(unit, +1, *plus)
            out_minus = self._call(unit, -1, *minus)
        finally:
            if unit.kind == "block":
                self._release(unit)
        self.specs[c] = _map(out_plus, _Spec)
        return _map2(out_plus, out_minus, self._stack if split else self._fork)

    # ---------------------------------------------------------------- batch plumbing
    def _first_half(self, t: torch.Tensor) -> torch.Tensor:
        return t[: self.batch] if t.dim() >= 2 and t.shape[0] == 2 * self.batch else t

    def _second_half(self, t: torch.Tensor) -> torch.Tensor:
        return t[self.batch :] if t.dim() >= 2 and t.shape[0] == 2 * self.batch else t

    def _stack(self, plus: torch.Tensor, minus: torch.Tensor) -> torch.Tensor:
        if plus.dim() == 0:
            raise RuntimeError("ZO2 offload: a unit returned a 0-d tensor; use offload='none' for this model")
        return torch.cat([plus, minus])

    def _fork(self, plus: torch.Tensor, minus: torch.Tensor) -> torch.Tensor:
        if plus.dim() >= 1 and plus.shape[0] == self.batch:
            return torch.cat([plus, minus])
        if plus.dim() >= 1 and plus.shape[0] == 1:  # broadcast over the batch (position embeddings)
            shape = (self.batch, *plus.shape[1:])
            return torch.cat([plus.expand(shape), minus.expand(shape)])
        raise RuntimeError(
            f"ZO2 offload: a unit returned shape {tuple(plus.shape)} for a batch of {self.batch}; outputs must be "
            "batch-first. Use offload='none' for this model"
        )

    def _merge(self, plus: Any, minus: Any) -> Any:
        def merge(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            if a is b or (a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b)):
                return a
            if a.dim() >= 2 and a.shape[0] == self.batch and a.shape == b.shape:
                return torch.cat([a, b])
            raise RuntimeError(
                f"ZO2 offload: the first block's input of shape {tuple(a.shape)} is not batch-first; use "
                "offload='none' for this model"
            )

        return _map2(plus, minus, merge)

    @staticmethod
    def _zeros(spec: Any) -> Any:
        def make(s: Any) -> Any:
            return torch.zeros(s.shape, dtype=s.dtype, device=s.device) if isinstance(s, _Spec) else s

        def walk(obj: Any) -> Any:
            if isinstance(obj, _Spec):
                return make(obj)
            if isinstance(obj, (list, tuple)) and not hasattr(obj, "_fields"):
                return type(obj)(walk(o) for o in obj)
            if isinstance(obj, dict):
                mapped = {k: walk(v) for k, v in obj.items()}
                return mapped if type(obj) is dict else type(obj)(**mapped)
            return obj

        return walk(spec)

    # ---------------------------------------------------------------- the two perturbed losses
    @contextmanager
    def _mode(self, mode: str):
        self.mode, self.call_no, self.depth, self.sign = mode, 0, 0, 0
        try:
            yield
        finally:
            self.mode = None

    def _probe(self, loss_fn: Callable[[], torch.Tensor]) -> None:
        self.sequence = []
        with self._mode("probe"):
            loss_fn()
        kinds = [u.kind for u in self.sequence]
        if "block" not in kinds:
            raise RuntimeError("ZO2 offload: the forward pass called none of the transformer blocks")
        self.first_block, self.last = kinds.index("block"), len(kinds) - 1

    @torch.no_grad()
    def perturbed_losses(
        self, loss_fn: Callable[[], torch.Tensor], batch_size: int, seed: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(L(theta + eps z), L(theta - eps z))`` with z from ``seed``; each block uploaded once."""
        if self.sequence is None:
            self._probe(loss_fn)
        self.seed, self.batch = seed, batch_size
        self.specs.clear()
        self.captured = self.stash = None
        try:
            if self.first_block > 0:
                with self._mode("capture"):
                    try:
                        loss_fn()
                    except _Captured:
                        pass
                if self.captured is None:
                    raise RuntimeError("ZO2 offload: the capture pass did not reach the first block")
            with self._mode("pass1"):
                loss_plus = loss_fn()
            with self._mode("pass2"):
                loss_minus = loss_fn()
        finally:
            self.specs.clear()
            self.captured = self.stash = None
            if self.keep is not None:
                self.loaded.pop(self.keep, None)
                self.keep = None
        return loss_plus, loss_minus
