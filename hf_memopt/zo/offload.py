"""ZO2-style execution (arXiv 2503.12668): blocks offloaded, both perturbed forwards per block upload.

ZO2's official code (``MeZO2SGD.inner_zo_forward``) rewrites a model's forward by hand into two streams: every
block runs ``module_dual_forward`` (its +eps z forward on stream 1, then its -eps z forward on stream 2, on one
upload) and every operation between blocks runs ``function_dual_forward`` (the same function on both streams). This
engine does the same for any Hugging Face model without rewriting it: the model's own ``forward`` runs once, and

* every transformer block (the list found by :func:`~hf_memopt.zo.blocks.find_block_list`) is wrapped; its
  parameters live in CPU memory (pinned with CUDA, optionally in bf16/fp16) and are uploaded when it runs. A call
  runs the block twice on that upload (``torch.func.functional_call``), stream 1's inputs first, then stream 2's;
  the upload (on a CPU, a copy of the trainable parameters) is perturbed in place, by +eps z, then by -2 eps z, as
  plain MeZO moves its parameters, so the device holds the working block and the prefetched one and nothing else of
  the blocks; the stored parameters are never perturbed. The pending update of the previous ``optimizer.step()`` is
  applied at upload and written back, so each block crosses the bus once per step each way;
* every PyTorch operation outside the blocks (embeddings, positional tables, norms, the head, the glue between
  blocks, the model's loss code, the Trainer's scaling of the loss) is seen through a ``TorchFunctionMode`` and,
  when one of its inputs belongs to stream 2 or is a trainable parameter, run once per stream: trainable
  parameters become theta + eps z on stream 1 and theta - eps z on stream 2 wherever they are used (a module call,
  a tied head read as ``embed.weight``, a positional table sliced directly, a parameter owned by the model itself).

The model only ever sees stream 1; each of its tensors that differs on stream 2 has a twin (a weak map, so
activations are freed as usual). The -eps run of an operation outside the blocks is deferred until its result is
needed: by a block (its inputs), by an in-place write (which might change what it reads), or by the loss at the end.
So each stream's tail (final norm, head, loss) runs alone, after the model's +eps outputs are freed, as in plain
MeZO: never both streams' logits beside one stream's ``log_softmax``. The model's loss is L(theta + eps z); its twin
is L(theta - eps z). Nothing is
stacked or split along the batch, so tensors whose leading dimension is not the batch (T5's position bias, MoE
router logits over tokens) and inputs that later blocks read from outside the block chain (BART's encoder states)
are exact. Parameters used *inside* a block but owned outside it are perturbed there too.

Refused, never trained wrongly (see ``docs/methods/zo.md``): a trainable block parameter shared with a module
outside its block (``ValueError`` at construction); a trainable parameter the first forward never used (it could
only reach the loss through an operation the mode cannot see: a custom kernel); a loss with no stream-2 twin (the
same cause); operations outside the blocks whose non-tensor result differs between the streams (``.item()``,
``bool()``: data-dependent control flow); in-place writes of stream-2 values into a view or an ``out=`` tensor; an
in-place write the mode cannot see into a tensor a deferred -eps operation reads; a KV cache handed to a block (both
streams would append to it).

Blocks run without the mode (each operation dispatched through Python costs microseconds, most of the engine's
overhead over plain MeZO) once the first perturbed pass saw them read no trainable parameter owned outside them.
"""

from __future__ import annotations

import itertools
import math
import weakref
from collections.abc import Callable
from contextlib import ExitStack, contextmanager, nullcontext
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


def _walk(obj: Any, fn: Callable[[Any], Any], leaf: type | tuple[type, ...] = torch.Tensor) -> Any:
    """``obj`` with ``fn`` applied to each ``leaf`` (a tensor), rebuilding tuples (named too), lists and dicts."""
    if isinstance(obj, leaf):
        return fn(obj)
    if isinstance(obj, (list, tuple)):
        items = [_walk(o, fn, leaf) for o in obj]
        if isinstance(obj, list):
            return items
        if hasattr(obj, "_fields"):
            return type(obj)(*items)
        return tuple(items) if type(obj) is tuple else type(obj)(items)
    if isinstance(obj, dict):
        mapped = {k: _walk(v, fn, leaf) for k, v in obj.items()}
        return mapped if type(obj) is dict else type(obj)(**mapped)
    return obj


def _leaves(obj: Any, kind: type = torch.Tensor):
    """The ``kind`` instances among an operation's (nested list / tuple / dict) arguments or results."""
    if isinstance(obj, kind):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for o in obj:
            yield from _leaves(o, kind)
    elif isinstance(obj, dict):
        for o in obj.values():
            yield from _leaves(o, kind)


def _name(func: Any) -> str:
    return getattr(func, "__name__", type(func).__name__)


class _DualMode(TorchFunctionMode):
    """Routes every PyTorch operation of the model's forward to :meth:`ZO2Engine._dispatch`."""

    def __init__(self, engine: ZO2Engine):
        super().__init__()
        self.engine = engine

    def __torch_function__(self, func, types, args=(), kwargs=None):
        return self.engine._dispatch(func, args, kwargs or {})


class _Deferred:
    """The -eps stream's result of one operation outside the blocks, computed when it is first needed.

    ``args``/``kwargs`` hold what stream 2 reads, resolved when the operation was seen: twins (tensors or
    :class:`_Twin`), :class:`_Param` markers (perturbed by -eps z when computed, one copy alive at a time) and the
    tensors both streams share. Computing drops them, so a twin lives only while a stream-1 tensor or a pending
    operation refers to it.
    """

    __slots__ = ("func", "args", "kwargs", "autocast", "versions", "order", "value", "done", "__weakref__")

    def __init__(self, func, args, kwargs, autocast, versions, order):
        self.func, self.args, self.kwargs, self.autocast, self.versions = func, args, kwargs, autocast, versions
        self.order, self.value, self.done = order, None, False


class _Twin:
    """One tensor of a :class:`_Deferred` result: ``path`` indexes into it."""

    __slots__ = ("node", "path")

    def __init__(self, node: _Deferred, path: tuple):
        self.node, self.path = node, path


class _Param:
    """A trainable parameter outside the blocks, read as theta - eps z when the deferred operation runs."""

    __slots__ = ("p",)

    def __init__(self, p: torch.Tensor):
        self.p = p


def _autocast_state() -> tuple | None:
    """The autocast settings a deferred operation must run under (``None``: autocast off everywhere)."""
    state = tuple((d, torch.get_autocast_dtype(d)) for d in ("cpu", "cuda") if torch.is_autocast_enabled(d))
    return state or None


@contextmanager
def _autocast(state: tuple | None):
    """Run under the autocast settings ``state`` recorded (a deferred operation may run after the model's
    ``autocast`` region has closed: the Trainer's ``compute_loss_context_manager``)."""
    wanted = dict(state or ())
    with ExitStack() as stack:
        for device in ("cpu", "cuda"):
            dtype = wanted.get(device)
            if dtype is None and torch.is_autocast_enabled(device):
                stack.enter_context(torch.autocast(device, enabled=False))
            elif dtype is not None and not (
                torch.is_autocast_enabled(device) and torch.get_autocast_dtype(device) == dtype
            ):
                stack.enter_context(torch.autocast(device, dtype=dtype))
        yield


def _tensor_leaves(obj: Any, path: tuple = ()):
    """``(path, tensor)`` for each tensor of a (nested) operation result."""
    if isinstance(obj, torch.Tensor):
        yield path, obj
    elif isinstance(obj, (list, tuple)):
        for i, o in enumerate(obj):
            yield from _tensor_leaves(o, (*path, i))
    elif isinstance(obj, dict):
        for k, o in obj.items():
            yield from _tensor_leaves(o, (*path, k))


def _only_tensors(obj: Any) -> bool:
    """Whether a result holds nothing but tensors and ``None`` (else its values must be compared across streams)."""
    if obj is None or isinstance(obj, torch.Tensor):
        return True
    if isinstance(obj, (list, tuple)):
        return all(_only_tensors(o) for o in obj)
    if isinstance(obj, dict):
        return all(_only_tensors(o) for o in obj.values())
    return False


class _Block:
    def __init__(self, name: str, module: nn.Module, index: int):
        self.name, self.module, self.index = name, module, index
        self.params = list(module.named_parameters(remove_duplicate=True))
        self.trainable = [(n, p) for n, p in self.params if p.requires_grad]
        self.compute_dtype = {n: p.dtype for n, p in self.params}
        self.busy = False
        # None: unknown; False: the first perturbed pass saw no parameter owned outside the block used inside it, so
        # later passes run the block without the mode (each operation dispatched through Python costs microseconds)
        self.reads_outside: bool | None = None
        self.offset = 0  # the working copy holds theta + offset * eps * z (trainable parameters)
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
        self.twins: WeakIdKeyDictionary | None = None  # stream-1 tensor -> its stream-2 tensor or _Twin
        self.pending: list[weakref.ref[_Deferred]] = []  # deferred -eps operations, in program order
        self.counter = itertools.count()
        self.seen: set[int] | None = None  # trainable parameters the first perturbed pass used
        self.checked = False
        self.seed = 0
        self.mode: _DualMode | None = None
        self.running: list[_Block] = []  # blocks whose forward is running (nested calls: several)
        self.seen_blocks: set[_Block] = set()  # blocks the first perturbed pass ran
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
    def _upload(self, block: _Block, private: bool = True) -> dict[str, torch.Tensor]:
        """The block's parameters in their compute dtype on the compute device; ``private``: trainable ones are copies
        (always, on a device: the upload), which the perturbed forwards may perturb in place."""
        out = {}
        trainable = {n for n, _ in block.trainable} if private else ()
        for n, p in block.params:
            dtype = block.compute_dtype[n]
            if self.device is not None:
                out[n] = p.detach().to(self.device, non_blocking=True).to(dtype)
            elif n in trainable:
                out[n] = p.detach().to(dtype, copy=True)
            else:
                out[n] = p if p.dtype == dtype else p.detach().to(dtype)
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
            working = self._upload(block, private=self.world is not None)
        block.offset = 0
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
        """The engine's own tensor work (uploads, perturbations, updates): not mirrored, and not dispatched through
        the mode at all where it can be left (hundreds of small operations a step)."""
        self.raw += 1
        try:
            with compat.without_innermost_function_mode(self.mode):
                yield
        finally:
            self.raw -= 1

    def _call(self, block: _Block, sign: int, args: tuple, kwargs: dict) -> Any:
        """One forward of ``block`` on stream ``sign`` (+1: theta + eps z, -1: theta - eps z, 0: theta)."""
        with self._engine_work():
            params = self._working(block)
            self._perturb_working(block, params, sign)
        outer, self.world = self.world, (sign if self.world is not None else None)
        block.busy = True
        self.running.append(block)
        try:
            if sign == 0 and all(params[n] is p for n, p in block.params):
                return block.orig_forward(*args, **kwargs)
            with compat.without_innermost_function_mode(self.mode) if block.reads_outside is False else nullcontext():
                return torch.func.functional_call(block.module, params, args, kwargs, strict=False)
        finally:
            self.running.pop()
            block.busy = False
            self.world = outer

    def _perturb_working(self, block: _Block, params: dict[str, torch.Tensor], sign: int) -> None:
        """Move the block's private working copy to theta + sign * eps * z in place.

        The +eps forward runs first, then the -eps one, on the one upload: ``+eps z``, then ``-2 eps z``, as plain
        MeZO moves its parameters (so the -eps values are bit for bit plain MeZO's, a -eps-only forward included).
        In place, the device holds the working copy and the prefetched block, no perturbed copy besides; the stored
        parameters are never touched."""
        if block.offset == sign:
            return
        steps = (1, -2) if (block.offset, sign) == (0, -1) else (sign - block.offset,)
        for n, p in block.trainable:
            z = perturbation(params[n], self.seed, self.index[id(p)])
            for k in steps:
                params[n].add_(z, alpha=k * self.eps)
            del z
        block.offset = sign

    def _forward(self, block: _Block, args: tuple, kwargs: dict) -> Any:
        if block.busy:  # functional_call re-entering the wrapper
            return block.orig_forward(*args, **kwargs)
        try:
            if self.world != 0:  # no perturbed pass (evaluation, flush) or nested in a block's stream
                return self._call(block, self.world or 0, args, kwargs)
            self._refuse_shared_state(block, args, kwargs)
            self._flush_pending()  # the block may write in place into a tensor a pending operation reads
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
                self.seen_blocks.add(block)
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
            z = perturbation(p.detach(), self.seed, self.index[key])
            return torch.add(p.detach(), z, alpha=sign * self.eps, out=z)  # written over z: one copy, not two

    def _is_param(self, t: torch.Tensor) -> bool:
        key = id(t)
        return (key in self.resident and self.resident[key] is t) or key in self.block_params

    def _stream(self, obj: Any, sign: int) -> Any:
        """``obj`` as stream ``sign`` sees it: parameters perturbed, stream-1 tensors replaced by their twins."""

        def swap(t: torch.Tensor) -> torch.Tensor:
            if self._is_param(t):
                return self._perturbed(t, sign)
            if sign < 0:
                twin = self.twins.get(t, t)
                return self._materialize(twin) if isinstance(twin, _Twin) else twin
            return t

        return _walk(obj, swap)

    def _dual(self, obj: Any) -> bool:
        return any(self._is_param(t) or t in self.twins for t in _leaves(obj))

    def _dispatch(self, func: Any, args: tuple, kwargs: dict) -> Any:
        if self.raw or self.world is None:
            return func(*args, **kwargs)
        name = _name(func)
        if self.world != 0:  # inside a block's stream: only parameters owned outside it need perturbing
            if not any(self._is_param(t) for t in _leaves((args, kwargs))):
                return func(*args, **kwargs)
            for block in self.running:
                block.reads_outside = True
            if name in _METADATA:
                out = func(*args, **kwargs)
                if not any(True for _ in _leaves(out)):
                    return out
            args, kwargs = self._stream((args, kwargs), self.world)
            return func(*args, **kwargs)
        inplace = name in _INPLACE_DUNDERS or (name.endswith("_") and not name.startswith("__"))
        if (inplace or "out" in kwargs) and self.pending:
            self._flush_pending()  # a pending -eps operation may read the tensor this one writes
        if not self._dual((args, kwargs)):
            return func(*args, **kwargs)
        if name in _METADATA:
            out = func(*args, **kwargs)
            if not any(True for _ in _leaves(out)):
                return out
        if "out" in kwargs:
            raise RuntimeError(
                f"ZO2 offload: {name}(out=...) outside the transformer blocks takes perturbed inputs; the two streams "
                "cannot share its output. Use ZOConfig(offload='none') for this model"
            )
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
        if not inplace and not hasattr(out_plus, "__next__") and _only_tensors(out_plus):
            self._defer(func, args, kwargs, out_plus)
            return out_plus
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

    # ---------------------------------------------------------------- the -eps stream, computed when needed
    def _defer(self, func: Any, args: tuple, kwargs: dict, out_plus: Any) -> None:
        """Record the -eps run of ``func`` instead of running it now; its results become :class:`_Twin` s.

        Run at once, the -eps result would sit beside the +eps one until both are consumed: at the head, both streams'
        logits plus the loss's ``log_softmax`` of one of them (1.5x the activations of a plain forward at twice the
        batch, measured by ``scripts/zo2_working_set.py``). Deferred, it is computed when a block needs it as input,
        or at the end, when the model's +eps outputs are gone: each stream's tail runs alone, as in plain MeZO.
        """
        shared: list[torch.Tensor] = []

        def minus_side(t: torch.Tensor) -> Any:
            if self._is_param(t):
                return _Param(t)
            twin = self.twins.get(t)
            if twin is not None:
                return twin
            shared.append(t)
            return t

        margs, mkwargs = _walk((args, kwargs), minus_side)
        versions = [(t, t._version) for t in shared if not t.is_inference()]
        node = _Deferred(func, margs, mkwargs, _autocast_state(), versions, next(self.counter))
        self.pending.append(weakref.ref(node))
        inputs = {id(t) for t in shared}
        for path, t in _tensor_leaves(out_plus):
            if id(t) not in inputs:  # a shared input handed back unchanged is the same on both streams
                self.twins[t] = _Twin(node, path)

    def _materialize(self, twin: _Twin) -> torch.Tensor:
        """The tensor ``twin`` stands for, computing its pending operations first (in program order, iteratively:
        a chain outside the blocks can be long)."""
        if not twin.node.done:
            todo, stack, queued = [], [twin.node], set()
            while stack:
                node = stack.pop()
                if node.done or id(node) in queued:
                    continue
                queued.add(id(node))
                todo.append(node)
                stack.extend(t.node for t in _leaves((node.args, node.kwargs), _Twin))
            todo.sort(key=lambda n: n.order, reverse=True)
            while todo:  # popped, so a value no later operation reads is freed as soon as its consumers ran
                self._compute(todo.pop())
        value = twin.node.value
        for key in twin.path:
            value = value[key]
        return value

    def _compute(self, node: _Deferred) -> None:
        for t, version in node.versions:
            if t._version != version:
                raise RuntimeError(
                    f"ZO2 offload: a tensor read by {_name(node.func)} outside the transformer blocks was modified in "
                    "place before its -eps stream ran, by an operation the engine cannot see; use "
                    "ZOConfig(offload='none') for this model"
                )

        def minus_value(x: _Twin | _Param) -> torch.Tensor:
            return self._perturbed(x.p, -1) if isinstance(x, _Param) else self._materialize(x)

        with self._engine_work(), _autocast(node.autocast):
            args, kwargs = _walk((node.args, node.kwargs), minus_value, (_Twin, _Param))
            node.args = node.kwargs = node.versions = None
            node.value = node.func(*args, **kwargs)
            node.done = True

    def _flush_pending(self) -> None:
        """Compute every pending -eps operation still referred to (before an in-place write or a block call)."""
        nodes = [n for n in (r() for r in reversed(self.pending)) if n is not None and not n.done]
        self.pending.clear()
        while nodes:
            node = nodes.pop()
            if not node.done:
                self._compute(node)

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
        self.mode = _DualMode(self)
        try:
            with self.mode:
                loss_plus = loss_fn()
            loss_minus = self.twins.get(loss_plus)
            if isinstance(loss_minus, _Twin):  # the tail of the -eps stream runs now, the +eps outputs freed
                loss_minus = self._materialize(loss_minus)
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
                for block in self.seen_blocks:  # what the first pass saw decides for the later ones
                    block.reads_outside = bool(block.reads_outside)
        finally:
            self.world, self.twins, self.seen, self.pending = None, None, None, []
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
        with self.mode:
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
