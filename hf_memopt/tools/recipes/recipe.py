"""Recipe files: one YAML per experiment, small overrides on a shared defaults file (like peft's method_comparison).

A recipe names a task type, a model, data, ``TrainingArguments`` and a method::

    defaults: defaults.yaml        # optional: deep-merged underneath this file (paths relative to this file)
    task: glue                     # glue | instruct | pretrain
    model: minilm                  # an offline name (minilm, smollm2, llama-20m ...), a Hub id or a folder
    data: {name: rte, max_length: 128}
    training:                      # TrainingArguments field names (SFTConfig for instruct), exactly
      learning_rate: 1.0e-4
      num_train_epochs: 3
    method:                        # what `hf-memopt train` runs: `name` + exactly that config's field names
      name: galore
      rank: 32
    methods:                       # per-method settings used whenever that method runs (`compare`, `--method`)
      galore: {rank: 32, update_proj_gap: 50}
      blockllm: {sparsity: 0.9}
    method_training:               # per-method TrainingArguments on top of `training:` (learning rates differ)
      blockllm: {learning_rate: 5.0e-4}

``adamw`` is the baseline (the Trainer's own AdamW, no hf_memopt method); ``velora+galore`` composes methods.
Values are parsed by the type of the field they set (so ``1e-4`` is a float even though YAML reads it as a string),
and every section is validated by the class that owns it: unknown keys and bad values raise :class:`RecipeError`
with one line naming the key.
"""

from __future__ import annotations

import copy
import dataclasses
import enum
import tempfile
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from hf_memopt.shared.validation import check_bool, check_choice, check_int

__all__ = [
    "BASELINE",
    "TASKS",
    "GlueData",
    "InstructData",
    "MemorySettings",
    "PretrainData",
    "Recipe",
    "RecipeError",
    "apply_set",
    "check_runnable",
    "coerce",
    "load_recipe",
    "method_configs",
    "read_recipe_file",
]

TASKS = ("glue", "instruct", "pretrain")
BASELINE = "adamw"
TOP_LEVEL_KEYS = (
    "defaults",
    "task",
    "model",
    "data",
    "training",
    "method",
    "methods",
    "method_training",
    "output_dir",
    "save_model",
    "memory",
)


class RecipeError(ValueError):
    """A recipe, an override or a method setting is invalid; the message is one line naming the key."""


# ---------------------------------------------------------------------------------------------------------------
# data sections: one dataclass per task type, validated like the method configs


@dataclass
class GlueData:
    """Args:
    name: the GLUE task: rte, mrpc, cola, stsb or sst2.
    source: ``auto`` (bundled TSVs when present, else the Hub), ``bundled`` or ``hub`` (``nyu-mll/glue``).
    data_dir: a folder with ``<task>/{train,dev}.tsv`` (the GLUE distribution layout) to use instead of the bundled one.
    train_limit: first N training examples (None: all).
    eval_limit: first N dev examples (None: all).
    max_length: truncation length in tokens.
    """

    name: str = field(default="sst2", metadata={"help": "GLUE task: rte, mrpc, cola, stsb, sst2."})
    source: str = field(default="auto", metadata={"help": "auto, bundled or hub (nyu-mll/glue)."})
    data_dir: str | None = field(default=None, metadata={"help": "Folder with <task>/{train,dev}.tsv."})
    train_limit: int | None = field(default=None, metadata={"help": "First N training examples."})
    eval_limit: int | None = field(default=None, metadata={"help": "First N dev examples."})
    max_length: int = field(default=128, metadata={"help": "Truncation length in tokens."})

    def __post_init__(self) -> None:
        from hf_memopt.tools.recipes.data import DATA_SOURCES, GLUE_TASKS

        check_choice("name", self.name, tuple(GLUE_TASKS))
        check_choice("source", self.source, DATA_SOURCES)
        _check_optional_int("train_limit", self.train_limit, 1)
        _check_optional_int("eval_limit", self.eval_limit, 1)
        check_int("max_length", self.max_length, 8)


@dataclass
class InstructData:
    """Args:
    path: Alpaca-format data: None (the bundled 999-record demo), a bundled set's name (``alpaca_en_demo``,
        ``code_alpaca_2k``), a JSON/JSONL file, or a Hub dataset id.
    train_limit: first N training records (None: all but the held-out ones).
    eval_limit: the last N records are held out for the final loss / perplexity (0: none).
    max_length: truncation length of prompt + completion, in tokens.
    sample_answers: after training, the model answers the first N held-out instructions (greedy, up to
        ``sample_answer_tokens`` new tokens); the answers go into ``results.json`` beside the reference (0: none).
    sample_answer_tokens: the longest answer generated, in tokens.
    """

    path: str | None = field(default=None, metadata={"help": "Alpaca JSON/JSONL file or Hub id; None: bundled."})
    train_limit: int | None = field(default=None, metadata={"help": "First N training records."})
    eval_limit: int = field(default=32, metadata={"help": "Last N records held out for evaluation."})
    max_length: int = field(default=512, metadata={"help": "Truncation length in tokens."})
    sample_answers: int = field(default=0, metadata={"help": "Held-out instructions answered after training."})
    sample_answer_tokens: int = field(default=96, metadata={"help": "Longest generated answer, in tokens."})

    def __post_init__(self) -> None:
        _check_optional_int("train_limit", self.train_limit, 1)
        check_int("eval_limit", self.eval_limit, 0)
        check_int("max_length", self.max_length, 8)
        check_int("sample_answers", self.sample_answers, 0, self.eval_limit)  # answered from the held-out records
        check_int("sample_answer_tokens", self.sample_answer_tokens, 1)


@dataclass
class PretrainData:
    """Args:
    sources: text sources, in order (the held-out blocks are the last source's tail): bundled names
        (wikitext2_valid, wikitext2_test, wiki_demo, c4_demo: all of them by default, ~936k MiniLM tokens), text/JSONL
        files, or ``c4`` (streamed).
    tokenizer: tokenizer name or path (``minilm`` offline; GaLore used ``t5-base``).
    seq_len: tokens per training block.
    eval_blocks: blocks held out (the last ones) for the final loss / perplexity (0: none).
    """

    sources: list[str] = field(
        default_factory=lambda: ["wikitext2_valid", "wikitext2_test", "wiki_demo", "c4_demo"],
        metadata={"help": "Bundled names, files, or 'c4' (streamed from the Hub)."},
    )
    tokenizer: str = field(default="minilm", metadata={"help": "Tokenizer name, Hub id or folder."})
    seq_len: int = field(default=256, metadata={"help": "Tokens per block."})
    eval_blocks: int = field(default=0, metadata={"help": "Blocks held out for evaluation."})

    def __post_init__(self) -> None:
        if not self.sources or not all(isinstance(s, str) and s for s in self.sources):
            raise ValueError(f"sources must be a non-empty list of names or paths; got {self.sources!r}")
        check_int("seq_len", self.seq_len, 8)
        check_int("eval_blocks", self.eval_blocks, 0)


@dataclass
class MemorySettings:
    """The recipe's ``memory:`` section: model-side settings that cut training memory outside any one method.

    Args:
        freeze_modules: modules not trained at all (names or a regex, as ``target_modules``; embeddings and linear
            layers), e.g. ``[embed_tokens]``: no gradient, no optimizer state. A tied LM head is frozen with the
            embedding it shares its weight with. Empty: nothing frozen.
        frozen_dtype: store the frozen modules in ``bfloat16`` or ``float16`` (their inputs and outputs are cast, so
            the rest of the model computes as before); None: as loaded.
        loss_chunk_size: compute the causal-LM loss this many tokens at a time, never holding the full
            tokens x vocab logits: pretraining recipes with ``hf_memopt.shared.chunked_loss`` (None: the model's own
            loss); instruct recipes, whose ``SFTTrainer`` computes the loss with TRL's fused LM head already, by
            setting that head's token tile (``hf_memopt.tools.recipes.instruct.fused_head_token_tile``; None: TRL's
            4096). Not for GLUE (a classification head has no vocabulary-sized logits).
        recompute_swiglu: LLaMA-family (SwiGLU) MLPs keep gate(x) and up(x) for backward and recompute SiLU there,
            one tokens x intermediate tensor less per layer, same bits (``hf_memopt.shared.swiglu``); a model without
            such MLPs is refused.
        malloc_mmap_threshold: fix glibc malloc's mmap threshold at this many bytes (0 to 32 MiB) before the model
            is loaded, so freed buffers above it go back to the system instead of staying in the process's resident
            set (``hf_memopt.tools.host_memory``; CPU peak RSS, at some allocation time); None: glibc's default.
    """

    freeze_modules: list[str] = field(
        default_factory=list, metadata={"help": "Modules not trained (names or regex), e.g. [embed_tokens]."}
    )
    frozen_dtype: str | None = field(
        default=None, metadata={"help": "Store frozen modules in bfloat16 or float16 (None: as loaded)."}
    )
    loss_chunk_size: int | None = field(
        default=None, metadata={"help": "Tokens per chunk of the LM loss without full logits (None: off)."}
    )
    recompute_swiglu: bool = field(
        default=False, metadata={"help": "SwiGLU MLPs recompute SiLU in backward (one intermediate less saved)."}
    )
    malloc_mmap_threshold: int | None = field(
        default=None, metadata={"help": "glibc malloc's fixed mmap threshold in bytes, e.g. 131072 (None: default)."}
    )

    def __post_init__(self) -> None:
        if isinstance(self.freeze_modules, str):
            self.freeze_modules = [self.freeze_modules]
        if not isinstance(self.freeze_modules, list) or not all(isinstance(n, str) and n for n in self.freeze_modules):
            raise ValueError(f"freeze_modules must be a list of module names; got {self.freeze_modules!r}")
        check_choice("frozen_dtype", self.frozen_dtype, ("bfloat16", "float16", None))
        if self.frozen_dtype is not None and not self.freeze_modules:
            raise ValueError("frozen_dtype needs freeze_modules (it sets the dtype of the frozen modules)")
        _check_optional_int("loss_chunk_size", self.loss_chunk_size, 1)
        check_bool("recompute_swiglu", self.recompute_swiglu)
        if self.malloc_mmap_threshold is not None:
            from hf_memopt.tools.host_memory import MAX_MMAP_THRESHOLD

            check_int("malloc_mmap_threshold", self.malloc_mmap_threshold, 0, MAX_MMAP_THRESHOLD)

    def prepare(self, model: Any) -> Any:
        """Apply the settings to a freshly loaded model (before any method is attached); returns it."""
        if self.freeze_modules:
            from hf_memopt.shared.frozen import freeze_modules

            freeze_modules(model, self.freeze_modules, self.frozen_dtype)
        if self.loss_chunk_size is not None:
            from hf_memopt.shared.chunked_loss import use_chunked_lm_loss

            use_chunked_lm_loss(model, self.loss_chunk_size)
        if self.recompute_swiglu:
            from hf_memopt.shared.swiglu import use_recomputed_swiglu

            use_recomputed_swiglu(model)
        return model


DATA_CLASSES: dict[str, type] = {"glue": GlueData, "instruct": InstructData, "pretrain": PretrainData}
DEFAULT_MODELS = {"glue": "minilm", "instruct": "smollm2", "pretrain": "llama-20m"}


def _check_optional_int(name: str, value: Any, low: int) -> None:
    if value is not None:
        check_int(name, value, low)


# ---------------------------------------------------------------------------------------------------------------
# typed parsing of values


def _type_hints(cls: type) -> dict[str, Any]:
    try:
        return typing.get_type_hints(cls)
    except Exception:  # a hint that cannot be resolved: fall back to no coercion for that class
        return {}


def coerce(value: Any, annotation: Any) -> Any:
    """``value`` converted to ``annotation`` where a YAML or ``--set`` string stands for a number, bool or None.

    Only conversions that are unambiguous are made (``"1e-4"`` to a float field, ``"64"`` to an int field,
    ``"null"`` to an optional field, ``"a,b"`` to a list field); anything else is returned unchanged for the owning
    class's validation to accept or reject.
    """
    if annotation is Any or annotation is None:
        return value
    if value is False and _is_string_setting(annotation):
        return "no"  # YAML 1.1 reads `no` as False; for a string setting (save_strategy: no) it is the string
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(annotation)
        if value is None or (isinstance(value, str) and value.strip().lower() in ("null", "none", "~")):
            if type(None) in options:
                return None
        for option in options:  # an exact match keeps the value as it is
            if option is not type(None) and _is_instance(value, option):
                return value
        for option in options:
            if option is type(None):
                continue
            converted = coerce(value, option)
            if converted is not value and _is_instance(converted, option):
                return converted
        return value
    if origin in (list, tuple):
        (item,) = typing.get_args(annotation)[:1] or (Any,)
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if isinstance(value, (list, tuple)):
            return [coerce(v, item) for v in value]
        return value
    if not isinstance(value, str):
        if annotation is float and isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        return value
    text = value.strip()
    try:
        if annotation is bool:
            lowered = text.lower()
            if lowered in ("true", "yes", "on", "1"):
                return True
            if lowered in ("false", "no", "off", "0"):
                return False
            return value
        if annotation is int:
            return int(text)
        if annotation is float:
            return float(text)
    except ValueError:
        return value
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return value  # the owning class converts strings to its enums
    return value


def _is_string_setting(annotation: Any) -> bool:
    """Whether ``annotation`` takes strings (or string enums) and no bools."""
    options = typing.get_args(annotation) if typing.get_origin(annotation) in (typing.Union, types.UnionType) else ()
    options = options or (annotation,)
    if bool in options:
        return False
    return any(o is str or (isinstance(o, type) and issubclass(o, enum.Enum)) for o in options)


def _is_instance(value: Any, annotation: Any) -> bool:
    origin = typing.get_origin(annotation)
    if origin is not None:
        return isinstance(value, origin)
    if annotation is float:
        return isinstance(value, float)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(annotation, type) and isinstance(value, annotation)


def _describe(annotation: Any) -> str:
    text = getattr(annotation, "__name__", None) or str(annotation)
    return text.replace("typing.", "").replace("NoneType", "None")


def build_dataclass(cls: type, values: dict[str, Any], where: str) -> Any:
    """``cls(**values)`` with values coerced to the field types; any error becomes a one-line :class:`RecipeError`."""
    if not isinstance(values, dict):
        raise RecipeError(f"{where}: expected a mapping of {cls.__name__} fields; got {values!r}")
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    unknown = [k for k in values if k not in names]
    if unknown:
        raise RecipeError(
            f"{where}.{unknown[0]}: {cls.__name__} has no field {unknown[0]!r}; fields: {', '.join(names)}"
        )
    hints = _type_hints(cls)
    kwargs = {k: coerce(v, hints.get(k, Any)) for k, v in values.items()}
    for key, value in kwargs.items():  # a string left where a number or bool is needed: name the key and type
        hint = hints.get(key, Any)
        if isinstance(value, str) and hint in (int, float, bool):
            raise RecipeError(f"{where}.{key}: expected {_describe(hint)}; got {value!r}")
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as err:
        raise RecipeError(f"{where}: {_one_line(err)}") from None


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return text or type(err).__name__


# ---------------------------------------------------------------------------------------------------------------
# files and overrides


def _deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict) and key != "method":
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def read_recipe_file(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """The recipe at ``path`` merged over its ``defaults:`` chain (deep merge; ``method:`` is replaced whole)."""
    path = Path(path).resolve()
    if path in _seen:
        raise RecipeError(f"{path}: defaults chain loops back to this file")
    if not path.is_file():
        raise RecipeError(f"recipe file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        raise RecipeError(f"{path}: not valid YAML{where}: {getattr(err, 'problem', None) or err}") from None
    raw = raw or {}
    if not isinstance(raw, dict):
        raise RecipeError(f"{path}: a recipe is a mapping of keys ({', '.join(TOP_LEVEL_KEYS)})")
    unknown = [k for k in raw if k not in TOP_LEVEL_KEYS]
    if unknown:
        raise RecipeError(f"{path}: unknown key {unknown[0]!r}; recipe keys: {', '.join(TOP_LEVEL_KEYS)}")
    defaults = raw.pop("defaults", None)
    if defaults is None:
        return raw
    if not isinstance(defaults, str):
        raise RecipeError(f"{path}: defaults must be a path to a YAML file; got {defaults!r}")
    base = read_recipe_file(path.parent / defaults, (*_seen, path))
    return _deep_merge(base, raw)


def apply_set(raw: dict[str, Any], assignment: str) -> None:
    """Apply one ``--set key.path=value`` to the raw recipe (value read as YAML, then typed by its field)."""
    key, sep, text = assignment.partition("=")
    key = key.strip()
    if not sep or not key:
        raise RecipeError(f"--set expects key=value (e.g. method.rank=64); got {assignment!r}")
    parts = key.split(".")
    if parts[0] not in TOP_LEVEL_KEYS or parts[0] == "defaults":
        allowed = ", ".join(k for k in TOP_LEVEL_KEYS if k != "defaults")
        raise RecipeError(f"--set {key}: unknown recipe key {parts[0]!r}; keys: {allowed}")
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        value = text
    node = raw
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise RecipeError(f"--set {key}: {'.'.join(parts[: i + 1])} is not a section")
        node = child
    node[parts[-1]] = value


# ---------------------------------------------------------------------------------------------------------------
# the validated recipe


@dataclass
class Recipe:
    """A validated recipe. ``raw`` is the merged, overridden dictionary it was built from (written next to results)."""

    task: str
    model: str
    data: Any
    training: dict[str, Any]
    method: str
    method_fields: dict[str, dict[str, Any]]
    output_dir: str
    save_model: bool
    raw: dict[str, Any]
    path: str | None = None
    memory: MemorySettings = field(default_factory=MemorySettings)

    @property
    def run_dir(self) -> str:
        """Where this method's run writes its results: ``<output_dir>/<method>``."""
        return str(Path(self.output_dir) / self.method)


def method_parts(name: str) -> list[str]:
    """``"velora+galore"`` -> ``["velora", "galore"]``; validates each name against the registry."""
    from hf_memopt.core.registry import METHODS

    if not isinstance(name, str) or not name:
        raise RecipeError(f"method.name must be a method name; got {name!r}")
    if name == BASELINE:
        return []
    parts = name.split("+")
    for part in parts:
        if part not in METHODS:
            known = ", ".join([BASELINE, *sorted(METHODS)])
            raise RecipeError(f"unknown method {part!r}; known methods: {known} (compose with '+', e.g. velora+galore)")
    if len(set(parts)) != len(parts):
        raise RecipeError(f"method {name!r} names a method twice")
    setting = [p for p in parts if METHODS[p].sets_optimizer]
    if len(setting) > 1:
        raise RecipeError(
            f"method {name!r}: {setting[0]} and {setting[1]} both supply the optimizer; compose at most one"
        )
    return parts


def method_configs(recipe: Recipe) -> list[Any]:
    """The config instances of ``recipe.method`` (empty for the ``adamw`` baseline), in attach order."""
    from hf_memopt.core.registry import METHODS

    return [
        build_dataclass(METHODS[p].config_cls, recipe.method_fields.get(p, {}), f"methods.{p}")
        for p in method_parts(recipe.method)
    ]


def _training_fields(task: str) -> tuple[type, dict[str, dataclasses.Field]]:
    if task == "instruct":
        from trl import SFTConfig as cls
    else:
        from transformers import TrainingArguments as cls
    return cls, {f.name: f for f in dataclasses.fields(cls) if f.init}


def _validate_training(task: str, training: Any) -> dict[str, Any]:
    if training is None:
        return {}
    if not isinstance(training, dict):
        raise RecipeError(f"training: expected a mapping of TrainingArguments fields; got {training!r}")
    cls, fields_ = _training_fields(task)
    hints = _type_hints(cls)
    out = {}
    for key, value in training.items():
        if key not in fields_:
            raise RecipeError(f"training.{key}: not a {cls.__name__} field")
        if key in _NOT_USED_BY_THE_RUNNERS:
            raise RecipeError(f"training.{key}: {_NOT_USED_BY_THE_RUNNERS[key]}")
        if task == "instruct" and key == "max_length":
            raise RecipeError(
                "training.max_length: set data.max_length (the recipe's one name for the truncation length)"
            )
        hint = hints.get(key, Any)
        converted = coerce(value, hint)
        if isinstance(converted, str) and hint in (int, float, bool):
            raise RecipeError(f"training.{key}: expected {_describe(hint)}; got {value!r}")
        out[key] = converted
    _check_reporters(out.get("report_to"))
    if out.get("push_to_hub") and _hub_offline():
        raise RecipeError(
            "training.push_to_hub: the Hugging Face Hub is offline (HF_HUB_OFFLINE is set); set push_to_hub: false, "
            "or unset HF_HUB_OFFLINE and log in (hf auth login)"
        )
    try:  # the class's own checks (conflicting strategies, bad enum strings) before anything is loaded
        with tempfile.TemporaryDirectory() as tmp:
            base = {"bf16": False, "fp16": False} if task == "instruct" else {}  # as run_instruct's defaults
            cls(output_dir=tmp, **{**base, **{k: v for k, v in out.items() if k not in _NOT_IN_VALIDATION}})
    except (ValueError, TypeError) as err:
        raise RecipeError(f"training: {_one_line(err)}") from None
    return out


def _hub_offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.is_offline_mode())


def _check_reporters(report_to: Any) -> None:
    """Every logger ``report_to`` names is installed (the Trainer would fail on it only after loading everything)."""
    if report_to is None or report_to in ("all", "none"):
        return
    from transformers.integrations import get_available_reporting_integrations
    from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK

    names = [report_to] if isinstance(report_to, str) else list(report_to)
    installed = get_available_reporting_integrations()
    for name in names:
        if name in ("all", "none"):
            continue
        if name not in INTEGRATION_TO_CALLBACK:
            raise RecipeError(
                f"training.report_to: unknown logger {name!r}; known: {', '.join(INTEGRATION_TO_CALLBACK)}"
            )
        if name not in installed:
            package = {"azure_ml": "azureml-core", "comet_ml": "comet-ml", "kubeflow": "kubeflow-trainer"}.get(
                name, name
            )
            raise RecipeError(
                f"training.report_to: {name!r} is not installed; pip install {package}, or leave it out of report_to"
            )


# TrainingArguments fields the Trainer does not read ("intended for training/evaluation scripts") or that the recipe
# names elsewhere: accepted, they would change nothing, so they are refused with what to do instead.
_NOT_USED_BY_THE_RUNNERS = {
    "output_dir": "set the recipe's top-level output_dir instead",
    "resume_from_checkpoint": "the Trainer does not read it; resume with `hf-memopt train RECIPE --resume [CHECKPOINT]` "
    "(run_recipe(..., resume_from_checkpoint=...) from Python)",
    "do_train": "the Trainer does not read it; a recipe always trains",
    "do_eval": "the Trainer does not read it; a recipe evaluates on its held-out data after training (eval_strategy "
    "evaluates during training)",
    "do_predict": "the Trainer does not read it; recipes do not predict on a test set",
}

# settings that only make sense with what the runner adds (an eval set): checked when the run starts
_NOT_IN_VALIDATION = ("eval_strategy", "load_best_model_at_end", "metric_for_best_model", "eval_steps")


def check_runnable(recipe: Recipe) -> None:
    """Checks of the environment that can fail a run only after minutes of loading: the run folder can be written, and
    every model the recipe names as a Hub id is reachable (or cached) when the Hub is offline."""
    run_dir = Path(recipe.run_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=run_dir):
            pass
    except OSError as err:
        reason = err.strerror or type(err).__name__
        raise RecipeError(
            f"output_dir: cannot write to {run_dir} ({reason}); choose a writable folder, e.g. --set output_dir=out/try"
        ) from None
    if recipe.task == "pretrain":
        _check_hub_model("data.tokenizer", recipe.data.tokenizer, "tokenizer_config.json")
    else:
        _check_hub_model("model", recipe.model, "config.json")


def _check_hub_model(key: str, name: str, filename: str) -> None:
    from hf_memopt.tools.recipes.models import OFFLINE_MODELS, offline_package_dir

    if name in OFFLINE_MODELS:
        try:
            offline_package_dir(name)
        except FileNotFoundError as err:
            raise RecipeError(f"{key}: {err}") from None
        return
    if Path(name).exists() or not _hub_offline():
        return
    from huggingface_hub import try_to_load_from_cache

    try:
        cached = try_to_load_from_cache(name, filename)
    except ValueError:  # not a valid repository id either (HFValidationError)
        raise RecipeError(
            f"{key}: {name!r} is neither an offline name ({', '.join(OFFLINE_MODELS)}), a folder nor a Hub id"
        ) from None
    if not isinstance(cached, str):
        raise RecipeError(
            f"{key}: {name!r} is a Hub id, the Hugging Face Hub is offline (HF_HUB_OFFLINE is set) and it is not in the "
            f"local cache; use an offline name ({', '.join(OFFLINE_MODELS)}) or a local folder, or unset HF_HUB_OFFLINE"
        )


def load_recipe(
    path: str | Path | None,
    sets: list[str] | tuple[str, ...] = (),
    method: str | None = None,
    raw: dict[str, Any] | None = None,
) -> Recipe:
    """Read, merge, override and validate a recipe.

    ``method`` (the CLI's ``--method``) replaces ``method.name``; when it names another method than the file, the
    file's ``method:`` fields (which belong to that other method) are dropped. ``sets`` are applied afterwards, so
    ``--method blockllm --set method.sparsity=0.5`` works, and a ``training.<field>`` set wins over the recipe's
    ``method_training`` value for the method that runs (``--set training.learning_rate=1e-3`` trains at 1e-3), as
    does every field of a whole section set with ``--set training={...}``.
    ``raw`` skips reading ``path``.
    """
    raw = copy.deepcopy(raw) if raw is not None else read_recipe_file(path)
    if method is not None:
        current = raw.get("method")
        current_name = current.get("name") if isinstance(current, dict) else current
        if current_name != method:
            raw["method"] = {"name": method}
    for assignment in sets:
        apply_set(raw, assignment)
    # a ``--set training.<field>`` is the caller's last word: it replaces that field in every ``method_training``
    # entry too, so the recipe stays the same when its raw form is written out and read again (``compare``)
    # (``--set training={...}`` pins every field it names; a field a later set dropped again pins nothing)
    training_section = raw.get("training")
    training_section = training_section if isinstance(training_section, dict) else {}  # else: reported below
    pinned: set[str] = set()
    for key in (a.partition("=")[0].strip() for a in sets):
        if key == "training":
            pinned.update(training_section)
        elif key.startswith("training."):
            pinned.add(key.split(".")[1])
    pinned &= training_section.keys()
    per_method_sets = raw.get("method_training")
    for values in per_method_sets.values() if isinstance(per_method_sets, dict) else ():
        if isinstance(values, dict):  # anything else is reported below, where method_training is validated
            values.update({key: training_section[key] for key in pinned & values.keys()})

    task = raw.get("task")
    if task not in TASKS:
        raise RecipeError(f"task must be one of {', '.join(TASKS)}; got {task!r}")
    model = raw.get("model", DEFAULT_MODELS[task])
    if not isinstance(model, str) or not model:
        raise RecipeError(f"model must be a model name, Hub id or folder; got {model!r}")
    if task == "pretrain":
        from hf_memopt.tools.recipes.models import LLAMA_SIZES

        sizes = tuple(f"llama-{s}" for s in LLAMA_SIZES)
        if model not in sizes:
            raise RecipeError(
                f"model: pretraining builds a LLaMA from a config: one of {', '.join(sizes)}; got {model!r}"
            )
    data = build_dataclass(DATA_CLASSES[task], raw.get("data") or {}, "data")
    training = _validate_training(task, raw.get("training"))

    section = raw.get("method", {"name": BASELINE})
    if isinstance(section, str):
        section = {"name": section}
    if not isinstance(section, dict):
        raise RecipeError(f"method: expected a mapping with 'name' and that method's fields; got {section!r}")
    section = dict(section)
    name = section.pop("name", BASELINE)
    parts = method_parts(name)
    table = raw.get("methods") or {}
    if not isinstance(table, dict):
        raise RecipeError(f"methods: expected a mapping of method name -> settings; got {table!r}")
    method_fields: dict[str, dict[str, Any]] = {}
    for key, values in table.items():
        method_parts(key)
        if key == BASELINE or "+" in key:
            raise RecipeError(f"methods.{key}: settings are given per registered method")
        if not isinstance(values, dict):
            raise RecipeError(f"methods.{key}: expected a mapping of fields; got {values!r}")
        method_fields[key] = dict(values)
    if section:
        if len(parts) != 1:
            what = "the adamw baseline has no settings" if not parts else "a composite method takes its settings"
            raise RecipeError(f"method.{next(iter(section))}: {what} (use methods.<name>.<field>)")
        method_fields[parts[0]] = {**method_fields.get(parts[0], {}), **section}
    from hf_memopt.core.registry import METHODS

    for key, values in method_fields.items():  # every table entry must be valid, not only the one run now
        where = "method" if parts and key == parts[0] and section else f"methods.{key}"
        build_dataclass(METHODS[key].config_cls, values, where)

    per_method = raw.get("method_training") or {}
    if not isinstance(per_method, dict):
        raise RecipeError(
            f"method_training: expected a mapping of method name -> training settings; got {per_method!r}"
        )
    for key, values in per_method.items():
        if key != BASELINE:
            method_parts(key)
        if "+" in key:
            raise RecipeError(f"method_training.{key}: settings are given per method (adamw or a registered name)")
        try:
            _validate_training(task, values)
        except RecipeError as err:
            text = str(err)
            text = f"method_training.{key}{text[len('training') :]}" if text.startswith("training") else text
            raise RecipeError(text) from None
    for part in parts or [BASELINE]:
        training.update(_validate_training(task, per_method.get(part)))
    supplier = next((part for part in parts if METHODS[part].sets_optimizer), None)
    ignored = [key for key in ("optim", "optim_args", "optim_target_modules") if key in training]
    if supplier and ignored:  # the method's optimizer replaces the Trainer's: these would be accepted and ignored
        raise RecipeError(
            f"training.{ignored[0]}: {supplier} supplies the optimizer, so the Trainer never reads it; remove it "
            f"(the method's own settings go under methods.{supplier})"
        )
    hub_only = [key for key in training if key.startswith("hub_")]
    if hub_only and not training.get("push_to_hub"):  # the Trainer reads hub_* only to push
        raise RecipeError(f"training.{hub_only[0]}: used only to push to the Hub; set training.push_to_hub: true too")

    stem = Path(path).stem if path is not None else task
    output_dir = raw.get("output_dir") or str(Path("out") / stem)
    if not isinstance(output_dir, str):
        raise RecipeError(f"output_dir must be a path; got {output_dir!r}")
    memory = build_dataclass(MemorySettings, raw.get("memory") or {}, "memory")
    if memory.loss_chunk_size is not None and task == "glue":
        raise RecipeError(
            "memory.loss_chunk_size: pretraining and instruct recipes only (a classification head has no "
            "vocabulary-sized logits); remove it"
        )
    save_model = coerce(raw.get("save_model", False), bool)
    try:
        check_bool("save_model", save_model)
    except ValueError as err:
        raise RecipeError(str(err)) from None
    return Recipe(
        task,
        model,
        data,
        training,
        name,
        method_fields,
        output_dir,
        save_model,
        raw,
        str(path) if path is not None else None,
        memory,
    )
