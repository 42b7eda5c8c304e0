"""The official GLUE metrics of each task, and the GLUE score (the mean of a task's metrics)."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

from pipeline.data.tasks import get_task


def compute_metrics(task: str, predictions: Sequence, labels: Sequence) -> dict[str, float]:
    """Metric name -> value in [0, 1] (correlations in [-1, 1]), plus `score`, their mean.

    `predictions` are class ids (or floats for STS-B), not logits.
    """
    spec = get_task(task)
    preds = np.asarray(predictions)
    gold = np.asarray(labels)
    if preds.shape != gold.shape:
        raise ValueError(f"{len(preds)} predictions for {len(gold)} labels")
    out: dict[str, float] = {}
    for name in spec.metrics:
        if name == "accuracy":
            out[name] = float(accuracy_score(gold, preds))
        elif name == "f1":
            out[name] = float(f1_score(gold, preds))
        elif name == "matthews_correlation":
            out[name] = float(matthews_corrcoef(gold, preds))
        elif name == "pearson":
            out[name] = float(pearsonr(preds, gold)[0])
        elif name == "spearmanr":
            out[name] = float(spearmanr(preds, gold)[0])
    out["score"] = float(np.mean([out[m] for m in spec.metrics]))
    return out


def logits_to_predictions(task: str, logits: np.ndarray) -> np.ndarray:
    """Class ids from logits, or the regression value for STS-B."""
    if get_task(task).is_regression:
        return np.asarray(logits).reshape(len(logits), -1)[:, 0]
    return np.asarray(logits).argmax(-1)


def trivial_score(task: str, train_labels: Sequence, dev_labels: Sequence) -> float:
    """The task's score of a model that always answers the training set's majority class: the floor a
    retention is measured from. A constant answer has no correlation with anything, so Matthews and the
    correlations give 0 (scipy would return nan)."""
    spec = get_task(task)
    if spec.is_regression or "matthews_correlation" in spec.metrics:
        return 0.0
    values, counts = np.unique(np.asarray(train_labels), return_counts=True)
    majority = values[counts.argmax()]
    return compute_metrics(task, np.full(len(dev_labels), majority), dev_labels)["score"]


def margin_retention(student: float, teacher: float, trivial: float) -> float | None:
    """(student - trivial) / (teacher - trivial): the share of the teacher's lead over the trivial answer
    that the student keeps, so a near-chance teacher cannot flatter its student."""
    return (student - trivial) / (teacher - trivial) if teacher > trivial else None
