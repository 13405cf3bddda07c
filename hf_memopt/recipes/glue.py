"""Fine-tune a sequence classifier on a GLUE task with the stock Trainer and any hf_memopt method.

Used by the demo, the GLUE recipes, ``hf-memopt train/compare`` and the benchmarks, so every figure comes from the
same code path a user runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from hf_memopt.integration import attach
from hf_memopt.memory import MemoryBreakdown, MemoryReportCallback
from hf_memopt.recipes.data import GLUE_TASKS, load_glue
from hf_memopt.recipes.metrics import glue_compute_metrics
from hf_memopt.recipes.models import resolve_model
from hf_memopt.timing import StepTimerCallback

__all__ = ["GlueResult", "run_glue"]


@dataclass
class GlueResult:
    """What a GLUE run measured: dev metrics, memory breakdown, median seconds per update, training losses."""

    task: str
    method: str
    metrics: dict[str, float]
    memory: MemoryBreakdown
    median_step_seconds: float
    losses: list[float] = field(default_factory=list)
    trainer: Any = None

    def summary(self) -> dict[str, Any]:
        return {
            "task": self.task,
            "method": self.method,
            "metrics": self.metrics,
            "memory_bytes": self.memory.to_dict(),
            "median_step_seconds": self.median_step_seconds,
            "first_loss": self.losses[0] if self.losses else None,
            "last_loss": self.losses[-1] if self.losses else None,
        }


def tokenized_glue(
    task: str, tokenizer, split: str, limit: int | None, max_length: int, source: str = "auto", data_dir: str | None = None
):
    """The task's split tokenized to ``input_ids``/``attention_mask``/``labels`` (dynamic padding later)."""
    dataset = load_glue(task, split, limit, data_dir=data_dir, source=source)
    pair = "text_b" in dataset.column_names

    def encode(batch):
        texts = (batch["text_a"], batch["text_b"]) if pair else (batch["text_a"],)
        out = tokenizer(*texts, truncation=True, max_length=max_length)
        out["labels"] = batch["label"]
        return out

    return dataset.map(encode, batched=True, remove_columns=dataset.column_names)


def run_glue(
    task: str,
    method: Any = None,
    *,
    model: str = "minilm",
    output_dir: str = "out/glue",
    train_limit: int | None = None,
    eval_limit: int | None = None,
    max_length: int = 128,
    epochs: float = 1.0,
    max_steps: int = -1,
    learning_rate: float = 5e-5,
    batch_size: int = 32,
    weight_decay: float = 0.0,
    seed: int = 0,
    extra_methods: tuple[Any, ...] = (),
    training_overrides: dict[str, Any] | None = None,
    print_table: bool = True,
    source: str = "auto",
    data_dir: str | None = None,
) -> GlueResult:
    """Fine-tune ``model`` on ``task`` with ``method`` (a registered config; None = the Trainer's AdamW).

    ``extra_methods`` are attached first (e.g. a VeLoRA config that composes with ``method``).
    ``training_overrides`` are ``TrainingArguments`` fields that take precedence over the arguments above (recipes
    pass their whole ``training:`` section here). ``source`` / ``data_dir``: see :func:`load_glue`.
    """
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        DataCollatorWithPadding,
        Trainer,
        TrainingArguments,
    )

    from hf_memopt.registry import method_name_of

    spec = GLUE_TASKS[task]
    path = resolve_model(model)
    tokenizer = AutoTokenizer.from_pretrained(path)
    torch.manual_seed(seed)
    net = AutoModelForSequenceClassification.from_pretrained(path, num_labels=spec.num_labels)
    train = tokenized_glue(task, tokenizer, "train", train_limit, max_length, source, data_dir)
    dev = tokenized_glue(task, tokenizer, "dev", eval_limit, max_length, source, data_dir)
    arguments = dict(
        output_dir=output_dir,
        per_device_train_batch_size=batch_size,
        per_device_eval_batch_size=2 * batch_size,
        learning_rate=learning_rate,
        weight_decay=weight_decay,
        num_train_epochs=epochs,
        max_steps=max_steps,
        warmup_steps=0,
        logging_steps=max(1, (max_steps if max_steps > 0 else 50) // 10),
        save_strategy="no",
        eval_strategy="no",
        report_to=[],
        seed=seed,
        data_seed=seed,
        dataloader_num_workers=0,
    )
    arguments.update(training_overrides or {})
    args = TrainingArguments(**arguments)
    memory = MemoryReportCallback(print_table=False)
    timer = StepTimerCallback()
    trainer = Trainer(
        model=net,
        args=args,
        train_dataset=train,
        eval_dataset=dev,
        data_collator=DataCollatorWithPadding(tokenizer),
        compute_metrics=glue_compute_metrics(task),
        callbacks=[memory, timer],
    )
    for extra in extra_methods:
        attach(trainer, extra)
    if method is not None:
        attach(trainer, method)
    trainer.train()
    metrics = trainer.evaluate()
    names = [method_name_of(m) for m in (*extra_methods, method) if m is not None] or ["adamw"]
    result = GlueResult(
        task=task,
        method="+".join(names),
        metrics={k.removeprefix("eval_"): v for k, v in metrics.items() if k.removeprefix("eval_") in spec.metrics},
        memory=memory.breakdown,
        median_step_seconds=timer.median_step_seconds,
        losses=[h["loss"] for h in trainer.state.log_history if "loss" in h],
        trainer=trainer,
    )
    if print_table:
        from hf_memopt.memory import format_breakdown_table

        print(format_breakdown_table({result.method: result.memory}))
    return result
