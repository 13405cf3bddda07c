"""ZO2-style execution (arXiv 2503.12668): blocks offloaded, both perturbed forwards per block upload.

ZO2's official code (``MeZO2SGD.inner_zo_forward``) rewrites a model's forward by hand into two streams: every
block runs ``module_dual_forward`` (its +eps z forward on stream 1, then its -eps z forward on stream 2, on one
upload) and every operation between blocks runs ``function_dual_forward`` (the same function on both streams). This
engine does the same for any Hugging Face model without rewriting it: the model's own ``forward`` runs once, and

* every transformer block (the list found by :func:`~hf_memopt.zo.blocks.find_block_list`) is wrapped; its
  parameters live in CPU memory (pinned with CUDA, optionally in bf16/fp16) and are uploaded when it runs. A call
  runs the block twice on that upload (``torch.func.functional_call`` with copies of its trainable parameters
  perturbed by +eps z, then by -eps z; the stored ones are never perturbed), stream 1's inputs first, then
  stream 2's. The pending update of the previous ``optimizer.step()`` is applied at upload and written back, so
  each block crosses the bus once per step each way;
* every PyTorch operation outside the blocks (embeddings, positional tables, norms, the head, the glue between
  blocks, the model's loss code, the Trainer's scaling of the loss) is seen through a ``TorchFunctionMode`` and,
  when one of its inputs belongs to stream 2 or is a trainable parameter, run once per stream: trainable
  parameters become theta + eps z on stream 1 and theta - eps z on stream 2 wherever they are used (a module call,
  a tied head read as ``embed.weight``, a positional table sliced directly, a parameter owned by the model itself).

The model only ever sees stream 1; each of its tensors that differs on stream 2 has a twin (a weak map, so
activations are freed as usual). The model's loss is L(theta + eps z); its twin is L(theta - eps z). Nothing is
stacked or split along the batch, so tensors whose leading dimension is not the batch (T5's position bias, MoE
router logits over tokens) and inputs that later blocks read from outside the block chain (BART's encoder states)
are exact. Parameters used *inside* a block but owned outside it are perturbed there too.

Refused, never trained wrongly (see ``docs/methods/zo.md``): a trainable block parameter shared with a module
outside its block (``ValueError`` at construction); a trainable parameter the first forward never used (it could
only reach the loss through an operation the mode cannot see: a custom kernel); a loss with no stream-2 twin (the
same cause); operations outside the blocks whose non-tensor result differs between the streams (``.item()``,
``bool()``: data-dependent control flow); in-place writes of stream-2 values into a view or an ``out=`` tensor; a
KV cache handed to a block (both streams would append to it).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils.weak import WeakIdKeyDictionary

from hf_memopt.core import compat
from hf_memopt.zo.optimizer import ZOSGD
from hf_memopt.zo.perturb import perturbation

__all__ = ["ZO2Engine"]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# methods whose result depends only on metadata: a parameter's shape or dtype needs no perturbation
_METADATA = frozenset(
    {"__get__", "size", "dim", "ndimension", "numel", "nelement", "stride", "storage_offset", "is_contiguous",
     "is_floating_point", "is_complex", "element_size", "get_device", "__len__", "is_pinned"}
)  # fmt: skip
_INPLACE_DUNDERS = frozenset(
    {"__setitem__", "__iadd__", "__isub__", "__imul__", "__itruediv__", "__ifloordiv__", "__imod__", "__ipow__",
     "__iand__", "__ior__", "__ixor__", "__ilshift__", "__irshift__", "__imatmul__"}
)  # fmt: skip
# non-tensor results an operation may return on both streams (compared for equality)
_SCALARS = (bool, int, float, complex, str, torch.dtype, torch.device, torch.Size, type(None))


def _walk(obj: Any, fn: Callable[[torch.Tensor], Any]) -> Any:
    """``obj`` with ``fn`` applied to each tensor, rebuilding tuples (named too), lists and dicts."""
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, (list, tuple)):
        items = [_walk(o, fn) for o in obj]
        if isinstance(obj, list):
            return items
        if hasattr(obj, "_fields"):
            return type(obj)(*items)
        return tuple(items) if type(obj) is tuple else type(obj)(items)
    if isinstance(obj, dict):
        mapped = {k: _walk(v, fn) for k, v in obj.items()}
        return mapped if type(obj) is dict else type(obj)(**mapped)
    return obj


def _tensors(obj: Any):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for o in obj:
            yield from _tensors(o)
    elif isinstance(obj, dict):
        for o in obj.values():
            yield from _tensors(o)


def _name(func: Any) -> str:
    return getattr(func, "__name__", type(func).__name__)


class _DualMode(TorchFunctionMode):
    """Routes every PyTorch operation of the model's forward to :meth:`ZO2Engine._dispatch`."""

    def __init__(self, engine: ZO2Engine):
        super().__init__()
        self.engine = engine

    def __torch_function__(self, func, types, args=(), kwargs=None):
        return self.engine._dispatch(func, args, kwargs or {})


class _Block:
    def __init__(self, name: str, module: nn.Module, index: int):
        self.name, self.module, self.index = name, module, index
        self.params = list(module.named_parameters(remove_duplicate=True))
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
        self.names = {id(p): n for n, p in model.named_parameters(remove_duplicate=False)}
        self.blocks = [
            _Block(next(n for n, m in model.named_modules() if m is block), block, i) for i, block in enumerate(blocks)
        ]
        self._refuse_shared_block_parameters()
        self.index: dict[int, int] = {}
        self.resident: dict[int, torch.Tensor] = {}  # id -> trainable parameter outside the blocks
        self.block_params: set[int] = set()
        for block in self.blocks:
            block.module.forward = lambda *a, _b=block, **k: self._forward(_b, a, k)
        self._offload_storage()
        self.stream = torch.cuda.Stream(self.device) if self.use_cuda and overlap else None
        self.loaded: dict[_Block, dict[str, torch.Tensor]] = {}
        self.uploads: dict[_Block, tuple[dict[str, torch.Tensor], Any]] = {}
        self.world: int | None = None  # None: no perturbed pass; 0: outside the blocks; +-1: inside one, that stream
        self.raw = 0  # > 0: the engine's own tensor work, not mirrored
        self.twins: WeakIdKeyDictionary | None = None
        self.seen: set[int] | None = None  # trainable parameters the first perturbed pass used
        self.checked = False
        self.seed = 0
        model.register_state_dict_pre_hook(lambda *_: self.flush())

    def _refuse_shared_block_parameters(self) -> None:
        """A trainable block parameter also owned outside its block would be read there un-updated and unperturbed
        (it lives offloaded, its update queued for the block's next upload)."""
        owner = {}
        for block in self.blocks:
            for _, p in block.trainable:
                owner[id(p)] = block.name
        shared = []
        for name, module in self.model.named_modules(remove_duplicate=False):
            for pname, p in module.named_parameters(recurse=False, remove_duplicate=False):
                full = f"{name}.{pname}" if name else pname
                if id(p) in owner and not (full == owner[id(p)] or full.startswith(owner[id(p)] + ".")):
                    if not any(full.startswith(b.name + ".") for b in self.blocks):
                        shared.append(full)
        if shared:
            raise ValueError(
                f"ZO2 offloading cannot train {', '.join(sorted(shared))}: a trainable parameter of a transformer "
                "block that is also used outside the blocks (tied weights) lives offloaded with its update queued for "
                "the block's next upload. Untie or freeze it, or use ZOConfig(offload='none')"
            )

    # ---------------------------------------------------------------- storage
    def _offload_storage(self) -> None:
        """Block parameters to CPU memory (pinned under CUDA), in the storage dtype."""
        for block in self.blocks:
            for _, p in block.params:
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
        for block in self.blocks:
            block.trainable = [(n, p) for n, p in block.trainable if id(p) in self.index]
        self.block_params = {id(p) for b in self.blocks for _, p in b.trainable}
        self.resident = {id(p): p for p in optimizer.param_index if id(p) not in self.block_params}
        optimizer.deferred = {p for b in self.blocks for _, p in b.trainable}
        optimizer.before_step.append(self.flush)
        optimizer.register_state_dict_pre_hook(lambda *_: self.flush())

    # ---------------------------------------------------------------- block upload
    def _upload(self, block: _Block) -> dict[str, torch.Tensor]:
        out = {}
        for n, p in block.params:
            dtype = block.compute_dtype[n]
            if self.device is None:
                out[n] = p if p.dtype == dtype else p.detach().to(dtype)
            else:
                out[n] = p.detach().to(self.device, non_blocking=True).to(dtype)
        return out

    def _prefetch(self, block: _Block) -> None:
        if self.stream is None or block in self.loaded or block in self.uploads:
            return
        # the side stream waits for work already queued (the write-back of this block's last update)
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.stream):
            working = self._upload(block)
            event = torch.cuda.Event()
            event.record(self.stream)
        self.uploads[block] = (working, event)

    def _working(self, block: _Block) -> dict[str, torch.Tensor]:
        """The block's parameters on the compute device, with the pending update applied and written back."""
        if block in self.loaded:
            return self.loaded[block]
        if block in self.uploads:
            working, event = self.uploads.pop(block)
            current = torch.cuda.current_stream(self.device)
            current.wait_event(event)
            for t in working.values():
                t.record_stream(current)
        else:
            working = self._upload(block)
        if self.optimizer is not None:
            for n, p in block.trainable:
                if self.optimizer.apply_pending(p, working[n]) and working[n] is not p:
                    p.data.copy_(working[n], non_blocking=self.use_cuda)  # offload the updated block back
        self.loaded[block] = working
        if block.index + 1 < len(self.blocks):
            self._prefetch(self.blocks[block.index + 1])
        return working

    @torch.no_grad()
    def flush(self) -> None:
        """Apply every queued block update now (before a save, an evaluation, the end of training)."""
        if self.optimizer is None or not self.optimizer.pending:
            return
        for block in self.blocks:
            if any(p in self.optimizer.pending for _, p in block.trainable):
                self._working(block)
                self.loaded.pop(block, None)
        self.uploads.clear()
        if self.use_cuda:
            torch.cuda.synchronize(self.device)

    # ---------------------------------------------------------------- blocks
    @contextmanager
    def _engine_work(self):
        self.raw += 1
        try:
            yield
        finally:
            self.raw -= 1

    def _call(self, block: _Block, sign: int, args: tuple, kwargs: dict) -> Any:
        """One forward of ``block`` on stream ``sign`` (+1: theta + eps z, -1: theta - eps z, 0: theta)."""
        with self._engine_work():
            base = self._working(block)
            params = dict(base)
            for n, p in block.trainable if sign else ():
                params[n] = torch.add(
                    base[n], perturbation(base[n], self.seed, self.index[id(p)]), alpha=sign * self.eps
                )
        outer, self.world = self.world, (sign if self.world is not None else None)
        block.busy = True
        try:
            if sign == 0 and all(base[n] is p for n, p in block.params):
                return block.orig_forward(*args, **kwargs)
            return torch.func.functional_call(block.module, params, args, kwargs, strict=False)
        finally:
            block.busy = False
            self.world = outer

    def _forward(self, block: _Block, args: tuple, kwargs: dict) -> Any:
        if block.busy:  # functional_call re-entering the wrapper
            return block.orig_forward(*args, **kwargs)
        try:
            if self.world != 0:  # no perturbed pass (evaluation, flush) or nested in a block's stream
                return self._call(block, self.world or 0, args, kwargs)
            self._refuse_shared_state(block, args, kwargs)
            # transformers records router logits, attentions, hidden states through forward hooks into a context var
            recorder = compat.output_collector()
            recorded = recorder.get()
            marks = {k: len(v) for k, v in recorded.items() if isinstance(v, list)} if recorded else {}
            out_plus = self._call(block, +1, *self._stream((args, kwargs), +1))
            minus = self._stream((args, kwargs), -1)
            if marks:  # what the -eps forward records goes to a copy, paired below with the +eps records
                minus_recorded = {k: list(v[: marks[k]]) if k in marks else v for k, v in recorded.items()}
                token = recorder.set(minus_recorded)
            try:
                out_minus = self._call(block, -1, *minus)
            finally:
                if marks:
                    recorder.reset(token)
            for k, n in marks.items():
                self._pair(recorded[k][n:], minus_recorded[k][n:], f"{block.name} (recorded {k})")
            if self.seen is not None:
                self.seen.update(id(p) for _, p in block.trainable)
        finally:
            self.loaded.pop(block, None)
        self._pair(out_plus, out_minus, block.name)
        return out_plus

    @staticmethod
    def _refuse_shared_state(block: _Block, args: tuple, kwargs: dict) -> None:
        """A KV cache handed to a block would be appended to by the +eps forward and read by the -eps one."""
        from transformers.cache_utils import Cache

        if any(isinstance(v, Cache) for v in (*args, *kwargs.values())):
            raise RuntimeError(
                f"ZO2 offload: {block.name} received a KV cache, which its +eps and -eps forwards would share; run the "
                "perturbed forwards with use_cache=False (the Trainer integration does) or use ZOConfig(offload='none')"
            )

    # ---------------------------------------------------------------- operations outside the blocks
    def _perturbed(self, p: torch.Tensor, sign: int) -> torch.Tensor:
        """``p + sign * eps * z`` for a trainable parameter outside the blocks.

        z is regenerated per stream rather than kept for the other one: one perturbed copy of (say) the embedding
        table alive at a time, as when plain MeZO perturbs it in place."""
        key = id(p)
        if key in self.block_params:
            raise RuntimeError(
                f"ZO2 offload: {self.names.get(key, 'a block parameter')} is used outside its transformer block "
                "(stored offloaded, its update queued for the block's next upload); use ZOConfig(offload='none')"
            )
        if self.seen is not None:
            self.seen.add(key)
        with self._engine_work():
            return torch.add(p.detach(), perturbation(p.detach(), self.seed, self.index[key]), alpha=sign * self.eps)

    def _is_param(self, t: torch.Tensor) -> bool:
        key = id(t)
        return (key in self.resident and self.resident[key] is t) or key in self.block_params

    def _stream(self, obj: Any, sign: int) -> Any:
        """``obj`` as stream ``sign`` sees it: parameters perturbed, stream-1 tensors replaced by their twins."""

        def swap(t: torch.Tensor) -> torch.Tensor:
            if self._is_param(t):
                return self._perturbed(t, sign)
            if sign < 0:
                return self.twins.get(t, t)
            return t

        return _walk(obj, swap)

    def _dual(self, obj: Any) -> bool:
        return any(self._is_param(t) or t in self.twins for t in _tensors(obj))

    def _dispatch(self, func: Any, args: tuple, kwargs: dict) -> Any:
        if self.raw or self.world is None:
            return func(*args, **kwargs)
        name = _name(func)
        if self.world != 0:  # inside a block's stream: only parameters owned outside it need perturbing
            if not any(self._is_param(t) for t in _tensors((args, kwargs))):
                return func(*args, **kwargs)
            if name in _METADATA:
                out = func(*args, **kwargs)
                if not any(True for _ in _tensors(out)):
                    return out
            args, kwargs = self._stream((args, kwargs), self.world)
            return func(*args, **kwargs)
        if not self._dual((args, kwargs)):
            return func(*args, **kwargs)
        if name in _METADATA:
            out = func(*args, **kwargs)
            if not any(True for _ in _tensors(out)):
                return out
        if "out" in kwargs:
            raise RuntimeError(
                f"ZO2 offload: {name}(out=...) outside the transformer blocks takes perturbed inputs; the two streams "
                "cannot share its output. Use ZOConfig(offload='none') for this model"
            )
        inplace = name in _INPLACE_DUNDERS or (name.endswith("_") and not name.startswith("__"))
        target = args[0] if inplace and args and isinstance(args[0], torch.Tensor) else None
        shared = target is not None and not self._is_param(target) and target not in self.twins
        if shared:  # writes stream-2 values into a tensor both streams read: stream 2 writes into its own copy
            if compat.view_base(target) is not None:
                raise RuntimeError(
                    f"ZO2 offload: the in-place {name} outside the transformer blocks writes perturbed values into a "
                    "view of a tensor both streams share; use ZOConfig(offload='none') for this model"
                )
            copy = target.clone()
        plus_args, plus_kwargs = self._stream((args, kwargs), +1)
        out_plus = func(*plus_args, **plus_kwargs)
        del plus_args, plus_kwargs
        minus_args, minus_kwargs = self._stream((args, kwargs), -1)
        if shared:
            minus_args = (copy, *minus_args[1:])
            self.twins[target] = copy
        out_minus = func(*minus_args, **minus_kwargs)
        if hasattr(out_plus, "__next__"):  # iterating a tensor
            out_plus, out_minus = list(out_plus), list(out_minus)
            self._pair(out_plus, out_minus, name)
            return iter(out_plus)
        self._pair(out_plus, out_minus, name)
        return out_plus

    def _pair(self, plus: Any, minus: Any, where: str) -> None:
        """Record each stream-2 tensor of ``minus`` as the twin of the stream-1 tensor in the same place."""
        if isinstance(plus, torch.Tensor) and isinstance(minus, torch.Tensor):
            if plus is not minus:
                self.twins[plus] = minus
            return
        if isinstance(plus, (list, tuple)) and isinstance(minus, (list, tuple)) and len(plus) == len(minus):
            for a, b in zip(plus, minus):
                self._pair(a, b, where)
            return
        if isinstance(plus, dict) and isinstance(minus, dict) and plus.keys() == minus.keys():
            for k in plus:
                self._pair(plus[k], minus[k], where)
            return
        if isinstance(plus, _SCALARS) and isinstance(minus, _SCALARS):
            same = plus == minus or (isinstance(plus, float) and math.isnan(plus) and math.isnan(minus))
            if same:
                return
            raise RuntimeError(
                f"ZO2 offload: {where} returned {plus!r} on the +eps stream and {minus!r} on the -eps stream: the "
                "model's code outside the transformer blocks branches on (or reads out) perturbed values, which one "
                "forward cannot follow for both streams. Use ZOConfig(offload='none') for this model"
            )
        raise RuntimeError(
            f"ZO2 offload: {where} returned {type(plus).__name__} from perturbed inputs outside the transformer blocks, "
            "which the engine cannot keep per stream. Use ZOConfig(offload='none') for this model"
        )

    # ---------------------------------------------------------------- the two perturbed losses
    @torch.no_grad()
    def perturbed_losses(self, loss_fn: Callable[[], torch.Tensor], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(L(theta + eps z), L(theta - eps z))`` with z from ``seed``; each block uploaded once.

        The first call also checks, before any update, that the forward used every trainable parameter (an unused
        one could only reach the loss through an operation the engine cannot see; ``ValueError``) and that the
        -eps stream's loss equals that of a forward run on the -eps stream alone (``RuntimeError`` otherwise).
        """
        self.seed, self.world, self.twins = seed, 0, WeakIdKeyDictionary()
        self.seen = None if self.checked else set()
        try:
            with _DualMode(self):
                loss_plus = loss_fn()
            loss_minus = self.twins.get(loss_plus)
            if loss_minus is None:
                raise RuntimeError(
                    "ZO2 offload: the loss does not depend on the perturbed parameters through operations the engine "
                    "can see (a custom kernel outside the transformer blocks?); use ZOConfig(offload='none') for this "
                    "model"
                )
            if not self.checked:
                self._check_all_parameters_used()
                self._check_against_one_stream(loss_fn, loss_plus, loss_minus)
                self.checked = True
        finally:
            self.world, self.twins, self.seen = None, None, None
        return loss_plus, loss_minus

    def _check_against_one_stream(self, loss_fn: Callable[[], torch.Tensor], plus: torch.Tensor, minus: torch.Tensor):
        """Run the forward once more on the -eps stream alone (every parameter read as theta - eps z, nothing to
        mirror) and compare its loss with the -eps twin of the two-stream pass.

        The two execute the same operations on the same values, so they agree to the bit on deterministic kernels.
        An operation outside the blocks that the mode cannot see (a custom kernel called directly) or any other side
        channel between the streams hands stream-1 values to stream 2 and moves the twin towards L+; the tolerance
        (5% of |L+ - L-|, plus a few ulps of L) separates that from nondeterministic kernels. Costs one forward, once.
        """
        self.world, self.seen = -1, None
        with _DualMode(self):
            alone = float(loss_fn())
        lp, lm = float(plus), float(minus)
        tolerance = 0.05 * abs(lp - lm) + 64 * torch.finfo(minus.dtype).eps * max(abs(lm), 1.0)
        if not abs(alone - lm) <= tolerance:
            raise RuntimeError(
                f"ZO2 offload: the -eps loss of the offloaded forward ({lm!r}) differs from a forward on the -eps "
                f"parameters alone ({alone!r}; L+ = {lp!r}): an operation outside the transformer blocks passes values "
                "between the two streams that the engine cannot see (a custom kernel, a side channel). Use "
                "ZOConfig(offload='none') for this model"
            )

    def _check_all_parameters_used(self) -> None:
        unused = sorted(self.names.get(k, "?") for k in self.index if k not in self.seen)
        if unused:
            shown = ", ".join(unused[:8]) + (f" and {len(unused) - 8} more" if len(unused) > 8 else "")
            raise ValueError(
                f"ZO2 offloading refuses this model: the forward never used the trainable parameter(s) {shown} through "
                "an operation it can perturb (unused, or read by a custom kernel outside the transformer blocks), so "
                "the offloaded path could not perturb them as plain MeZO does. Freeze them (requires_grad=False) or "
                "use ZOConfig(offload='none')"
            )
