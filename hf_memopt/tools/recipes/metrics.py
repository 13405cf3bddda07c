"""The GLUE metrics, computed offline and served through the ``evaluate`` library.

``evaluate.load("glue", ...)`` fetches its script from the Hub; :data:`GLUE_METRIC_PATH` is a local ``evaluate`` module
with the same interface, whose arithmetic is the functions below. Same definitions as the GLUE benchmark and
``evaluate``'s glue module: accuracy, binary F1 of the positive class, Matthews correlation, Pearson and Spearman
correlation (Spearman = Pearson of average ranks).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

__all__ = [
    "GLUE_METRIC_PATH",
    "METRIC_FUNCTIONS",
    "accuracy",
    "f1",
    "glue_compute_metrics",
    "load_glue_metric",
    "matthews_correlation",
    "pearson",
    "spearmanr",
]

GLUE_METRIC_PATH = str(Path(__file__).resolve().parent / "glue_metric")


def accuracy(pred: np.ndarray, ref: np.ndarray) -> float:
    return float((pred == ref).mean())


def f1(pred: np.ndarray, ref: np.ndarray) -> float:
    tp = float(((pred == 1) & (ref == 1)).sum())
    fp = float(((pred == 1) & (ref == 0)).sum())
    fn = float(((pred == 0) & (ref == 1)).sum())
    return 0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn)


def matthews_correlation(pred: np.ndarray, ref: np.ndarray) -> float:
    tp = float(((pred == 1) & (ref == 1)).sum())
    tn = float(((pred == 0) & (ref == 0)).sum())
    fp = float(((pred == 1) & (ref == 0)).sum())
    fn = float(((pred == 0) & (ref == 1)).sum())
    denom = np.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    return 0.0 if denom == 0 else float((tp * tn - fp * fn) / denom)


def pearson(pred: np.ndarray, ref: np.ndarray) -> float:
    pred, ref = pred.astype(np.float64), ref.astype(np.float64)
    if pred.std() == 0 or ref.std() == 0:
        return 0.0
    return float(np.corrcoef(pred, ref)[0, 1])


def _average_ranks(x: np.ndarray) -> np.ndarray:
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x), dtype=np.float64)
    sorted_x = x[order]
    i = 0
    while i < len(x):
        j = i
        while j + 1 < len(x) and sorted_x[j + 1] == sorted_x[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    return ranks


def spearmanr(pred: np.ndarray, ref: np.ndarray) -> float:
    return pearson(_average_ranks(np.asarray(pred)), _average_ranks(np.asarray(ref)))


METRIC_FUNCTIONS: dict[str, Callable[[np.ndarray, np.ndarray], float]] = {
    "accuracy": accuracy,
    "f1": f1,
    "matthews_correlation": matthews_correlation,
    "pearson": pearson,
    "spearmanr": spearmanr,
}


def load_glue_metric(task: str):
    """``evaluate.load`` of the local GLUE module for ``task`` (works offline; ``evaluate`` is imported on use)."""
    import evaluate

    from hf_memopt.tools.recipes.data import GLUE_TASKS

    if task not in GLUE_TASKS:
        raise ValueError(f"task must be one of {tuple(GLUE_TASKS)}; got {task!r}")
    return evaluate.load(GLUE_METRIC_PATH, task)


def glue_compute_metrics(task: str) -> Callable[[object], dict[str, float]]:
    """A ``compute_metrics`` for ``Trainer`` that returns the task's GLUE metrics from an ``EvalPrediction``."""
    from hf_memopt.tools.recipes.data import GLUE_TASKS

    regression = GLUE_TASKS[task].num_labels == 1
    metric = load_glue_metric(task)

    def compute(eval_pred) -> dict[str, float]:
        logits, labels = eval_pred.predictions, eval_pred.label_ids
        logits = logits[0] if isinstance(logits, tuple) else logits
        pred = logits.squeeze(-1) if regression else logits.argmax(-1)
        return metric.compute(predictions=np.asarray(pred), references=np.asarray(labels))

    return compute
