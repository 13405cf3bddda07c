"""One measured run: attach the methods, train, evaluate, and collect memory, time per update and losses.

The GLUE, instruction and pretraining runners differ only in how they build the trainer and what they evaluate;
everything that makes their figures comparable lives here, once.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from hf_memopt.core.attach import attach, warn_ignored_fp16
from hf_memopt.core.registry import method_name_of
from hf_memopt.tools.memory import MemoryBreakdown, MemoryReportCallback, add_memory_report
from hf_memopt.tools.modelcard import install_model_card
from hf_memopt.tools.timing import StepTimerCallback

__all__ = ["RunResult", "held_out_loss", "measured_run_arguments", "train_and_measure"]


@dataclass
class RunResult:
    """What a run measured: evaluation metrics, memory breakdown, median seconds per update, training losses."""

    method: str
    memory: MemoryBreakdown
    median_step_seconds: float
    losses: list[float] = field(default_factory=list)
    median_step_cpu_seconds: float = float("nan")
    metrics: dict[str, float] = field(default_factory=dict)
    task: str | None = None
    trainer: Any = None
    samples: list[dict[str, str]] = field(default_factory=list)  # generated answers (instruct runs)

    def summary(self) -> dict[str, Any]:
        """JSON-ready figures (``final_loss`` = mean of the last tenth of the logged losses)."""
        tail = self.losses[-max(1, len(self.losses) // 10) :]
        return {
            "task": self.task,
            "method": self.method,
            "metrics": self.metrics,
            "memory_bytes": self.memory.to_dict(),
            "median_step_seconds": self.median_step_seconds,
            "median_step_cpu_seconds": self.median_step_cpu_seconds,
            "first_loss": self.losses[0] if self.losses else None,
            "last_loss": self.losses[-1] if self.losses else None,
            "final_loss": sum(tail) / len(tail) if tail else None,
            "losses": self.losses,
        }


def measured_run_arguments(seed: int, overrides: dict[str, Any] | None, **arguments: Any) -> dict[str, Any]:
    """Training-argument values every measured run shares (no checkpoints, no reporters, seeded data order,
    in-process data loading, so timings and memory are the training's own; pinned memory only where there is an
    accelerator to copy to), then the runner's ``arguments``, then the caller's ``overrides`` (a recipe's
    ``training:`` section, which turns checkpoints on), which win."""
    import torch

    return {
        "save_strategy": "no",
        "report_to": [],
        "seed": seed,
        "data_seed": seed,
        "dataloader_num_workers": 0,
        "dataloader_pin_memory": torch.cuda.is_available(),
        **arguments,
        **(overrides or {}),
    }


def held_out_loss(trainer: Any) -> dict[str, float]:
    """Loss and perplexity on the trainer's evaluation set (language-modelling runs)."""
    loss = trainer.evaluate()["eval_loss"]
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0))}


def train_and_measure(
    trainer: Any,
    method: Any = None,
    extra_methods: tuple[Any, ...] = (),
    evaluate: Callable[[Any], dict[str, float]] | None = None,
    task: str | None = None,
    card: dict[str, Any] | None = None,
    resume_from_checkpoint: str | None = None,
) -> RunResult:
    """Attach ``extra_methods`` then ``method`` (None = the Trainer's own optimizer), train with a memory report and
    a step timer (from ``resume_from_checkpoint`` when given), then ``evaluate(trainer)``. The model card is installed
    for every run, with or without a method; ``card`` holds what the runner knows for it (``base_model``,
    ``datasets`` ...: see ``build_model_card``)."""
    memory = add_memory_report(trainer, MemoryReportCallback(print_table=False))  # first: its figures reach the logs
    timer = StepTimerCallback()
    trainer.add_callback(timer)
    install_model_card(trainer, **(card or {}))
    if method is None and not extra_methods:  # attach() says it otherwise
        warn_ignored_fp16(trainer.args)
    for extra in extra_methods:
        attach(trainer, extra)
    if method is not None:
        attach(trainer, method)
    trainer.train(resume_from_checkpoint=resume_from_checkpoint)
    names = [method_name_of(m) for m in (*extra_methods, method) if m is not None] or ["adamw"]
    return RunResult(
        method="+".join(names),
        memory=memory.breakdown,
        median_step_seconds=timer.median_step_seconds,
        median_step_cpu_seconds=timer.median_step_cpu_seconds,
        losses=[h["loss"] for h in trainer.state.log_history if "loss" in h],
        metrics=evaluate(trainer) if evaluate is not None else {},
        task=task,
        trainer=trainer,
    )
