"""Downstream metrics: regression, classification and multilabel scores, in numpy.

- regression: ``spearman``, ``pearson`` (scipy.stats), ``r2``, ``rmse``; with several targets
  each is the mean over the target columns;
- classification: ``accuracy``, ``f1_macro`` (over the classes present in truth or prediction, as
  scikit-learn does), ``mcc`` (Gorodkin's multiclass form), ``auroc`` (binary, or one-vs-rest macro
  over classes that have both positives and negatives);
- multilabel: ``auroc/<label name>`` per label (``auroc/<k>`` when no names are given) and
  ``auroc_mean`` (labels lacking a class are left out).

AUROC is the Mann-Whitney statistic with average ranks, so tied scores count one half.
Every metric in `PRIMARY` is higher-is-better; RMSE is the only lower-is-better one.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
from scipy import stats

from helm.downstream.tasks import TaskType

PRIMARY = {TaskType.REGRESSION: "spearman", TaskType.CLASSIFICATION: "accuracy",
           TaskType.MULTILABEL: "auroc_mean"}  # fmt: skip
LOWER_IS_BETTER = frozenset({"rmse"})


def average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks of `x`; tied values share the mean of the ranks they span."""
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    # The distinct value with index j occupies ranks start_j + 1 ... start_j + count_j.
    starts = np.cumsum(counts) - counts
    return (starts + (counts + 1) / 2.0)[inverse]


def auroc(y_true: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve of binary labels; nan when only one class is present or when any
    score is nan (a diverged model has no ranking: it must not get a finite AUROC)."""
    y_true = np.asarray(y_true).astype(bool)
    scores = np.asarray(scores, dtype=np.float64)
    n_pos = int(y_true.sum())
    n_neg = len(y_true) - n_pos
    if n_pos == 0 or n_neg == 0 or np.isnan(scores).any():
        return float("nan")
    ranks = average_ranks(scores)
    return float((ranks[y_true].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> np.ndarray:
    """(C, C) counts, rows true class, columns predicted class."""
    return np.bincount(y_true * num_classes + y_pred, minlength=num_classes**2).reshape(
        num_classes, num_classes
    )


def f1_macro(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Unweighted mean of per-class F1 = 2TP / (2TP + FP + FN) over classes seen in either array."""
    labels = np.union1d(y_true, y_pred)
    f1 = []
    for c in labels:
        tp = np.sum((y_true == c) & (y_pred == c))
        denom = (
            2 * tp + np.sum((y_true != c) & (y_pred == c)) + np.sum((y_true == c) & (y_pred != c))
        )
        f1.append(2 * tp / denom if denom else 0.0)
    return float(np.mean(f1))


def mcc(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Matthews correlation, multiclass (Gorodkin 2004); 0 when a marginal is constant.

    MCC = (c s - sum_k p_k t_k) / sqrt((s^2 - sum p_k^2)(s^2 - sum t_k^2)) with c correct
    predictions, s samples, t_k / p_k the true / predicted counts of class k.
    """
    num_classes = int(max(y_true.max(), y_pred.max())) + 1
    cm = confusion_matrix(y_true, y_pred, num_classes).astype(np.float64)
    t, p, c, s = cm.sum(axis=1), cm.sum(axis=0), np.trace(cm), cm.sum()
    denom = np.sqrt((s**2 - p @ p) * (s**2 - t @ t))
    return float((c * s - t @ p) / denom) if denom > 0 else 0.0


def _correlation(fn, a: np.ndarray, b: np.ndarray) -> float:
    # Constant predictions (an untrained head, early epochs) have no correlation: nan, no warning.
    if len(a) < 2 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return float("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(fn(a, b)[0])


def regression_metrics(y_true: np.ndarray, y_pred: np.ndarray) -> dict[str, float]:
    """Spearman, Pearson, R^2 and RMSE; for (N, K) targets each is averaged over the K columns."""
    y_true = np.asarray(y_true, dtype=np.float64).reshape(len(y_true), -1)
    y_pred = np.asarray(y_pred, dtype=np.float64).reshape(len(y_pred), -1)
    cols = []
    for t, p in zip(y_true.T, y_pred.T):
        ss_tot = np.sum((t - t.mean()) ** 2)
        cols.append(
            {
                "spearman": _correlation(stats.spearmanr, p, t),
                "pearson": _correlation(stats.pearsonr, p, t),
                "r2": float(1 - np.sum((t - p) ** 2) / ss_tot) if ss_tot > 0 else float("nan"),
                "rmse": float(np.sqrt(np.mean((t - p) ** 2))),
            }
        )
    return {k: float(np.mean([c[k] for c in cols])) for k in cols[0]}


def classification_metrics(y_true: np.ndarray, scores: np.ndarray) -> dict[str, float]:
    """Accuracy, macro-F1, MCC and AUROC from (N, C) class scores (or (N,) predicted ids).

    AUROC needs scores; with predicted ids only, it is left out.
    """
    y_true = np.asarray(y_true, dtype=np.int64)
    scores = np.asarray(scores)
    y_pred = scores.argmax(axis=1) if scores.ndim == 2 else scores.astype(np.int64)
    out = {
        "accuracy": float(np.mean(y_true == y_pred)),
        "f1_macro": f1_macro(y_true, y_pred),
        "mcc": mcc(y_true, y_pred),
    }
    if scores.ndim == 2:
        if scores.shape[1] == 2:
            out["auroc"] = auroc(y_true == 1, scores[:, 1])
        else:
            per_class = [auroc(y_true == k, scores[:, k]) for k in range(scores.shape[1])]
            out["auroc"] = _mean_auroc(per_class, scores)
    return out


def multilabel_metrics(
    y_true: np.ndarray, scores: np.ndarray, label_names: Sequence[str] | None = None
) -> dict[str, float]:
    """Per-label AUROC (``auroc/<name>``, or ``auroc/<k>`` without names) and their mean over
    labels with both classes present."""
    y_true, scores = np.asarray(y_true), np.asarray(scores)
    names = list(label_names) if label_names is not None else list(range(y_true.shape[1]))
    if len(names) != y_true.shape[1]:
        raise ValueError(f"{len(names)} label names for {y_true.shape[1]} labels")
    per_label = [auroc(y_true[:, k], scores[:, k]) for k in range(y_true.shape[1])]
    out = {f"auroc/{name}": v for name, v in zip(names, per_label)}
    out["auroc_mean"] = _mean_auroc(per_label, scores)
    return out


def _mean_auroc(values: list[float], scores: np.ndarray) -> float:
    """Mean over the classes (labels) with both kinds present; nan if any score is nan."""
    return float("nan") if np.isnan(scores).any() else _nanmean(values)


def _nanmean(values: list[float]) -> float:
    finite = [v for v in values if not np.isnan(v)]
    return float(np.mean(finite)) if finite else float("nan")


def compute_metrics(
    task: str,
    y_true: np.ndarray,
    y_pred_or_scores: np.ndarray,
    label_names: Sequence[str] | None = None,
) -> dict[str, float]:
    """All metrics of a task type: regression predictions, class scores or label scores.

    `label_names` names the per-label AUROCs of a multilabel task (ignored otherwise)."""
    if task == TaskType.REGRESSION:
        return regression_metrics(y_true, y_pred_or_scores)
    if task == TaskType.CLASSIFICATION:
        return classification_metrics(y_true, y_pred_or_scores)
    if task == TaskType.MULTILABEL:
        return multilabel_metrics(y_true, y_pred_or_scores, label_names)
    raise ValueError(f"unknown task type {task!r}; expected one of {sorted(PRIMARY)}")


def better(metric: str, a: float, b: float) -> bool:
    """Whether value `a` beats `b` for `metric` (nan never beats anything; anything beats nan)."""
    if np.isnan(a):
        return False
    if np.isnan(b):
        return True
    return a < b if metric in LOWER_IS_BETTER else a > b
