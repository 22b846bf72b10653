"""Lean metric functions for bootstrap loops over subgroups.

Why not :class:`~medsight.evaluate.metrics.Scorer` inside the loop: scikit-learn's
per-call input validation costs milliseconds, and a subgroup analysis runs
``2 x n_boot`` evaluations per subgroup (tens of thousands per report). These
functions compute the same definitions from one confusion matrix and a rank-based
AUC (``scipy.stats.rankdata``; AUC = Mann-Whitney U / (n_pos * n_neg), ties count
one half, exactly as ``roc_auc_score``). tests/evaluate/test_subgroups.py checks
them against Scorer on random data. Point estimates in reports still come from Scorer.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from scipy.stats import rankdata

MetricFn = Callable[[np.ndarray, np.ndarray], dict[str, float | None]]


def _auc(pos: np.ndarray, score: np.ndarray) -> float | None:
    n1 = int(pos.sum())
    n0 = pos.size - n1
    if n1 == 0 or n0 == 0:
        return None
    ranks = rankdata(score)
    return float((ranks[pos].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def _ratio(a: float, b: float) -> float | None:
    return None if b == 0 else float(a) / float(b)


def binary_fn(positive_index: int, threshold: float) -> MetricFn:
    def fn(y: np.ndarray, probs: np.ndarray) -> dict[str, float | None]:
        pos = np.asarray(y) == positive_index
        s = probs[:, positive_index]
        pred = s >= threshold
        tp, fn_, fp = int((pred & pos).sum()), int((~pred & pos).sum()), int((pred & ~pos).sum())
        tn = pos.size - tp - fn_ - fp
        return {"auc": _auc(pos, s), "sensitivity": _ratio(tp, tp + fn_), "specificity": _ratio(tn, tn + fp),
                "ppv": _ratio(tp, tp + fp), "npv": _ratio(tn, tn + fn_), "accuracy": _ratio(tp + tn, pos.size)}

    return fn


def multiclass_fn(k: int) -> MetricFn:
    """Macro one-vs-rest definitions of :func:`medsight.evaluate.metrics.multiclass_metrics`."""

    def fn(y: np.ndarray, probs: np.ndarray) -> dict[str, float | None]:
        y = np.asarray(y)
        pred = probs.argmax(axis=1)
        cm = np.bincount(y * k + pred, minlength=k * k).reshape(k, k)
        tp = np.diag(cm).astype(float)
        fn_, fp = cm.sum(axis=1) - tp, cm.sum(axis=0) - tp
        tn = cm.sum() - tp - fn_ - fp

        def macro(num: np.ndarray, den: np.ndarray) -> float | None:
            ok = den > 0
            return float(np.mean(num[ok] / den[ok])) if ok.any() else None

        present = np.unique(y)
        aucs = [_auc(y == c, probs[:, c]) for c in present] if len(present) >= 2 else []
        return {"auc": float(np.mean(aucs)) if aucs else None, "accuracy": float((pred == y).mean()) if y.size else None,
                "sensitivity": macro(tp, tp + fn_), "specificity": macro(tn, tn + fp), "ppv": macro(tp, tp + fp)}

    return fn


def percentile_ci(samples: list[float], n_boot: int, alpha: float = 0.05) -> list[float] | None:
    """Percentile CI, or None when fewer than half of the resamples defined the metric (as bootstrap_metrics)."""
    if len(samples) < n_boot / 2:
        return None
    return np.quantile(samples, [alpha / 2, 1 - alpha / 2]).tolist()


def _counts_at_thresholds(pos: np.ndarray, score: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Cumulative false/true positives at each distinct threshold, highest first (as sklearn's ROC code)."""
    order = np.argsort(-score, kind="mergesort")
    s, t = score[order], pos[order].astype(float)
    last = np.r_[np.where(np.diff(s))[0], s.size - 1]
    tps = np.cumsum(t)[last]
    return 1 + last - tps, tps


def roc_points(pos: np.ndarray, score: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(fpr, tpr) from (0, 0); same points as ``sklearn.metrics.roc_curve(drop_intermediate=False)``."""
    fps, tps = _counts_at_thresholds(pos, score)
    return np.r_[0.0, fps / fps[-1]], np.r_[0.0, tps / tps[-1]]


def pr_points(pos: np.ndarray, score: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(precision, recall) with recall decreasing to 0; same as ``sklearn.metrics.precision_recall_curve``."""
    fps, tps = _counts_at_thresholds(pos, score)
    precision = tps / (tps + fps)
    recall = tps / tps[-1]
    return np.r_[precision[::-1], 1.0], np.r_[recall[::-1], 0.0]


def average_precision(pos: np.ndarray, score: np.ndarray) -> float:
    """sum_n (R_n - R_{n-1}) P_n, the definition of ``sklearn.metrics.average_precision_score``."""
    precision, recall = pr_points(pos, score)
    return float(-np.sum(np.diff(recall) * precision[:-1]))


def auc(pos: np.ndarray, score: np.ndarray) -> float | None:
    return _auc(np.asarray(pos, dtype=bool), np.asarray(score, dtype=np.float64))
