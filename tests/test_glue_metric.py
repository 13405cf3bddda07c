"""The GLUE metrics: the numpy arithmetic against slow textbook twins, and the offline ``evaluate`` module against it."""

from __future__ import annotations

import math

import numpy as np
import pytest

from hf_memopt.tools.recipes.data import GLUE_TASKS
from hf_memopt.tools.recipes.metrics import METRIC_FUNCTIONS, glue_compute_metrics, load_glue_metric


def _confusion(pred, ref):
    pairs = list(zip(pred.tolist(), ref.tolist()))
    return tuple(sum(1 for p, r in pairs if (p, r) == cell) for cell in [(1, 1), (0, 0), (1, 0), (0, 1)])


def _f1_twin(pred, ref):
    tp, _, fp, fn = _confusion(pred, ref)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    return 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)


def _mcc_twin(pred, ref):
    tp, tn, fp, fn = _confusion(pred, ref)
    denom = math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    return 0.0 if denom == 0 else (tp * tn - fp * fn) / denom


def _pearson_twin(x, y):
    x, y = x.tolist(), y.tolist()
    mx, my = sum(x) / len(x), sum(y) / len(y)
    cov = sum((a - mx) * (b - my) for a, b in zip(x, y))
    return cov / math.sqrt(sum((a - mx) ** 2 for a in x) * sum((b - my) ** 2 for b in y))


def _ranks_twin(x):
    """Average rank of each value (1-based), ties sharing the mean of the ranks they span: O(n^2), obviously right."""
    x = x.tolist()
    return np.array([sum(v < xi for v in x) + (sum(v == xi for v in x) + 1) / 2 for xi in x])


TWINS = {
    "accuracy": lambda p, r: float(np.mean([a == b for a, b in zip(p.tolist(), r.tolist())])),
    "f1": _f1_twin,
    "matthews_correlation": _mcc_twin,
    "pearson": _pearson_twin,
    "spearmanr": lambda p, r: _pearson_twin(_ranks_twin(p), _ranks_twin(r)),
}


def _sample(task: str, seed: int):
    rng = np.random.default_rng(seed)
    if GLUE_TASKS[task].num_labels == 1:
        ref = rng.integers(0, 11, 64) / 2.0  # STS-B scores 0-5 in halves: many ties, as in the dev set
        return (ref + rng.normal(0, 1.5, 64).round(1)).astype(np.float32), ref.astype(np.float32)
    ref = rng.integers(0, 2, 64)
    return np.where(rng.random(64) < 0.7, ref, 1 - ref), ref


@pytest.mark.parametrize("name", sorted(TWINS))
def test_metric_arithmetic_equals_its_textbook_twin(name):
    for seed in range(5):
        pred, ref = _sample("stsb" if name in ("pearson", "spearmanr") else "mrpc", seed)
        assert METRIC_FUNCTIONS[name](pred, ref) == pytest.approx(TWINS[name](pred, ref), abs=1e-12)


@pytest.mark.parametrize("task", sorted(GLUE_TASKS))
def test_offline_evaluate_module_equals_the_offline_metrics(task):
    metric = load_glue_metric(task)
    pred, ref = _sample(task, seed=1)
    got = metric.compute(predictions=pred, references=ref)
    want = {name: METRIC_FUNCTIONS[name](pred, ref) for name in GLUE_TASKS[task].metrics}
    assert got.keys() == want.keys()
    for name in want:
        assert got[name] == pytest.approx(want[name], abs=1e-12)


def test_trainer_compute_metrics_goes_through_evaluate_with_argmax_or_squeeze():
    from transformers import EvalPrediction

    logits = np.array([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7]])
    assert glue_compute_metrics("mrpc")(EvalPrediction(logits, np.array([1, 0, 0]))) == pytest.approx(
        {"accuracy": 2 / 3, "f1": 2 / 3}
    )
    scores = np.array([[1.0], [2.0], [4.0]])
    stsb = glue_compute_metrics("stsb")(EvalPrediction(scores, np.array([1.0, 3.0, 2.0])))
    assert stsb["spearmanr"] == pytest.approx(0.5)


def test_unknown_task_is_refused_with_the_allowed_names():
    with pytest.raises(ValueError, match=r"task must be one of .*'rte'"):
        load_glue_metric("mnli")
