"""Choosing operating points on a ROC curve."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import roc_curve

from medsight.errors import MetricNotComputableError


def youden_threshold(y: np.ndarray, p_pos: np.ndarray) -> float:
    """Threshold maximising sensitivity + specificity - 1 (Youden's J)."""
    if len(np.unique(y)) < 2:
        raise MetricNotComputableError("Youden's J needs both classes present")
    fpr, tpr, thr = roc_curve(y, p_pos)
    j = tpr - fpr
    best = int(np.argmax(j))
    return float(min(thr[best], 1.0))


def threshold_for_sensitivity(y: np.ndarray, p_pos: np.ndarray, target: float) -> float:
    """Highest threshold whose sensitivity is at least ``target``."""
    if len(np.unique(y)) < 2:
        raise MetricNotComputableError("a sensitivity target needs both classes present")
    fpr, tpr, thr = roc_curve(y, p_pos)
    ok = np.where(tpr >= target)[0]
    return float(min(thr[ok[0]], 1.0))
