"""Hub-style model cards for models trained with hf_memopt.

The card is written through ``huggingface_hub.ModelCard`` / ``ModelCardData``: base model, datasets, tags
(``hf-memopt`` and every attached method's name), ``model-index`` results from the evaluation metrics in the
Trainer's log history, each attached method's hyperparameters, the measured memory breakdown (from a
:class:`~hf_memopt.memory.MemoryReportCallback` on the trainer, if any) and the training hyperparameters of
transformers' own card, whose ``optimizer`` line (built from ``TrainingArguments.optim``) is corrected when hf_memopt
supplied the optimizer.

``install_model_card(trainer)`` makes a trainer write it: after ``trainer.save_model(dir)`` into ``dir``, into each
checkpoint folder (``on_save``), into ``args.output_dir`` when training ends, and after the stock
``trainer.create_model_card()`` (which ``push_to_hub`` calls), so the card pushed to the Hub is this one. The card is
a pure function of the trainer's state: writing it again gives the same file.
"""

from __future__ import annotations

import logging
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

from transformers import Trainer, TrainerCallback

from hf_memopt.integration import attached_configs
from hf_memopt.memory import MemoryReportCallback, format_breakdown_table
from hf_memopt.optim_state import unwrap_optimizer
from hf_memopt.registry import METHODS, method_name_of

__all__ = ["ModelCardCallback", "build_model_card", "install_model_card", "optimizer_description", "write_model_card"]

logger = logging.getLogger(__name__)

_INSTALLED = "hf_memopt_model_card"
_EVAL_SKIP = {"eval_runtime", "eval_samples_per_second", "eval_steps_per_second", "epoch", "step"}
# task_type names of the Hub's model-index, from the transformers auto-class task names
_HUB_TASKS = {"text-generation": "text-generation", "text-classification": "text-classification"}


def optimizer_description(trainer: Trainer) -> str:
    """The card's optimizer line: the optimizer that really ran.

    transformers' card prints ``args.optim`` (as an enum repr), which is wrong when hf_memopt supplies the optimizer:
    then the line names the hf_memopt optimizer class and says ``args.optim`` was not used.
    """
    args = trainer.args
    optim = str(getattr(args.optim, "value", args.optim))
    optimizer = unwrap_optimizer(trainer.optimizer)
    hyper = (
        f"lr={args.learning_rate}, betas=({args.adam_beta1},{args.adam_beta2}), epsilon={args.adam_epsilon}, "
        f"weight_decay={args.weight_decay}"
    )
    supplier = next((c for c in attached_configs(trainer) if METHODS[method_name_of(c)].sets_optimizer), None)
    if supplier is None:
        cls = (
            f" ({type(optimizer).__module__.split('.')[0]}.{type(optimizer).__name__})" if optimizer is not None else ""
        )
        return f"{optim}{cls} from TrainingArguments.optim, {hyper}"
    name = method_name_of(supplier)
    cls = type(optimizer).__name__ if optimizer is not None else f"the hf_memopt {name} optimizer"
    base = getattr(supplier, "optimizer", None)
    rule = f" (base rule {base})" if base else ""
    return f"{cls}{rule} supplied by hf_memopt {name}, {hyper}; TrainingArguments.optim={optim} was not used"


def _memory_breakdown(trainer: Trainer):
    for callback in trainer.callback_handler.callbacks:
        if isinstance(callback, MemoryReportCallback) and callback.breakdown.tensors_total > 0:
            return callback.breakdown
    return None


def _eval_metrics(log_history: list[dict[str, Any]]) -> dict[str, float]:
    """The last evaluation's metrics (``eval_accuracy`` -> ``accuracy``), numbers only."""
    for entry in reversed(log_history):
        metrics = {
            k.removeprefix("eval_"): float(v)
            for k, v in entry.items()
            if k.startswith("eval_") and k not in _EVAL_SKIP and isinstance(v, (int, float)) and not isinstance(v, bool)
        }
        if metrics:
            return metrics
    return {}


def _as_list(value: str | list[str] | None) -> list[str]:
    if value is None:
        return []
    return [value] if isinstance(value, str) else [v for v in value if v]


def _value(v: Any) -> str:
    return f"`{v!r}`" if not isinstance(v, str) else f"`{v}`"


def build_model_card(
    trainer: Trainer,
    *,
    base_model: str | None = None,
    datasets: str | list[str] | None = None,
    model_name: str | None = None,
    language: str | list[str] | None = None,
    license: str | None = None,
    tags: str | list[str] | None = None,
    task_type: str | None = None,
):
    """The ``huggingface_hub.ModelCard`` of ``trainer``'s model (see the module docstring).

    ``base_model`` / ``datasets`` default to what transformers infers (a Hub id in ``config._name_or_path``, the
    builder name of a ``datasets.Dataset``); local folders are not Hub ids and are left out.
    """
    from huggingface_hub import EvalResult, ModelCard, ModelCardData
    from transformers.modelcard import TrainingSummary, make_markdown_table, parse_log_history

    import hf_memopt

    summary = TrainingSummary.from_trainer(trainer, model_name=model_name, finetuned_from=base_model)
    base_model = base_model or summary.finetuned_from or None
    if base_model is not None and os.path.isabs(base_model):
        base_model = None
    dataset_tags = _as_list(datasets) or _as_list(summary.dataset_tags)
    configs = attached_configs(trainer)
    names = [method_name_of(c) for c in configs]
    all_tags = ["hf-memopt", *names, *[t for t in _as_list(tags) if t not in names], "generated_from_trainer"]
    all_tags = list(dict.fromkeys(all_tags))
    model_name = model_name or summary.model_name or "model"

    metrics = _eval_metrics(trainer.state.log_history)
    tasks = _as_list(summary.tasks)
    task = task_type or (_HUB_TASKS.get(tasks[0], tasks[0]) if tasks else "other")
    eval_results = None
    if metrics:
        dataset = dataset_tags[0] if dataset_tags else "custom"
        eval_results = [
            EvalResult(task_type=task, dataset_type=dataset, dataset_name=dataset, metric_type=k, metric_value=v)
            for k, v in sorted(metrics.items())
        ]
    data = ModelCardData(
        base_model=base_model,
        datasets=dataset_tags or None,
        language=language,
        license=license,
        library_name="transformers",
        model_name=model_name,
        tags=all_tags,
        eval_results=eval_results,
    )

    body = [f"# {model_name}", ""]
    origin = (
        f"a fine-tuned version of [{base_model}](https://huggingface.co/{base_model})" if base_model else ("a model")
    )
    on = f" on {', '.join(dataset_tags)}" if dataset_tags else ""
    methods = ", ".join(f"**{n}**" for n in names) or "no hf_memopt method"
    body.append(f"This is {origin}{on}, trained with the stock `transformers.Trainer` and hf_memopt ({methods}).")
    if metrics:
        body += ["", "It achieves the following results on the evaluation set:", ""]
        body += [f"- {k}: {v:.4g}" for k, v in sorted(metrics.items())]

    body += ["", "## Memory-efficient training (hf_memopt)"]
    for config in configs:
        spec = METHODS[method_name_of(config)]
        body += ["", f"### {spec.name}: {spec.summary}", "", f"`{type(config).__name__}`:", ""]
        body += ["| hyperparameter | value |", "|---|---|"]
        body += [f"| {k} | {_value(v)} |" for k, v in asdict(config).items()]
    breakdown = _memory_breakdown(trainer)
    body += ["", "### Measured memory", ""]
    if breakdown is not None:
        body += [
            "Measured during this training run by `hf_memopt.MemoryReportCallback` (tensor bytes, each storage "
            "counted once; activations = unique tensors saved for backward):",
            "",
            format_breakdown_table({"this run": breakdown}),
        ]
    else:
        body.append("Not measured (add `hf_memopt.MemoryReportCallback()` to the trainer's callbacks).")

    body += ["", "## Training procedure", "", "### Training hyperparameters", ""]
    hyperparameters = dict(summary.hyperparameters or {})
    hyperparameters["optimizer"] = optimizer_description(trainer)
    body.append("The following hyperparameters were used during training:")
    body.append("")
    body += [f"- {name}: {value}" for name, value in hyperparameters.items()]
    _, eval_lines, _ = parse_log_history(trainer.state.log_history)
    if eval_lines:
        body += ["", "### Training results", "", make_markdown_table(eval_lines).rstrip()]

    import huggingface_hub
    import torch
    import transformers

    body += [
        "",
        "### Framework versions",
        "",
        f"- hf_memopt {hf_memopt.__version__}",
        f"- Transformers {transformers.__version__}",
        f"- Pytorch {torch.__version__}",
        f"- huggingface_hub {huggingface_hub.__version__}",
        "",
    ]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(body))


def write_model_card(trainer: Trainer, output_dir: str | os.PathLike | None = None, **card_kwargs: Any) -> str:
    """Write the card as ``README.md`` into ``output_dir`` (default ``args.output_dir``); returns its path."""
    folder = Path(output_dir or trainer.args.output_dir)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "README.md"
    build_model_card(trainer, **card_kwargs).save(path)
    return str(path)


class ModelCardCallback(TrainerCallback):
    """Writes the hf_memopt card where the Trainer writes models.

    Events used: ``on_save`` (runs right after a checkpoint folder is written: the card goes into
    ``output_dir/checkpoint-<step>``) and ``on_train_end`` (into ``args.output_dir``, once the memory report is final).
    ``trainer.save_model`` to another folder is covered by :func:`install_model_card`.
    """

    def __init__(self, trainer: Trainer, **card_kwargs: Any):
        self.trainer = trainer
        self.card_kwargs = card_kwargs

    def _write(self, folder: str, state) -> None:
        if state.is_world_process_zero and os.path.isdir(folder):
            write_model_card(self.trainer, folder, **self.card_kwargs)

    def on_save(self, args, state, control, **kwargs):
        from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

        self._write(os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"), state)

    def on_train_end(self, args, state, control, **kwargs):
        self._write(args.output_dir, state)


def install_model_card(trainer: Trainer, **card_kwargs: Any) -> ModelCardCallback:
    """Make ``trainer`` write the hf_memopt model card (idempotent: a second call returns the installed callback).

    Installs a :class:`ModelCardCallback` and wraps two public methods on this instance only: ``save_model`` (the
    card is written into the folder just saved; checkpoints are left to ``on_save``) and ``create_model_card`` (the
    stock card, which reports ``args.optim``, is replaced by this one, so ``push_to_hub`` publishes it).
    ``card_kwargs`` go to :func:`build_model_card` (``base_model``, ``datasets``, ``license`` ...).
    """
    installed = trainer.__dict__.get(_INSTALLED)
    if installed is not None:
        installed.card_kwargs.update(card_kwargs)
        return installed
    callback = ModelCardCallback(trainer, **card_kwargs)
    trainer.add_callback(callback)
    original_save_model = trainer.save_model
    original_create_model_card = trainer.create_model_card

    def save_model(output_dir: str | None = None, _internal_call: bool = False, **kwargs: Any) -> None:
        original_save_model(output_dir, _internal_call=_internal_call, **kwargs)
        if not _internal_call and trainer.is_world_process_zero():
            write_model_card(trainer, output_dir, **callback.card_kwargs)

    def create_model_card(*args: Any, **kwargs: Any) -> None:
        original_create_model_card(*args, **kwargs)
        if trainer.is_world_process_zero():
            card_args = dict(callback.card_kwargs)
            for key, ours in (
                ("finetuned_from", "base_model"),
                ("dataset_tags", "datasets"),
                ("model_name", "model_name"),
                ("language", "language"),
                ("license", "license"),
                ("tags", "tags"),
            ):
                if kwargs.get(key) is not None:
                    card_args.setdefault(ours, kwargs[key])
            write_model_card(trainer, None, **card_args)

    trainer.save_model = save_model
    trainer.create_model_card = create_model_card
    trainer.__dict__[_INSTALLED] = callback
    return callback
