"""Wall time and process CPU time per optimizer update, measured inside the Trainer loop.

On a shared machine wall time swings with other jobs' load; the process's CPU time (all its threads) measures the work
a step does and is far steadier, so benchmarks report both.
"""

from __future__ import annotations

import statistics
import time
from collections import deque

from transformers import TrainerCallback

__all__ = ["StepTimerCallback"]


class StepTimerCallback(TrainerCallback):
    """Records wall and CPU time of each update, from ``on_step_begin`` (first micro-batch) to ``on_step_end``.

    The medians skip the first ``warmup`` updates (lazy state allocation, first projector refresh) and cover at most
    the last ``window`` updates: the record is bounded, so a run of any length holds the same memory.
    """

    def __init__(self, warmup: int = 1, window: int = 10_000):
        self.warmup = warmup
        self.seconds: deque[float] = deque(maxlen=warmup + window)
        self.cpu_seconds: deque[float] = deque(maxlen=warmup + window)
        self.updates = 0
        self._start = (0.0, 0.0)

    def on_step_begin(self, args, state, control, **kwargs):
        self._start = (time.perf_counter(), time.process_time())

    def on_step_end(self, args, state, control, **kwargs):
        self.updates += 1
        self.seconds.append(time.perf_counter() - self._start[0])
        self.cpu_seconds.append(time.process_time() - self._start[1])

    def _median(self, values: deque[float]) -> float:
        # the warm-up updates are still in the window until more than `warmup + window` updates ran
        skip = max(0, self.warmup - (self.updates - len(values)))
        kept = list(values)[skip:] or list(values)
        return statistics.median(kept) if kept else float("nan")

    @property
    def median_step_seconds(self) -> float:
        return self._median(self.seconds)

    @property
    def median_step_cpu_seconds(self) -> float:
        return self._median(self.cpu_seconds)
