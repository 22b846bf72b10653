"""Clinical classification metrics with bootstrap confidence intervals.

Ranking and counting metrics come from scikit-learn; what it lacks (NPV,
specificity per class, expected calibration error, a vectorised bootstrap) is
written here and tested against hand-computed cases.

Conventions (also in docs/metrics.md):
* binary: ``probs`` is (N, 2); the positive class is ``positive_index``; the
  decision is ``p_pos >= threshold``.
* multi-class: one-vs-rest *macro* averages for AUC, sensitivity, specificity,
  PPV, NPV, FPR and F1; decision is argmax; Brier is the multi-class Brier score
  (sum over classes, mean over cases); ECE is top-label ECE.
* A metric that is undefined on the data (AUC with one class present, PPV with
  no positive calls) is ``None``, never NaN, and its CI is ``None``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from sklearn.metrics import confusion_matrix, roc_auc_score

from medsight.errors import DataSetError
from medsight.models.card import ModelCard
from medsight.models.policy import operating_threshold

METRICS = ("auc", "accuracy", "sensitivity", "specificity", "ppv", "npv", "fpr", "f1", "brier", "ece")


def _ratio(num: float, den: float) -> float | None:
    return None if den == 0 else float(num) / float(den)


def expected_calibration_error(confidence: np.ndarray, correct: np.ndarray, n_bins: int = 15) -> float:
    """ECE with equal-width bins on (0, 1]: sum_b |B|/N * |acc(B) - conf(B)|."""
    confidence = np.asarray(confidence, dtype=np.float64)
    correct = np.asarray(correct, dtype=np.float64)
    if confidence.size == 0:
        raise DataSetError("ECE of an empty set is undefined")
    # bin b holds confidences in (b/n, (b+1)/n]; confidence 0 goes in the first bin.
    bins = np.clip(np.ceil(confidence * n_bins).astype(int) - 1, 0, n_bins - 1)
    total = 0.0
    for b in range(n_bins):
        m = bins == b
        if m.any():
            total += m.sum() * abs(correct[m].mean() - confidence[m].mean())
    return float(total / confidence.size)


def binary_metrics(y: np.ndarray, p_pos: np.ndarray, threshold: float = 0.5, n_bins: int = 15) -> dict[str, float | None]:
    """Metrics for a binary task. ``y`` in {0,1} (1 = positive finding)."""
    y = np.asarray(y).astype(int)
    p = np.asarray(p_pos, dtype=np.float64)
    pred = (p >= threshold).astype(int)
    tn, fp, fn, tp = confusion_matrix(y, pred, labels=[0, 1]).ravel()
    sens, ppv = _ratio(tp, tp + fn), _ratio(tp, tp + fp)
    f1 = None if sens is None or ppv is None or (sens + ppv) == 0 else 2 * sens * ppv / (sens + ppv)
    conf = np.where(pred == 1, p, 1 - p)
    return {
        "auc": float(roc_auc_score(y, p)) if len(np.unique(y)) == 2 else None,
        "accuracy": float((pred == y).mean()),
        "sensitivity": sens,
        "specificity": _ratio(tn, tn + fp),
        "ppv": ppv,
        "npv": _ratio(tn, tn + fn),
        "fpr": _ratio(fp, fp + tn),
        "f1": f1,
        "brier": float(np.mean((p - y) ** 2)),
        "ece": expected_calibration_error(conf, pred == y, n_bins),
    }


def multiclass_metrics(y: np.ndarray, probs: np.ndarray, n_bins: int = 15) -> dict[str, float | None]:
    y = np.asarray(y).astype(int)
    probs = np.asarray(probs, dtype=np.float64)
    k = probs.shape[1]
    pred = probs.argmax(axis=1)
    cm = confusion_matrix(y, pred, labels=list(range(k)))
    tp = np.diag(cm).astype(float)
    fn = cm.sum(axis=1) - tp
    fp = cm.sum(axis=0) - tp
    tn = cm.sum() - tp - fn - fp

    def macro(num: np.ndarray, den: np.ndarray) -> float | None:
        vals = [n / d for n, d in zip(num, den) if d > 0]
        return float(np.mean(vals)) if vals else None

    per_f1 = [2 * t / (2 * t + a + b) for t, a, b in zip(tp, fp, fn) if (2 * t + a + b) > 0]
    present = np.unique(y)
    auc = None
    if len(present) == k:
        auc = float(roc_auc_score(y, probs, multi_class="ovr", average="macro", labels=list(range(k))))
    elif len(present) >= 2:
        # OvR AUC over the classes that are present (absent classes have no positives).
        auc = float(np.mean([roc_auc_score(y == c, probs[:, c]) for c in present]))
    onehot = np.eye(k)[y]
    return {
        "auc": auc,
        "accuracy": float((pred == y).mean()),
        "sensitivity": macro(tp, tp + fn),
        "specificity": macro(tn, tn + fp),
        "ppv": macro(tp, tp + fp),
        "npv": macro(tn, tn + fn),
        "fpr": macro(fp, fp + tn),
        "f1": float(np.mean(per_f1)) if per_f1 else None,
        "brier": float(np.mean(np.sum((probs - onehot) ** 2, axis=1))),
        "ece": expected_calibration_error(probs.max(axis=1), pred == y, n_bins),
    }


def multilabel_metrics(y: np.ndarray, probs: np.ndarray, thresholds: np.ndarray | float = 0.5) -> dict[str, float | None]:
    """Macro average of per-label binary metrics (labels with one class present skip AUC)."""
    y = np.asarray(y).astype(int)
    th = np.broadcast_to(np.asarray(thresholds, dtype=float), (y.shape[1],))
    per = [binary_metrics(y[:, j], probs[:, j], th[j]) for j in range(y.shape[1])]
    out: dict[str, float | None] = {}
    for m in METRICS:
        vals = [d[m] for d in per if d[m] is not None]
        out[m] = float(np.mean(vals)) if vals else None
    return out


@dataclass
class Scorer:
    """Binds task, threshold and positive class so metrics are a function of (y, probs)."""

    task: str
    positive_index: int = 1
    threshold: float = 0.5

    @classmethod
    def for_card(cls, card: ModelCard, threshold: float | None = None) -> "Scorer":
        """Metrics at the card's operating point (:func:`medsight.models.policy.operating_threshold`),
        or at ``threshold`` when given."""
        return cls(card.task, card.positive_index if card.task == "binary" else 1,
                   operating_threshold(card) if threshold is None else threshold)

    def __call__(self, y: np.ndarray, probs: np.ndarray) -> dict[str, float | None]:
        if len(y) == 0:
            raise DataSetError("cannot compute metrics on an empty data set")
        if self.task == "binary":
            return binary_metrics((np.asarray(y) == self.positive_index).astype(int), probs[:, self.positive_index], self.threshold)
        if self.task == "multilabel":
            return multilabel_metrics(y, probs, self.threshold)
        return multiclass_metrics(y, probs)


def bootstrap_metrics(
    scorer: Scorer, y: np.ndarray, probs: np.ndarray, n_boot: int = 1000, alpha: float = 0.05, seed: int = 0
) -> dict[str, dict[str, object]]:
    """Point estimates plus percentile bootstrap CIs (cases resampled with replacement).

    Resamples where a metric is undefined are dropped for that metric; if fewer
    than half of them remain the CI is reported as ``None`` rather than trusted.
    """
    point = scorer(y, probs)
    rng = np.random.default_rng(seed)
    n = len(y)
    samples: dict[str, list[float]] = {m: [] for m in point}
    for _ in range(n_boot):
        idx = rng.integers(0, n, n)
        for m, v in scorer(y[idx], probs[idx]).items():
            if v is not None and not math.isnan(v):
                samples[m].append(v)
    out: dict[str, dict[str, object]] = {}
    for m, v in point.items():
        s = samples[m]
        ci = None
        if v is not None and len(s) >= n_boot / 2:
            ci = [float(np.quantile(s, alpha / 2)), float(np.quantile(s, 1 - alpha / 2))]
        out[m] = {"value": v, "ci": ci}
    return out
