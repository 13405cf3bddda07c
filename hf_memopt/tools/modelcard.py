"""Hub-style model cards for models trained with hf_memopt (and for plain Trainer runs the CLI makes).

The card is written through ``huggingface_hub.ModelCard`` / ``ModelCardData``, holding what a well-made Hub card
holds: YAML metadata (``base_model``, ``datasets``, ``license``, ``language``, ``pipeline_tag``, tags, ``model-index``
with the last evaluation's metrics), a title and a description, how to load and use the model, and the training
procedure: each attached method's settings, the memory measured by a :class:`~hf_memopt.tools.memory.MemoryReportCallback`,
transformers' training hyperparameters (with the ``optimizer`` line corrected when hf_memopt supplied the optimizer)
and the evaluation history.

A trainer class whose library writes its own card (TRL's ``SFTTrainer`` and siblings override ``create_model_card``)
keeps that card: its metadata is extended (tags, base model, datasets, license, ``model-index``) and hf_memopt's
sections are appended. ``license`` and ``language`` default to the base model's card when it is on disk (a local
folder, or the Hub cache).

``install_model_card(trainer)`` makes a trainer write it: ``attach()`` calls it, and so do the recipe runners for
runs without any method (the CLI's AdamW rows). The card is written into each checkpoint folder (``on_save``), into
``args.output_dir`` when training ends, into ``dir`` after ``trainer.save_model(dir)``, after ``create_model_card()``
(which ``push_to_hub`` calls), and again into every final folder when an evaluation after training brings new
metrics. It is a pure function of the trainer's state: writing it again gives the same file.
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

from transformers import Trainer, TrainerCallback

from hf_memopt.core import compat
from hf_memopt.core.registry import METHODS, attached_configs, method_name_of
from hf_memopt.shared.optim_state import unwrap_optimizer
from hf_memopt.tools.memory import MemoryReportCallback, format_breakdown_table

__all__ = [
    "ModelCardCallback",
    "build_model_card",
    "install_model_card",
    "library_model_card",
    "optimizer_description",
    "write_model_card",
]

logger = logging.getLogger(__name__)

_INSTALLED = "hf_memopt_model_card"
# throughput and counters, not metrics (eval_num_tokens: TRL's count of tokens trained on)
_EVAL_SKIP = {"eval_runtime", "eval_samples_per_second", "eval_steps_per_second", "eval_num_tokens", "epoch", "step"}
# task_type names of the Hub's model-index, from the transformers auto-class task names
_HUB_TASKS = {"text-generation": "text-generation", "text-classification": "text-classification"}
_USAGE = {
    "text-classification": (
        "from transformers import pipeline\n\n"
        'classifier = pipeline("text-classification", model="{repo}")\n'
        'print(classifier("A memory-efficient fine-tune that still reads well."))'
    ),
    "text-generation": (
        "from transformers import pipeline\n\n"
        'generator = pipeline("text-generation", model="{repo}")\n'
        'print(generator("Memory-efficient training", max_new_tokens=32)[0]["generated_text"])'
    ),
}
_GENERIC_USAGE = 'from transformers import {cls}\n\nmodel = {cls}.from_pretrained("{repo}")'
# TRL's card templates write this placeholder key; it is dropped once the card has a real ``license``
_TRL_LICENCE_PLACEHOLDER = ("licence", "license")


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


def _paper_link(config: Any) -> str | None:
    """The paper a config's docstring starts with (the style every ``*Config`` follows)."""
    match = re.search(r"https?://[^\s)>\]]+", type(config).__doc__ or "")
    return match.group(0).rstrip(".,") if match else None


def _base_model_card(trainer: Trainer, base_model: str | None):
    """The base model's own card, when it is on disk: the model's source folder, else the Hub cache (no download)."""
    from huggingface_hub import ModelCard, try_to_load_from_cache

    source = getattr(getattr(trainer.model, "config", None), "name_or_path", "") or ""
    path: str | None = os.path.join(source, "README.md") if source and os.path.isdir(source) else None
    if path is None and base_model:
        try:
            cached = try_to_load_from_cache(base_model, "README.md")
        except ValueError:  # not a valid repo id
            cached = None
        path = cached if isinstance(cached, str) else None
    if path is None or not os.path.isfile(path):
        return None
    try:
        return ModelCard.load(path)
    except Exception as err:  # a malformed card on disk must not break training
        logger.warning("hf_memopt model card: could not read the base model's card %s (%s)", path, err)
        return None


def _is_peft(model: Any) -> bool:
    return hasattr(model, "peft_config") and callable(getattr(model, "get_base_model", None))


def _model_class(model: Any) -> str:
    """The class that loads the saved model: the trained one (``config.architectures`` still names the base model's
    until the save), under a peft wrapper its base model's."""
    get_base_model = getattr(model, "get_base_model", None)
    return type(get_base_model() if callable(get_base_model) else model).__name__


def _short(name: str) -> str:
    return name.rstrip("/").rsplit("/", 1)[-1]


def _default_model_name(
    trainer: Trainer, base_model: str | None, datasets: list[str], config_name: str | None, methods: list[str]
) -> str:
    """``<base>-<dataset>-<methods>`` (``all-MiniLM-L6-v2-rte-galore``), or the Hub repo's name when pushing."""
    if trainer.args.hub_model_id:
        return _short(trainer.args.hub_model_id)
    model_type = getattr(getattr(trainer.model, "config", None), "model_type", None) or "model"
    parts = [_short(base_model) if base_model else model_type]
    parts += [config_name] if config_name else [_short(d) for d in datasets]
    parts += methods or ["adamw"]
    return "-".join(parts)


def _description(
    trainer: Trainer,
    model_name: str,
    base_model: str | None,
    datasets: list[str],
    dataset_config: str | None,
    configs: list[Any],
    model_description: str | None,
) -> list[str]:
    model = trainer.model
    architecture = _model_class(model)
    parameters = sum(p.numel() for p in model.parameters())
    links = [f"[{d}](https://huggingface.co/datasets/{d})" if "/" in d else f"`{d}`" for d in datasets]
    on = f" on {', '.join(links)}" + (f" (`{dataset_config}`)" if dataset_config else "") if datasets else ""
    if model_description:
        opening = model_description.rstrip(".") + "."
    elif base_model:
        opening = (
            f"**{model_name}** is a fine-tuned version of [{base_model}](https://huggingface.co/{base_model}){on}."
        )
    else:
        opening = f"**{model_name}** is a `{architecture}` model" + (f" trained{on}." if on else ".")
    size = f"{parameters / 1e6:.1f}M" if parameters >= 1e6 else f"{parameters:,}"
    lines = [f"{opening} It has {size} parameters" + (f" (`{architecture}`)." if base_model else ".")]
    if configs:
        methods = []
        for config in configs:
            spec = METHODS[method_name_of(config)]
            paper = _paper_link(config)
            label = type(config).__name__.removesuffix("Config")  # the method's spelling: GaLore, VeLoRA, LoQT
            name = f"[{label}]({paper})" if paper else label
            methods.append(f"**{name}** ({spec.summary[0].lower()}{spec.summary[1:]})")
        lines += [
            "",
            "It was trained with the stock `transformers.Trainer` and hf_memopt's memory-efficient "
            f"{' and '.join(methods)}; the settings and the memory measured during training are listed below.",
        ]
    else:
        lines += [
            "",
            "It was trained with the stock `transformers.Trainer` and its own optimizer (no hf_memopt method); "
            "hf_memopt wrote this card.",
        ]
    return lines


def _usage(trainer: Trainer, repo: str, task: str) -> list[str]:
    if _is_peft(trainer.model):
        code = f'from peft import AutoPeftModel\n\nmodel = AutoPeftModel.from_pretrained("{repo}")'
        saved = "peft adapters on the base model: load them with peft (hf_memopt is not needed)."
    else:
        code = _USAGE.get(task, _GENERIC_USAGE).format(repo=repo, cls=_model_class(trainer.model))
        saved = "a plain transformers model: loading needs neither hf_memopt nor the method's code."
    return [
        "## How to use",
        "",
        f"`{repo}` is the Hub id, or the folder `trainer.save_model` wrote. The saved weights are {saved}",
        "",
        "```python",
        code,
        "```",
    ]


def _eval_section(metrics: dict[str, float], dataset: str, level: str) -> list[str]:
    lines = [f"{level} Evaluation results", "", f"On the evaluation set ({dataset}), after training:", ""]
    lines += ["| metric | value |", "|---|---|"]
    return lines + [f"| {k} | {v:.4g} |" for k, v in sorted(metrics.items())]


def _training_sections(
    trainer: Trainer, summary: Any, configs: list[Any], level: str, *, own_heading: bool
) -> list[str]:
    """Method settings (under their own ``level`` heading when ``own_heading``), measured memory, training
    hyperparameters and results, as ``level`` headings."""
    from transformers.modelcard import make_markdown_table, parse_log_history

    body: list[str] = []
    if own_heading:
        body += ["", f"{level} Memory-efficient training (hf_memopt)"]
        if not configs:
            body += ["", "No hf_memopt method: the Trainer's own optimizer and a full backward."]
    for config in configs:
        spec = METHODS[method_name_of(config)]
        heading = level + "#" if own_heading else level
        body += ["", f"{heading} {spec.name}: {spec.summary}", "", f"`{type(config).__name__}`:", ""]
        body += ["| hyperparameter | value |", "|---|---|"]
        body += [f"| {k} | {_value(v)} |" for k, v in asdict(config).items()]
    breakdown = _memory_breakdown(trainer)
    body += ["", f"{level} Measured memory", ""]
    if breakdown is not None:
        body += [
            "Measured during this training run by `hf_memopt.MemoryReportCallback` (tensor bytes, each storage "
            "counted once; activations = unique tensors saved for backward):",
            "",
            format_breakdown_table({"this run": breakdown}),
        ]
    else:
        body.append("Not measured (add `hf_memopt.MemoryReportCallback()` to the trainer's callbacks).")
    hyperparameters = dict(summary.hyperparameters or {})
    hyperparameters["optimizer"] = optimizer_description(trainer)
    body += ["", f"{level} Training hyperparameters", "", "The following hyperparameters were used during training:"]
    body += [""] + [f"- {name}: {value}" for name, value in hyperparameters.items()]
    _, eval_lines, _ = parse_log_history(trainer.state.log_history)
    if eval_lines:
        body += ["", f"{level} Training results", "", make_markdown_table(eval_lines).rstrip()]
    return body


def _framework_versions() -> list[str]:
    import huggingface_hub
    import torch
    import transformers

    import hf_memopt

    return [
        f"- hf_memopt {hf_memopt.__version__}",
        f"- Transformers {transformers.__version__}",
        f"- Pytorch {torch.__version__}",
        f"- huggingface_hub {huggingface_hub.__version__}",
    ]


def build_model_card(
    trainer: Trainer,
    *,
    base_model: str | None = None,
    datasets: str | list[str] | None = None,
    dataset_config: str | None = None,
    eval_dataset: str | None = None,
    model_name: str | None = None,
    model_description: str | None = None,
    language: str | list[str] | None = None,
    license: str | None = None,
    tags: str | list[str] | None = None,
    task_type: str | None = None,
    extend_library_card: bool = True,
):
    """The ``huggingface_hub.ModelCard`` of ``trainer``'s model (see the module docstring).

    Args:
        base_model: Hub id of the model fine-tuned from; default what transformers infers (a Hub id in
            ``config._name_or_path``; local folders are not Hub ids and are left out).
        datasets: Hub dataset ids trained on; default the builder name of a ``datasets.Dataset``.
        dataset_config: the datasets' configuration (``"sst2"`` of ``nyu-mll/glue``), for the title and model-index.
        eval_dataset: the dataset the evaluation metrics are on (model-index); default the first of ``datasets``,
            else ``"custom"`` (the Hub rejects a model-index result without a dataset).
        model_name: title and ``model_name``; default the Hub repo's name, else ``<base>-<dataset>-<methods>``.
        model_description: the opening sentence, replacing the default "<name> is a fine-tuned version of ...".
        language, license: default the base model's card's (when it is on disk).
        tags: extra tags, after ``hf-memopt`` and the attached methods' names.
        task_type: model-index task and ``pipeline_tag``; default from the model class.
        extend_library_card: when the trainer's library writes its own card (TRL's), extend that card
            (:func:`library_model_card`) instead of writing a new one.
    """
    from huggingface_hub import EvalResult, ModelCard, ModelCardData
    from transformers.modelcard import TrainingSummary

    import hf_memopt

    # license given: transformers skips its Hub lookup of the base model's license tag (online only)
    summary = TrainingSummary.from_trainer(
        trainer, model_name=model_name or "model", finetuned_from=base_model, license=license
    )
    base_model = base_model or summary.finetuned_from or None
    if base_model is not None and (os.path.isabs(base_model) or os.path.isdir(base_model)):
        base_model = None
    dataset_tags = _as_list(datasets) or _as_list(summary.dataset_tags)
    configs = attached_configs(trainer)
    names = [method_name_of(c) for c in configs]
    base_card = _base_model_card(trainer, base_model)
    base_data = base_card.data if base_card is not None else None
    license = license or summary.license or (base_data.license if base_data is not None else None)
    language = language or (base_data.language if base_data is not None else None)
    model_name = model_name or _default_model_name(trainer, base_model, dataset_tags, dataset_config, names)

    metrics = _eval_metrics(trainer.state.log_history)
    tasks = _as_list(summary.tasks)
    task = task_type or (_HUB_TASKS.get(tasks[0], tasks[0]) if tasks else "other")
    dataset = eval_dataset or (dataset_tags[0] if dataset_tags else "custom")
    eval_results = None
    if metrics:
        eval_results = [
            EvalResult(
                task_type=task,
                dataset_type=dataset,
                dataset_name=dataset,
                dataset_config=dataset_config,
                metric_type=k,
                metric_value=v,
            )
            for k, v in sorted(metrics.items())
        ]
    our_tags = ["hf-memopt", *names, *[t for t in _as_list(tags) if t not in names], "generated_from_trainer"]
    dataset_label = f"{dataset} `{dataset_config}`" if dataset_config else dataset
    library_card = library_model_card(trainer, model_name, dataset_tags) if extend_library_card else None
    if library_card is None:
        data = ModelCardData(
            base_model=base_model,
            datasets=dataset_tags or None,
            language=language,
            license=license,
            library_name="peft" if _is_peft(trainer.model) else "transformers",
            model_name=model_name,
            pipeline_tag=task if task in _HUB_TASKS else None,
            tags=list(dict.fromkeys(our_tags)),
            eval_results=eval_results,
        )
        body = [f"# {model_name}", ""]
        body += _description(trainer, model_name, base_model, dataset_tags, dataset_config, configs, model_description)
        if metrics:
            body += [""] + _eval_section(metrics, dataset_label, "##")
        body += [""] + _usage(trainer, trainer.args.hub_model_id or model_name, task)
        body += ["", "## Training procedure"] + _training_sections(trainer, summary, configs, "###", own_heading=True)
        body += ["", "### Framework versions", "", *_framework_versions(), ""]
        return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(body))

    # Extend the library's card: its metadata and text stay; hf_memopt adds what it knows and one section.
    data = library_card.data
    if not data.base_model and base_model:
        data.base_model = base_model
    data.datasets = list(dict.fromkeys([*_as_list(data.datasets), *dataset_tags])) or None
    if license:
        data.license = license
        if getattr(data, _TRL_LICENCE_PLACEHOLDER[0], None) == _TRL_LICENCE_PLACEHOLDER[1]:
            delattr(data, _TRL_LICENCE_PLACEHOLDER[0])
    if language and not data.language:
        data.language = language
    data.tags = list(dict.fromkeys([*_as_list(data.tags), *our_tags]))
    if eval_results:
        data.eval_results, data.model_name = eval_results, data.model_name or model_name
    methods = ", ".join(f"**{n}**" for n in names) or "no hf_memopt method (the Trainer's own optimizer)"
    text = library_card.text.rstrip()
    # TRL's template prints a missing base model / Hub id as "None" (a local base model, no hub_model_id)
    if base_model:
        text = text.replace(
            "[None](https://huggingface.co/None)", f"[{base_model}](https://huggingface.co/{base_model})"
        )
    text = text.replace('model="None"', f'model="{trainer.args.hub_model_id or model_name}"')
    body = [text, "", "## Memory-efficient training (hf_memopt)", ""]
    body.append(f"Trained with hf_memopt {hf_memopt.__version__} ({methods}).")
    if metrics:
        body += [""] + _eval_section(metrics, dataset_label, "###")
    body += _training_sections(trainer, summary, configs, "###", own_heading=False) + [""]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(body))


def library_model_card(trainer: Trainer, model_name: str | None = None, datasets: list[str] | None = None):
    """The card the trainer's own library writes (TRL's), or None for a plain ``transformers.Trainer``.

    The library's ``create_model_card`` always writes into ``args.output_dir``; it is run with ``output_dir``
    pointed at a temporary folder (restored after), so asking for the card leaves the run's files alone.
    ``model_name`` and the first of ``datasets`` are passed when its signature takes them (TRL: ``dataset_name``).
    """
    import inspect

    from huggingface_hub import ModelCard

    installed = trainer.__dict__.get(_INSTALLED)
    create = installed.library_create_model_card if installed is not None else trainer.create_model_card
    if create is None or type(trainer).create_model_card is Trainer.create_model_card:
        return None
    accepted = inspect.signature(create).parameters
    kwargs = {"model_name": model_name, "dataset_name": (datasets or [None])[0]}
    kwargs = {k: v for k, v in kwargs.items() if k in accepted and v is not None}
    output_dir = trainer.args.output_dir
    with tempfile.TemporaryDirectory() as folder:
        trainer.args.output_dir = folder
        try:
            create(**kwargs)
        finally:
            trainer.args.output_dir = output_dir
        path = Path(folder) / "README.md"
        return ModelCard.load(path) if path.exists() else None


def write_model_card(trainer: Trainer, output_dir: str | os.PathLike | None = None, **card_kwargs: Any) -> str:
    """Write the card as ``README.md`` into ``output_dir`` (default ``args.output_dir``); returns its path."""
    folder = Path(output_dir or trainer.args.output_dir)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "README.md"
    build_model_card(trainer, **card_kwargs).save(path)
    return str(path)


class ModelCardCallback(TrainerCallback):
    """Writes the hf_memopt card where the Trainer writes models, and rewrites it when later metrics arrive.

    Events used: ``on_save`` (right after a checkpoint folder is written: the card goes into
    ``output_dir/checkpoint-<step>``, a snapshot of that step), ``on_train_end`` (into ``args.output_dir``, once the
    memory report is final) and ``on_evaluate`` (an evaluation *after* training, as the recipe runners and most
    scripts do: the card of every final folder, ``args.output_dir`` and each ``save_model`` folder, is rewritten
    with the new metrics in its ``model-index``). ``trainer.save_model`` to another folder is covered by
    :func:`install_model_card`.
    """

    def __init__(self, trainer: Trainer, **card_kwargs: Any):
        self.trainer = trainer
        self.card_kwargs = card_kwargs
        self.library_create_model_card = None
        self.final_folders: dict[str, None] = {}  # ordered set of folders holding a final (not checkpoint) card
        self.training = False

    def write(self, folder: str | None, *, final: bool) -> None:
        if not self.trainer.is_world_process_zero():
            return
        folder = folder or self.trainer.args.output_dir
        if final:
            self.final_folders[str(folder)] = None
        if os.path.isdir(folder) or final:
            write_model_card(self.trainer, folder, **self.card_kwargs)

    def on_train_begin(self, args, state, control, **kwargs):
        self.training = True

    def on_save(self, args, state, control, **kwargs):
        from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

        folder = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        if os.path.isdir(folder):
            self.write(folder, final=False)

    def on_train_end(self, args, state, control, **kwargs):
        self.training = False
        self.write(args.output_dir, final=True)

    def on_evaluate(self, args, state, control, **kwargs):
        if self.training:
            return  # mid-training evaluations reach the card through on_train_end
        for folder in list(self.final_folders):
            if os.path.isdir(folder):
                self.write(folder, final=True)


def install_model_card(trainer: Trainer, **card_kwargs: Any) -> ModelCardCallback:
    """Make ``trainer`` write the hf_memopt model card; the one entry point, for any run (idempotent).

    ``attach()`` calls it for every method; call it yourself for a run without any method (the recipe runners do, so
    the CLI's AdamW rows get a card) or to give the card its Hub facts, before or after ``attach()``: a second call
    adds ``card_kwargs`` to the installed callback and returns it. ``card_kwargs`` go to :func:`build_model_card`
    (``base_model``, ``datasets``, ``dataset_config``, ``license``, ``model_name`` ...).

    Installs a :class:`ModelCardCallback` and wraps two public methods on this instance only: ``save_model`` (the card
    is written into the folder just saved; checkpoints are left to ``on_save``) and ``create_model_card``
    (``push_to_hub`` calls it; TRL's trainers call it at each checkpoint): transformers' own card is replaced by this
    one, a library's own card (TRL's) is extended. Both go through :mod:`hf_memopt.core.compat`, which checks their
    signatures (``save_model``'s private ``_internal_call`` parameter tells the Trainer's own saves from a user's).
    """
    installed = trainer.__dict__.get(_INSTALLED)
    if installed is not None:
        installed.card_kwargs.update(card_kwargs)
        return installed
    callback = ModelCardCallback(trainer, **card_kwargs)

    def card_after_save(original_save_model):
        def save_model(output_dir: str | None = None, _internal_call: bool = False, **kwargs: Any) -> None:
            original_save_model(output_dir, _internal_call=_internal_call, **kwargs)
            if not _internal_call:
                callback.write(output_dir, final=True)

        return save_model

    def create_model_card(*args: Any, **kwargs: Any) -> None:
        if not trainer.is_world_process_zero():
            return
        card_args = dict(callback.card_kwargs)
        if kwargs.get("model_name") == Path(trainer.args.output_dir).name:
            # the default name transformers and TRL pass (their checkpoint hook does, at every save): the card derives
            # a descriptive one instead, the same whichever path writes it
            kwargs.pop("model_name")
        for key, ours in (
            ("finetuned_from", "base_model"),
            ("dataset_tags", "datasets"),
            ("dataset_name", "datasets"),
            ("model_name", "model_name"),
            ("language", "language"),
            ("license", "license"),
            ("tags", "tags"),
        ):
            if kwargs.get(key) is not None:
                card_args.setdefault(ours, kwargs[key])
        write_model_card(trainer, None, **card_args)

    compat.wrap_save_model(trainer, card_after_save)

    def replace_card(library_create_model_card):
        callback.library_create_model_card = library_create_model_card
        return create_model_card

    compat.wrap_create_model_card(trainer, replace_card)
    trainer.add_callback(callback)
    trainer.__dict__[_INSTALLED] = callback
    return callback
