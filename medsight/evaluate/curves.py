"""ROC and precision-recall curves with bootstrap confidence bands, and reliability bins.

Curve points come from scikit-learn (``roc_curve``, ``precision_recall_curve``,
``average_precision_score``). scikit-learn has no confidence band for a curve, so
the band is built here: cases are resampled with replacement, each resampled
curve is interpolated onto a fixed grid, and the 2.5th/97.5th percentiles are
taken point by point ("vertical averaging", Fawcett 2006, sec. 8). Inside the
resampling loop the curves come from :mod:`medsight.evaluate.resample` (same points
as scikit-learn, without its per-call validation cost; tested against it).

A curve that cannot be drawn (one class present) is returned as
``{"computable": False, "reason": ...}``, never as NaN.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score, roc_curve

from medsight.evaluate import resample

GRID = np.linspace(0.0, 1.0, 101)


def _not_computable(y: np.ndarray) -> str | None:
    if len(y) == 0:
        return "no cases"
    if y.min() == y.max():
        present = "positive" if y[0] == 1 else "negative"
        return f"only {present} cases are present, so the curve is undefined"
    return None


def _interp_roc(y: np.ndarray, s: np.ndarray) -> np.ndarray:
    fpr, tpr = resample.roc_points(y == 1, s)
    return np.interp(GRID, fpr, tpr)


def _interp_pr(y: np.ndarray, s: np.ndarray) -> np.ndarray:
    precision, recall = resample.pr_points(y == 1, s)
    # interpolated precision: best precision at recall >= r (the usual PR-curve convention)
    precision = np.maximum.accumulate(precision)  # recall is decreasing along the arrays
    return np.interp(GRID, recall[::-1], precision[::-1])


def _bands(y: np.ndarray, s: np.ndarray, n_boot: int, seed: int, alpha: float) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    rocs, prs, aucs, aps = [], [], [], []
    n = len(y)
    for _ in range(n_boot):
        idx = rng.integers(0, n, n)
        yb, sb = y[idx], s[idx]
        if yb.min() == yb.max():
            continue  # a resample with one class has no curve; it is dropped, as in bootstrap_metrics
        rocs.append(_interp_roc(yb, sb))
        prs.append(_interp_pr(yb, sb))
        aucs.append(resample.auc(yb == 1, sb))
        aps.append(resample.average_precision(yb == 1, sb))
    if len(rocs) < max(1, n_boot / 2):
        return {"roc_band": None, "pr_band": None, "auc_ci": None, "ap_ci": None, "n_boot_used": len(rocs)}
    q = [alpha / 2, 1 - alpha / 2]
    rb, pb = np.quantile(np.stack(rocs), q, axis=0), np.quantile(np.stack(prs), q, axis=0)
    return {
        "roc_band": {"lower": rb[0].tolist(), "upper": rb[1].tolist()},
        "pr_band": {"lower": pb[0].tolist(), "upper": pb[1].tolist()},
        "auc_ci": np.quantile(aucs, q).tolist(),
        "ap_ci": np.quantile(aps, q).tolist(),
        "n_boot_used": len(rocs),
    }


def binary_curves(y: np.ndarray, score: np.ndarray, n_boot: int = 1000, seed: int = 0, alpha: float = 0.05) -> dict[str, Any]:
    """ROC + PR of one positive class: exact curve points, grid-interpolated curves and bands."""
    y = np.asarray(y).astype(int)
    s = np.asarray(score, dtype=np.float64)
    reason = _not_computable(y)
    if reason:
        return {"computable": False, "reason": reason, "n": int(len(y)), "n_positive": int(y.sum())}
    fpr, tpr, _ = roc_curve(y, s)
    precision, recall, _ = precision_recall_curve(y, s)
    out = {
        "computable": True,
        "n": int(len(y)),
        "n_positive": int(y.sum()),
        "prevalence": float(y.mean()),
        "auc": float(roc_auc_score(y, s)),
        "average_precision": float(average_precision_score(y, s)),
        "roc": {"fpr": fpr.tolist(), "tpr": tpr.tolist()},
        "pr": {"recall": recall.tolist(), "precision": precision.tolist()},
        "grid": GRID.tolist(),
        "ci_method": f"percentile bootstrap of cases, {n_boot} resamples, {100 * (1 - alpha):.0f}% pointwise band",
    }
    out.update(_bands(y, s, n_boot, seed, alpha))
    return out


def one_vs_rest_curves(y: np.ndarray, probs: np.ndarray, labels: list[str], n_boot: int = 1000, seed: int = 0) -> dict[str, Any]:
    """One ROC/PR curve per class (class vs the rest), for multi-class models."""
    return {lab: binary_curves((np.asarray(y) == k).astype(int), probs[:, k], n_boot, seed + k) for k, lab in enumerate(labels)}


def reliability_bins(confidence: np.ndarray, correct: np.ndarray, n_bins: int = 15) -> list[dict[str, Any]]:
    """Equal-width bins on (0, 1] with the same edges as :func:`medsight.evaluate.metrics.expected_calibration_error`."""
    conf = np.asarray(confidence, dtype=np.float64)
    corr = np.asarray(correct, dtype=np.float64)
    bins = np.clip(np.ceil(conf * n_bins).astype(int) - 1, 0, n_bins - 1)
    out = []
    for b in range(n_bins):
        m = bins == b
        out.append({
            "lower": b / n_bins, "upper": (b + 1) / n_bins, "count": int(m.sum()),
            "mean_confidence": float(conf[m].mean()) if m.any() else None,
            "accuracy": float(corr[m].mean()) if m.any() else None,
        })
    return out


def risk_coverage(confidence: np.ndarray, correct: np.ndarray) -> dict[str, Any]:
    """Selective prediction: error rate among the cases answered when the least confident are referred.

    Cases are answered in order of decreasing confidence; ``coverage[i]`` is the fraction
    answered and ``risk[i]`` the error rate among them. AURC is the area under that curve
    (lower is better; Geifman & El-Yaniv 2017).
    """
    conf = np.asarray(confidence, dtype=np.float64)
    wrong = 1.0 - np.asarray(correct, dtype=np.float64)
    if conf.size == 0:
        return {"computable": False, "reason": "no cases"}
    order = np.argsort(-conf, kind="stable")
    risk = np.cumsum(wrong[order]) / np.arange(1, conf.size + 1)
    # report the curve on a fixed coverage grid so its size does not grow with the data set
    coverage = GRID[1:]
    k = np.clip(np.ceil(coverage * conf.size - 1e-9).astype(int), 1, conf.size)
    return {
        "computable": True,
        "coverage": (k / conf.size).tolist(),
        "risk": risk[k - 1].tolist(),
        "min_confidence_answered": conf[order][k - 1].tolist(),
        "aurc": float(np.mean(risk)),
        "risk_at_full_coverage": float(risk[-1]),
    }
