"""Fine-tune a sequence classifier on a GLUE task with the stock Trainer and any hf_memopt method.

Used by the demo, the GLUE recipes, ``hf-memopt train/compare`` and the benchmarks, so every figure comes from the
same code path a user runs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from hf_memopt.tools.recipes.data import GLUE_TASKS, load_glue
from hf_memopt.tools.recipes.metrics import glue_compute_metrics
from hf_memopt.tools.recipes.models import hub_id, resolve_model
from hf_memopt.tools.recipes.result import RunResult, measured_run_arguments, train_and_measure

__all__ = ["run_glue"]


def tokenized_glue(
    task: str,
    tokenizer,
    split: str,
    limit: int | None,
    max_length: int,
    source: str = "auto",
    data_dir: str | None = None,
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
    prepare_model: Callable[[torch.nn.Module], torch.nn.Module] | None = None,
    optimizers: Callable[[torch.nn.Module, Any], tuple[Any, Any]] | None = None,
    resume_from_checkpoint: str | None = None,
) -> RunResult:
    """Fine-tune ``model`` on ``task`` with ``method`` (a registered config; None = the Trainer's AdamW).

    ``extra_methods`` are attached first (e.g. a VeLoRA config that composes with ``method``).
    ``training_overrides`` are ``TrainingArguments`` fields that take precedence over the arguments above (recipes
    pass their whole ``training:`` section here). ``source`` / ``data_dir``: see :func:`load_glue`.
    ``prepare_model(model)`` wraps the loaded model (e.g. peft's ``get_peft_model`` for a LoRA baseline);
    ``optimizers(model, args)`` returns the Trainer's ``(optimizer, scheduler)`` pair (peer optimizers in benchmarks).
    ``resume_from_checkpoint``: a checkpoint folder to continue from (``Trainer.train``'s argument).
    """
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        DataCollatorWithPadding,
        Trainer,
        TrainingArguments,
    )

    spec = GLUE_TASKS[task]
    path = resolve_model(model)
    tokenizer = AutoTokenizer.from_pretrained(path)
    torch.manual_seed(seed)
    # fp32 weights whatever the checkpoint stores (transformers 5 would load a 16-bit checkpoint in 16 bits and train
    # it without fp32 master weights); mixed precision comes from training.bf16 / fp16, as in the instruct runner
    net = AutoModelForSequenceClassification.from_pretrained(path, num_labels=spec.num_labels, dtype=torch.float32)
    if prepare_model is not None:
        net = prepare_model(net)
    train = tokenized_glue(task, tokenizer, "train", train_limit, max_length, source, data_dir)
    dev = tokenized_glue(task, tokenizer, "dev", eval_limit, max_length, source, data_dir)
    arguments = measured_run_arguments(
        seed,
        training_overrides,
        output_dir=output_dir,
        per_device_train_batch_size=batch_size,
        per_device_eval_batch_size=2 * batch_size,
        learning_rate=learning_rate,
        weight_decay=weight_decay,
        num_train_epochs=epochs,
        max_steps=max_steps,
        warmup_steps=0,
        logging_steps=max(1, (max_steps if max_steps > 0 else 50) // 10),
        eval_strategy="no",
    )
    args = TrainingArguments(**arguments)
    trainer = Trainer(
        model=net,
        args=args,
        train_dataset=train,
        eval_dataset=dev,
        data_collator=DataCollatorWithPadding(tokenizer),
        compute_metrics=glue_compute_metrics(task),
        optimizers=optimizers(net, args) if optimizers is not None else (None, None),
    )

    def evaluate(trained) -> dict[str, float]:
        metrics = {k.removeprefix("eval_"): v for k, v in trained.evaluate().items()}
        return {k: v for k, v in metrics.items() if k in spec.metrics}

    card = {"base_model": hub_id(model), "datasets": "nyu-mll/glue", "dataset_config": task}
    result = train_and_measure(
        trainer, method, extra_methods, evaluate, task=task, card=card, resume_from_checkpoint=resume_from_checkpoint
    )
    if print_table:
        from hf_memopt.tools.memory import format_breakdown_table

        print(format_breakdown_table({result.method: result.memory}))
    return result
