"""Wall time per optimizer update, measured inside the Trainer loop."""

from __future__ import annotations

import statistics
import time

from transformers import TrainerCallback

__all__ = ["StepTimerCallback"]


class StepTimerCallback(TrainerCallback):
    """Records the wall time of each update, from ``on_step_begin`` (first micro-batch) to ``on_step_end``.

    ``median_step_seconds`` skips the first ``warmup`` updates (lazy state allocation, first projector refresh).
    """

    def __init__(self, warmup: int = 1):
        self.warmup = warmup
        self.seconds: list[float] = []
        self._start = 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.seconds.append(time.perf_counter() - self._start)

    @property
    def median_step_seconds(self) -> float:
        kept = self.seconds[self.warmup :] or self.seconds
        return statistics.median(kept) if kept else float("nan")
