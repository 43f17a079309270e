"""GLUE's metrics (scikit-learn / scipy) and the GLUE score as the leaderboard computes it.

Values are fractions (accuracy 0.85, not 85); tables multiply by 100 as GLUE prints them.

The GLUE score: each task's score is the unweighted mean of its metrics (MRPC and QQP: F1 and
accuracy; STS-B: Pearson and Spearman), MNLI's score is the mean of its matched and mismatched
accuracies, and the GLUE score is the mean of the nine task scores (AX is not part of it). This
reproduces the leaderboard's published scores, e.g. BERT-base 78.3 and BERT-large 80.5 from their
per-task test numbers; counting MNLI-m and MNLI-mm as two of ten entries would give 78.9 and 81.1.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence

import numpy as np
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

from finetune.errors import FinetuneError
from finetune.tasks import GLUE_TASKS, get_task


def _correlation(fn):
    def compute(labels, predictions) -> float:
        # Constant predictions make a correlation undefined (scipy warns and returns nan); count it
        # as 0, no correlation, as scikit-learn's matthews_corrcoef does for its degenerate case.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            value = float(fn(labels, predictions)[0])
        return 0.0 if math.isnan(value) else value

    return compute


# name -> f(labels, predictions); F1 is of the positive class "1" (label id 1), as GLUE reports it.
METRICS = {
    "accuracy": lambda y, p: float(accuracy_score(y, p)),
    "f1": lambda y, p: float(f1_score(y, p, pos_label=1, average="binary", zero_division=0.0)),
    "mcc": lambda y, p: float(matthews_corrcoef(y, p)),
    "pearson": _correlation(pearsonr),
    "spearman": _correlation(spearmanr),
}

DISPLAY = {"accuracy": "Acc", "f1": "F1", "mcc": "MCC", "pearson": "Pearson", "spearman": "Spearman"}


def compute(names: Sequence[str], labels: Sequence, predictions: Sequence) -> dict[str, float]:
    """The named metrics of predictions (label ids, or scores for STS-B) against labels."""
    labels, predictions = np.asarray(labels), np.asarray(predictions)
    if labels.shape != predictions.shape:
        raise FinetuneError(f"metrics: {len(labels)} labels but {len(predictions)} predictions")
    if len(labels) == 0:
        raise FinetuneError("metrics: no examples to score")
    unknown = [n for n in names if n not in METRICS]
    if unknown:
        raise FinetuneError(f"metrics: unknown metric {unknown[0]!r} (choose from {', '.join(METRICS)})")
    return {name: METRICS[name](labels, predictions) for name in names}


def task_score(dev: Mapping[str, Mapping[str, float]]) -> float:
    """A task's score from its dev metrics {eval set: {metric: value}}: the mean over eval sets
    (MNLI-m, MNLI-mm) of the mean of each set's metrics."""
    if not dev:
        raise FinetuneError("metrics: no dev results to score")
    return float(np.mean([np.mean(list(values.values())) for values in dev.values()]))


def glue_score(task_scores: Mapping[str, float]) -> float | None:
    """The GLUE score from {task: task score} (canonical names); None unless all nine are there."""
    scores = {get_task(name).name: value for name, value in task_scores.items()}
    if any(name not in scores for name in GLUE_TASKS):
        return None
    return float(np.mean([scores[name] for name in GLUE_TASKS]))
