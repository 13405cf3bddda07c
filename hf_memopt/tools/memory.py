"""Measured memory: what each part of training really holds, not an estimate.

Four tensor categories are counted by walking the real tensors (each storage once, so views and tied weights are not
double counted), plus the process peak:

* ``parameters``: parameter storages, including bitsandbytes quantization state (absmax, code tables);
* ``buffers``: module buffers, where methods keep non-trainable weights (LoQT's quantized weights and projections,
  VeLoRA's vectors) besides the models' own small buffers (rotary tables, position ids);
* ``gradients``: the peak of live ``.grad`` bytes, sampled by gradient hooks during backward, so methods that free
  each gradient as soon as it is used (layer-wise GaLore) are credited for it;
* ``optimizer_state``: every tensor in the optimizer state (moments, 8-bit states and their absmax, projectors,
  accumulators);
* ``activations``: the peak, over micro-batches, of unique storages saved for backward, recorded with
  ``torch.autograd.graph.saved_tensors_hooks`` (parameters saved by ops are excluded; they are counted above);
* ``peak_process``: ``torch.cuda.max_memory_allocated`` on CUDA, otherwise the peak resident set size (VmHWM).

``MemoryReportCallback`` records these during ``Trainer.train()``, logs them as ``mem/*_mb`` beside the loss and prints
a table at the end; ``add_memory_report(trainer)`` puts it where the reporters (``report_to``) and the printed logs see
those figures. ``plot_memory_breakdown`` draws several runs as stacked bars.
"""

from __future__ import annotations

import logging
import resource
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
from torch import nn
from transformers import TrainerCallback

from hf_memopt.shared.optim_state import unwrap_optimizer

__all__ = [
    "GradientMeter",
    "MemoryBreakdown",
    "MemoryReportCallback",
    "SavedActivationMeter",
    "add_memory_report",
    "format_breakdown_table",
    "buffer_bytes",
    "gradient_bytes",
    "optimizer_state_bytes",
    "parameter_bytes",
    "peak_process_bytes",
    "plot_memory_breakdown",
    "reset_peak_process",
    "tensor_bytes",
]

logger = logging.getLogger(__name__)
MB = 2**20


@dataclass
class MemoryBreakdown:
    """Bytes held by each part of training (peaks over the steps observed)."""

    parameters: int = 0
    gradients: int = 0
    optimizer_state: int = 0
    activations: int = 0
    peak_process: int = 0
    peak_process_source: str = ""
    buffers: int = 0

    TENSOR_PARTS = ("parameters", "buffers", "gradients", "optimizer_state", "activations")

    @property
    def tensors_total(self) -> int:
        return sum(getattr(self, part) for part in self.TENSOR_PARTS)

    def merge_peak(self, other: MemoryBreakdown) -> None:
        """Keep, part by part, the larger of ``self`` and ``other``."""
        for f in fields(self):
            if f.name != "peak_process_source":
                setattr(self, f.name, max(getattr(self, f.name), getattr(other, f.name)))
        self.peak_process_source = other.peak_process_source or self.peak_process_source

    def as_log(self) -> dict[str, float]:
        """Megabyte figures keyed for the Trainer logs (``mem/optimizer_state_mb`` ...)."""
        logs = {f"mem/{part}_mb": round(getattr(self, part) / MB, 3) for part in self.TENSOR_PARTS}
        logs["mem/peak_process_mb"] = round(self.peak_process / MB, 3)
        return logs

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _storage_key(t: torch.Tensor) -> tuple[str, int]:
    return (str(t.device), t.untyped_storage().data_ptr())


def _quant_state_tensors(obj: Any) -> list[torch.Tensor]:
    """Tensors hidden in a bitsandbytes ``QuantState`` (absmax, code, nested state)."""
    out: list[torch.Tensor] = []
    state = getattr(obj, "quant_state", None)
    stack = [state] if state is not None else []
    while stack:
        s = stack.pop()
        for value in vars(s).values():
            if isinstance(value, torch.Tensor):
                out.append(value)
            elif hasattr(value, "absmax"):
                stack.append(value)
    for name in ("SCB", "CB"):  # Int8Params keep their scale outside quant_state
        value = getattr(obj, name, None)
        if isinstance(value, torch.Tensor):
            out.append(value)
    return out


def _walk_tensors(obj: Any, depth: int = 0) -> Iterable[torch.Tensor]:
    """Tensors inside ``obj``: containers, and the attributes of plain objects kept in optimizer state (galore-torch
    keeps its projector in a ``GaLoreProjector`` object; its tensors are state too)."""
    if isinstance(obj, torch.Tensor):
        yield obj
        yield from _quant_state_tensors(obj)
    elif depth > 4:
        return
    elif isinstance(obj, Mapping):
        for value in obj.values():
            yield from _walk_tensors(value, depth + 1)
    elif isinstance(obj, (list, tuple)):
        for value in obj:
            yield from _walk_tensors(value, depth + 1)
    elif hasattr(obj, "__dict__") and not isinstance(obj, (type, nn.Module)):
        yield from _walk_tensors(vars(obj), depth + 1)


def tensor_bytes(tensors: Iterable[torch.Tensor], exclude: set[tuple[str, int]] | None = None) -> int:
    """Bytes of the unique storages behind ``tensors`` (a storage shared by several views counts once)."""
    seen = set(exclude or ())
    total = 0
    for t in tensors:
        if t.device.type == "meta":
            continue
        key = _storage_key(t)
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total


def _parameter_storage_keys(model: nn.Module) -> set[tuple[str, int]]:
    return {_storage_key(p) for p in model.parameters()}


def parameter_bytes(model: nn.Module) -> int:
    """Bytes of all parameters (trainable or not), quantization state included; buffers are not counted."""
    return tensor_bytes(_walk_tensors(list(model.parameters())))


def buffer_bytes(model: nn.Module) -> int:
    """Bytes of all module buffers (storages shared with parameters excluded)."""
    return tensor_bytes(model.buffers(), exclude=_parameter_storage_keys(model))


def gradient_bytes(model: nn.Module) -> int:
    """Bytes of the ``.grad`` tensors alive right now."""
    return tensor_bytes(p.grad for p in model.parameters() if p.grad is not None)


def optimizer_state_bytes(optimizer: Any) -> int:
    """Bytes of every tensor in the optimizer state, including 8-bit states, absmax tables and projectors.

    Handles accelerate's wrapper, transformers' ``LayerWiseDummyOptimizer`` (whose real optimizers sit in
    ``optimizer_dict``) and wrappers that keep their state in a ``base_optimizer`` (BAdam's ``BlockOptimizer``).
    """
    optimizer = unwrap_optimizer(optimizer)
    optimizers = list(getattr(optimizer, "optimizer_dict", {}).values()) or [optimizer]
    base = getattr(optimizer, "base_optimizer", None)
    if isinstance(base, torch.optim.Optimizer):
        optimizers.append(base)
    params = [p for opt in optimizers for g in opt.param_groups for p in g["params"]]
    exclude = {_storage_key(p) for p in params}
    return tensor_bytes((t for opt in optimizers for t in _walk_tensors(list(opt.state.values()))), exclude)


def peak_process_bytes(device: torch.device | str | None = None) -> tuple[int, str]:
    """``(bytes, source)``: CUDA peak allocation on a CUDA device, else the process's peak RSS."""
    device = torch.device(device) if device is not None else None
    if device is not None and device.type == "cuda":
        return torch.cuda.max_memory_allocated(device), "cuda_max_memory_allocated"
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024, "peak_rss"
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "peak_rss"


def reset_peak_process(device: torch.device | str | None = None) -> bool:
    """Reset the process peak so it covers only what follows; returns False when the platform cannot."""
    device = torch.device(device) if device is not None else None
    if device is not None and device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return True
    try:  # Linux: writing 5 to clear_refs resets VmHWM to the current RSS
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class SavedActivationMeter:
    """Counts unique storages saved for backward, per forward pass, with ``saved_tensors_hooks``.

    Storages shared by several saved tensors (q/k/v projections all saving one normalised hidden state) count once,
    which is what frees memory or not. Parameter storages are excluded.

    Use as a context manager around forward passes; call :meth:`end_pass` after each micro-batch.
    """

    def __init__(self, model: nn.Module | None = None):
        self._model = model
        self._exclude: set[tuple[str, int]] = set()
        self._seen: set[tuple[str, int]] = set()
        self.current = 0
        self.peak = 0
        self._ctx = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        if t.device.type != "meta":
            key = _storage_key(t)
            if key not in self._seen and key not in self._exclude:
                self._seen.add(key)
                self.current += t.untyped_storage().nbytes()
                self.peak = max(self.peak, self.current)
        return t

    @staticmethod
    def _unpack(t: torch.Tensor) -> torch.Tensor:
        return t

    def end_pass(self) -> None:
        self._seen.clear()
        self.current = 0
        if self._model is not None:
            self._exclude = _parameter_storage_keys(self._model)

    def __enter__(self) -> SavedActivationMeter:
        self.end_pass()
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._ctx.__exit__(*exc)


class GradientMeter:
    """Peak bytes of live ``.grad`` tensors during backward, sampled by a hook on each parameter.

    The hook runs when a parameter's gradient arrives (before it is accumulated into ``.grad``), so a method that
    frees gradients inside backward (layer-wise updates) shows its real, lower peak.
    """

    def __init__(self, model: nn.Module):
        self.peak = 0
        self._live: dict[int, tuple[nn.Parameter, int]] = {}
        self._handles = [
            p.register_hook(self._make_hook(p))
            for p in {id(p): p for p in model.parameters()}.values()
            if p.requires_grad
        ]

    def _make_hook(self, param: nn.Parameter):
        def hook(grad: torch.Tensor) -> None:
            self._live = {k: v for k, v in self._live.items() if v[0].grad is not None}
            if param.grad is None:
                self._live[id(param)] = (param, grad.untyped_storage().nbytes())
            self.peak = max(self.peak, sum(nbytes for _, nbytes in self._live.values()))

        return hook

    def sample(self, model: nn.Module) -> None:
        """Also count the gradients alive now (before the optimizer step)."""
        self.peak = max(self.peak, gradient_bytes(model))
        self._live.clear()

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


class MemoryReportCallback(TrainerCallback):
    """Logs the measured memory breakdown into the Trainer logs and prints a table when training ends.

    Events used (the loop runs backward -> on_pre_optimizer_step -> step -> on_optimizer_step -> scheduler ->
    zero_grad -> on_step_end):

    * ``on_train_begin``: the optimizer exists; start the activation and gradient meters, reset the process peak;
    * ``on_pre_optimizer_step``: gradients of the update are complete; sample them;
    * ``on_substep_end`` / ``on_step_end``: a micro-batch is over; close its activation count and record the
      optimizer state (after the step, so lazily created state is included);
    * ``on_log``: add ``mem/*_mb`` figures; ``on_train_end``: print the table and keep it as ``self.breakdown``.

    The Trainer hands one ``logs`` dict to its callbacks in order, and the reporting callbacks of ``report_to``
    (TensorBoard, Weights & Biases ...) and the progress printer write it as soon as they see it; callbacks given to
    ``Trainer(callbacks=...)`` or ``add_callback`` come after them. Use :func:`add_memory_report` (``attach`` also
    moves one already given) so the figures are added first and reach every reporter beside the loss.
    """

    def __init__(self, track_activations: bool = True, track_gradients: bool = True, print_table: bool = True):
        self.track_activations = track_activations
        self.track_gradients = track_gradients
        self.print_table = print_table
        self.breakdown = MemoryBreakdown()
        self._activations: SavedActivationMeter | None = None
        self._gradients: GradientMeter | None = None
        self._model: nn.Module | None = None
        self._optimizer: Any = None
        self._device: torch.device | None = None

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        self._model, self._optimizer = model, optimizer
        self._device = next(model.parameters()).device
        self.breakdown = MemoryBreakdown()
        reset_peak_process(self._device)
        if self.track_activations:
            self._activations = SavedActivationMeter(model).__enter__()
        if self.track_gradients:
            self._gradients = GradientMeter(model)

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if self._gradients is not None:
            self._gradients.sample(self._model)
        if self._model is not None:  # weights as forward / backward held them (a method may free some in its step,
            # e.g. LoQT's full-precision W at the initialising merge), besides ``_record``'s at the step's end
            self.breakdown.merge_peak(
                MemoryBreakdown(parameters=parameter_bytes(self._model), buffers=buffer_bytes(self._model))
            )

    def _record(self) -> None:
        if self._model is None:
            return
        peak, source = peak_process_bytes(self._device)
        self.breakdown.merge_peak(
            MemoryBreakdown(
                parameters=parameter_bytes(self._model),
                buffers=buffer_bytes(self._model),
                gradients=self._gradients.peak if self._gradients else gradient_bytes(self._model),
                optimizer_state=optimizer_state_bytes(self._optimizer) if self._optimizer is not None else 0,
                activations=self._activations.peak if self._activations else 0,
                peak_process=peak,
                peak_process_source=source,
            )
        )
        if self._activations is not None:
            self._activations.end_pass()

    def on_substep_end(self, args, state, control, **kwargs):
        if self._activations is not None:
            self._activations.end_pass()

    def on_step_end(self, args, state, control, **kwargs):
        self._record()

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is not None and self._model is not None and "loss" in logs:
            figures = self.breakdown.as_log()
            logs.update(figures)
            if state.log_history and state.log_history[-1].get("step") == state.global_step:
                state.log_history[-1].update(figures)

    def on_train_end(self, args, state, control, **kwargs):
        self._record()
        if self._activations is not None:
            self._activations.__exit__(None, None, None)
            self._activations = None
        if self._gradients is not None:
            self._gradients.remove()
            self._gradients = None
        self._model = self._optimizer = None
        if self.print_table and state.is_world_process_zero:
            print(format_breakdown_table({"this run": self.breakdown}))


def add_memory_report(trainer: Any, callback: MemoryReportCallback | None = None) -> MemoryReportCallback:
    """Put a :class:`MemoryReportCallback` first among ``trainer``'s callbacks and return it.

    ``on_log`` is called on the callbacks in list order with one ``logs`` dict (``CallbackHandler.call_event``), so
    the callback that adds ``mem/*_mb`` must come before the reporting callbacks and the printer, which write the
    dict when they see it. ``callback=None`` moves the ``MemoryReportCallback`` the trainer already has (given to
    ``Trainer(callbacks=...)``), or adds a new one when it has none; a given ``callback`` is added (or moved).
    """
    callbacks = trainer.callback_handler.callbacks
    if callback is None:
        callback = (
            next((cb for cb in callbacks if isinstance(cb, MemoryReportCallback)), None) or MemoryReportCallback()
        )
    if any(cb is callback for cb in callbacks):
        callbacks.remove(callback)
    callbacks.insert(0, callback)
    return callback


def format_breakdown_table(runs: Mapping[str, MemoryBreakdown]) -> str:
    """A Markdown table (MB) of several runs' breakdowns."""
    header = "| run | parameters | buffers | gradients | optimizer state | activations | tensors total | peak process |"
    lines = [header, "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, b in runs.items():
        cells = [getattr(b, p) / MB for p in MemoryBreakdown.TENSOR_PARTS] + [b.tensors_total / MB, b.peak_process / MB]
        lines.append(f"| {name} | " + " | ".join(f"{c:.1f}" for c in cells) + " |")
    source = next((b.peak_process_source for b in runs.values() if b.peak_process_source), "")
    if source:
        lines.append(f"\nMB = 2^20 bytes; peak process = {source}.")
    return "\n".join(lines)


def plot_memory_breakdown(runs: Mapping[str, MemoryBreakdown], path: str, title: str = "Memory breakdown") -> str:
    """Draw ``runs`` as stacked bars (parameters, buffers, gradients, optimizer state, activations); save a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(runs)
    fig, ax = plt.subplots(figsize=(max(5.0, 1.1 * len(names) + 2), 4.2))
    bottom = [0.0] * len(names)
    colors = ("#4C72B0", "#8172B3", "#DD8452", "#55A868", "#C44E52")
    for part, color in zip(MemoryBreakdown.TENSOR_PARTS, colors):
        values = [getattr(runs[n], part) / MB for n in names]
        ax.bar(names, values, bottom=bottom, label=part.replace("_", " "), color=color)
        bottom = [b + v for b, v in zip(bottom, values)]
    ax.set_ylabel("MB")
    ax.set_title(title)
    ax.legend(fontsize=8)
    plt.setp(ax.get_xticklabels(), rotation=30, ha="right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
