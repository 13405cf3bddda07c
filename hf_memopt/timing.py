"""Wall time and process CPU time per optimizer update, measured inside the Trainer loop.

On a shared machine wall time swings with other jobs' load; the process's CPU time (all its threads) measures the work
a step does and is far steadier, so benchmarks report both.
"""

from __future__ import annotations

import statistics
import time

from transformers import TrainerCallback

__all__ = ["StepTimerCallback"]


class StepTimerCallback(TrainerCallback):
    """Records wall and CPU time of each update, from ``on_step_begin`` (first micro-batch) to ``on_step_end``.

    The medians skip the first ``warmup`` updates (lazy state allocation, first projector refresh).
    """

    def __init__(self, warmup: int = 1):
        self.warmup = warmup
        self.seconds: list[float] = []
        self.cpu_seconds: list[float] = []
        self._start = (0.0, 0.0)

    def on_step_begin(self, args, state, control, **kwargs):
        self._start = (time.perf_counter(), time.process_time())

    def on_step_end(self, args, state, control, **kwargs):
        self.seconds.append(time.perf_counter() - self._start[0])
        self.cpu_seconds.append(time.process_time() - self._start[1])

    def _median(self, values: list[float]) -> float:
        kept = values[self.warmup :] or values
        return statistics.median(kept) if kept else float("nan")

    @property
    def median_step_seconds(self) -> float:
        return self._median(self.seconds)

    @property
    def median_step_cpu_seconds(self) -> float:
        return self._median(self.cpu_seconds)
