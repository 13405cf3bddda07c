"""GLUE, instruction and pretraining text data: bundled offline copies, or the Hub for users who have it.

GLUE TSVs are read with ``quoting=QUOTE_NONE`` (several rows contain quotes) and ``utf-8-sig`` (MRPC starts with a
BOM); CoLA has no header row. Sources and licenses of the bundled files: ``hf_memopt/data/README.md``.
"""

from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "BUNDLED_DATA",
    "BUNDLED_TEXT",
    "DATA_SOURCES",
    "GLUE_TASKS",
    "GlueTask",
    "load_alpaca",
    "load_glue",
    "load_text",
    "stream_c4_text",
]

BUNDLED_DATA = Path(__file__).resolve().parents[2] / "data"
# The bundled pretraining text (hf_memopt/data/README.md): name -> file under hf_memopt/data/text.
BUNDLED_TEXT = {
    "wikitext2_valid": "wikitext2_valid.txt",  # WikiText-2 validation split (217k words)
    "wikitext2_test": "wikitext2_test.txt",  # WikiText-2 test split (246k words)
    "wiki_demo": "wiki_demo.txt",  # 30 Wikipedia articles
    "c4_demo": "c4_demo.jsonl",  # 300 C4 documents
}


@dataclass(frozen=True)
class GlueTask:
    """How to read one GLUE task: text columns, label column, number of labels (1 = regression), metric names."""

    name: str
    text_columns: tuple[str, ...]
    label_column: str
    num_labels: int
    metrics: tuple[str, ...]
    has_header: bool = True


GLUE_TASKS: dict[str, GlueTask] = {
    "rte": GlueTask("rte", ("sentence1", "sentence2"), "label", 2, ("accuracy",)),
    "mrpc": GlueTask("mrpc", ("#1 String", "#2 String"), "Quality", 2, ("accuracy", "f1")),
    "cola": GlueTask("cola", ("sentence",), "label", 2, ("matthews_correlation",), has_header=False),
    "stsb": GlueTask("stsb", ("sentence1", "sentence2"), "score", 1, ("pearson", "spearmanr")),
    "sst2": GlueTask("sst2", ("sentence",), "label", 2, ("accuracy",)),
}
_COLA_COLUMNS = ("source", "label", "original_judgment", "sentence")
_RTE_LABELS = {"entailment": 0, "not_entailment": 1}


def _glue_dir(task: str, data_dir: str | os.PathLike | None) -> Path | None:
    candidates = [data_dir, os.environ.get("HF_MEMOPT_GLUE_DIR"), BUNDLED_DATA / "glue"]
    for base in candidates:
        if base and (Path(base) / task).is_dir():
            return Path(base) / task
    return None


def read_glue_tsv(path: Path, task: GlueTask) -> list[dict[str, object]]:
    """Rows of a GLUE TSV as ``{"text_a", "text_b", "label"}`` (``text_b`` absent for single-sentence tasks)."""
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        header = next(reader) if task.has_header else list(_COLA_COLUMNS)
        index = {name: i for i, name in enumerate(header)}
        rows = []
        for values in reader:
            if len(values) < len(header):
                continue
            raw = values[index[task.label_column]]
            if task.num_labels == 1:
                label: object = float(raw)
            else:
                label = _RTE_LABELS[raw] if task.name == "rte" else int(raw)
            row = {"text_a": values[index[task.text_columns[0]]], "label": label}
            if len(task.text_columns) == 2:
                row["text_b"] = values[index[task.text_columns[1]]]
            rows.append(row)
    return rows


DATA_SOURCES = ("auto", "bundled", "hub")


def load_glue(
    task: str,
    split: str = "train",
    limit: int | None = None,
    data_dir: str | None = None,
    source: str = "auto",
):
    """A ``datasets.Dataset`` with ``text_a`` [, ``text_b``], ``label`` for a GLUE task.

    ``source="auto"`` looks in ``data_dir``, ``$HF_MEMOPT_GLUE_DIR``, then the bundled copy (SST-2 train is bundled as
    its first 20,000 rows), and otherwise loads ``nyu-mll/glue`` from the Hub; ``"bundled"`` never goes to the Hub,
    ``"hub"`` always does. ``split`` is ``train`` or ``dev`` (``validation`` accepted).
    """
    import datasets

    if task not in GLUE_TASKS:
        raise ValueError(f"task must be one of {tuple(GLUE_TASKS)}; got {task!r}")
    if source not in DATA_SOURCES:
        raise ValueError(f"source must be one of {DATA_SOURCES}; got {source!r}")
    split = "dev" if split == "validation" else split
    if split not in ("train", "dev"):
        raise ValueError(f"split must be 'train' or 'dev'; got {split!r}")
    spec = GLUE_TASKS[task]
    folder = None if source == "hub" else _glue_dir(task, data_dir)
    if folder is None and source == "bundled":
        raise ValueError(f"no bundled GLUE data for {task!r} (looked in data_dir, $HF_MEMOPT_GLUE_DIR, {BUNDLED_DATA})")
    if folder is not None:
        rows = read_glue_tsv(folder / f"{split}.tsv", spec)
        if limit is not None:
            rows = rows[:limit]
        return datasets.Dataset.from_list(rows)
    hub = load_hub_dataset(
        "data.source",
        "use the bundled TSVs (source: auto or bundled) or a data_dir",
        "nyu-mll/glue",
        task,
        split="validation" if split == "dev" else "train",
    )
    keys = {"rte": ("sentence1", "sentence2"), "mrpc": ("sentence1", "sentence2"), "stsb": ("sentence1", "sentence2")}
    a, b = keys.get(task, ("sentence", None))
    hub = hub.rename_column(a, "text_a")
    if b:
        hub = hub.rename_column(b, "text_b")
    hub = hub.remove_columns([c for c in hub.column_names if c not in ("text_a", "text_b", "label")])
    return hub.select(range(min(limit, len(hub)))) if limit is not None else hub


def load_hub_dataset(setting: str, instead: str, *args, **kwargs):
    """``datasets.load_dataset(*args, **kwargs)``; when the Hub cannot be reached (offline mode, no network) the error
    is one ``ConnectionError`` that names the recipe ``setting`` that asked for it and what to use ``instead``."""
    import datasets

    try:
        return datasets.load_dataset(*args, **kwargs)
    except ConnectionError as err:
        reason = " ".join(str(err).split()) or type(err).__name__
        raise ConnectionError(
            f"{setting}: {args[0]!r} is read from the Hugging Face Hub, which cannot be reached ({reason}); {instead}, "
            "or connect and unset HF_HUB_OFFLINE"
        ) from err


BUNDLED_INSTRUCT = ("alpaca_en_demo", "code_alpaca_2k")  # hf_memopt/data/instruct/<name>.json


def load_alpaca(path: str | os.PathLike | None = None, limit: int | None = None) -> list[dict[str, str]]:
    """Alpaca-format records ``{instruction, input, output}``.

    ``path``: ``None`` for the bundled demo set (999 records), the name of a bundled set (``alpaca_en_demo``,
    ``code_alpaca_2k``: 2,017 code instructions), a ``.json`` (list of records) or ``.jsonl`` file, or a Hub dataset id
    with those columns (``tatsu-lab/alpaca``), loaded with ``datasets.load_dataset(path, split="train")``.
    """
    if path is None or str(path) in BUNDLED_INSTRUCT:
        path = BUNDLED_DATA / "instruct" / f"{path or 'alpaca_en_demo'}.json"
    path = Path(path)
    if path.exists():
        with open(path, encoding="utf-8") as f:
            if path.suffix == ".jsonl":
                records = [json.loads(line) for line in f if line.strip()]
            else:
                records = json.load(f)
    else:
        hub = load_hub_dataset(
            "data.path", "use a local JSON or JSONL file (null: the bundled demo)", str(path), split="train"
        )
        records = [dict(r) for r in (hub.select(range(min(limit, len(hub)))) if limit is not None else hub)]
    for i, r in enumerate(records[:limit] if limit is not None else records):
        if not isinstance(r, dict) or "instruction" not in r or "output" not in r:
            raise ValueError(f"{path}: record {i} is not Alpaca-format (needs 'instruction' and 'output' keys)")
    return records[:limit] if limit is not None else records


def stream_c4_text(max_chars: int, name: str = "allenai/c4", config: str = "en"):
    """Documents of C4's train split, streamed with ``datasets`` (nothing downloaded up front), until ``max_chars``.

    Yields document texts; GaLore's pretraining runs use this split.
    """
    total = 0
    rows = load_hub_dataset(
        "data.sources",
        f"use the bundled sources ({', '.join(BUNDLED_TEXT)}) or text files",
        name,
        config,
        split="train",
        streaming=True,
    )
    for row in rows:
        yield row["text"]
        total += len(row["text"])
        if total >= max_chars:
            return


def load_text(name: str = "wikitext2_valid") -> str:
    """Raw pretraining text: a bundled name (:data:`BUNDLED_TEXT`) or a text / JSONL (field ``text``) file path."""
    path = Path(name)
    if not path.exists() and name in BUNDLED_TEXT:
        path = BUNDLED_DATA / "text" / BUNDLED_TEXT[name]
    if not path.exists():
        raise ValueError(f"text source {name!r} is neither a bundled name ({', '.join(BUNDLED_TEXT)}) nor a file")
    if path.suffix == ".jsonl":
        with open(path, encoding="utf-8") as f:
            return "\n\n".join(json.loads(line)["text"] for line in f if line.strip())
    return path.read_text(encoding="utf-8")
