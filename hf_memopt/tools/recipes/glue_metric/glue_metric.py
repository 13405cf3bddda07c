"""The GLUE metric as an ``evaluate`` module that loads offline.

``evaluate.load("glue", task)`` downloads its script from the Hub, which these machines cannot reach. This file is a
local ``evaluate`` module with the same interface and definitions (Wang et al., 2019, "GLUE", Table 1: accuracy,
F1 of the positive class, Matthews correlation, Pearson and Spearman correlation), loaded by path::

    metric = evaluate.load(hf_memopt.tools.recipes.metrics.GLUE_METRIC_PATH, "mrpc")
    metric.compute(predictions=[0, 1], references=[0, 1])   # {"accuracy": 1.0, "f1": 1.0}

The arithmetic lives in ``hf_memopt.tools.recipes.metrics`` (numpy only, so neither scipy nor scikit-learn is needed); this
module is the ``evaluate`` front end a user's own evaluation code can share.
"""

import datasets
import evaluate
import numpy as np

from hf_memopt.tools.recipes.data import GLUE_TASKS
from hf_memopt.tools.recipes.metrics import METRIC_FUNCTIONS

_DESCRIPTION = "GLUE metrics for rte, mrpc, cola, stsb and sst2, computed locally (no Hub download)."
_KWARGS_DESCRIPTION = """
Args:
    predictions: predicted labels (stsb: predicted scores).
    references: gold labels (stsb: gold scores).
Returns: the task's GLUE metrics, e.g. {"accuracy": ..., "f1": ...} for mrpc, {"pearson": ..., "spearmanr": ...}
for stsb, {"matthews_correlation": ...} for cola.
"""
_CITATION = """@inproceedings{wang2019glue, title={{GLUE}: A Multi-Task Benchmark and Analysis Platform for Natural
Language Understanding}, author={Wang, Alex and Singh, Amanpreet and Michael, Julian and Hill, Felix and Levy, Omer and
Bowman, Samuel R.}, booktitle={ICLR}, year={2019}}"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class GlueMetric(evaluate.Metric):
    """``evaluate.Metric`` for one GLUE task, chosen by the config name (``"rte"``, ``"mrpc"`` ...)."""

    def _info(self) -> evaluate.MetricInfo:
        if self.config_name not in GLUE_TASKS:
            raise KeyError(f"config name must be one of {sorted(GLUE_TASKS)}; got {self.config_name!r}")
        # float32 scores for the regression task, as evaluate's own glue module declares them.
        value = datasets.Value("float32" if GLUE_TASKS[self.config_name].num_labels == 1 else "int64")
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": value, "references": value}),
            format="numpy",
        )

    def _compute(self, predictions, references) -> dict[str, float]:
        pred, ref = np.asarray(predictions), np.asarray(references)
        return {name: METRIC_FUNCTIONS[name](pred, ref) for name in GLUE_TASKS[self.config_name].metrics}
