"""The threshold table: what a clinic gets at each candidate operating point.

For each threshold it lists sensitivity and specificity (with Wilson 95% CIs from
``scipy.stats.binomtest``), PPV, NPV and false-positive rate on the data, and the
*expected alarms per 1,000 studies* at the data set's prevalence and at a
prevalence the user gives. PPV/NPV depend on prevalence, so they are recomputed
at the user's prevalence with Bayes' rule from sensitivity and specificity:

    alarms / 1000 = 1000 * (prev * sens + (1 - prev) * (1 - spec))
    PPV           = prev * sens / (prev * sens + (1 - prev) * (1 - spec))
    NPV           = (1 - prev) * spec / ((1 - prev) * spec + prev * (1 - sens))

Thresholds chosen on the same data they are reported on (Youden's J, the
sensitivity targets) are optimistic there; the report says so.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy.stats import binomtest

from medsight.errors import MetricNotComputableError
from medsight.evaluate.thresholds import threshold_for_sensitivity, youden_threshold


def wilson_ci(successes: int, trials: int) -> list[float] | None:
    if trials == 0:
        return None
    ci = binomtest(int(successes), int(trials)).proportion_ci(confidence_level=0.95, method="wilson")
    return [float(ci.low), float(ci.high)]


def _ratio(a: float, b: float) -> float | None:
    return None if b == 0 else float(a) / float(b)


def at_prevalence(sens: float | None, spec: float | None, prevalence: float) -> dict[str, float | None]:
    """Expected alarms (true + false) per 1,000 studies, PPV and NPV at a given prevalence."""
    if sens is None or spec is None:
        return {"prevalence": prevalence, "alarms_per_1000": None, "true_alarms_per_1000": None,
                "false_alarms_per_1000": None, "ppv": None, "npv": None}
    tp, fp = prevalence * sens, (1 - prevalence) * (1 - spec)
    tn, fn = (1 - prevalence) * spec, prevalence * (1 - sens)
    return {
        "prevalence": prevalence,
        "alarms_per_1000": 1000 * (tp + fp),
        "true_alarms_per_1000": 1000 * tp,
        "false_alarms_per_1000": 1000 * fp,
        "ppv": _ratio(tp, tp + fp),
        "npv": _ratio(tn, tn + fn),
    }


def row_at(y: np.ndarray, score: np.ndarray, threshold: float, name: str, user_prevalence: float | None) -> dict[str, Any]:
    """Counts and rates for the decision ``score >= threshold`` (y in {0, 1})."""
    pred = score >= threshold
    pos, neg = y == 1, y == 0
    tp, fn = int((pred & pos).sum()), int((~pred & pos).sum())
    fp, tn = int((pred & neg).sum()), int((~pred & neg).sum())
    sens, spec = _ratio(tp, tp + fn), _ratio(tn, tn + fp)
    prevalence = float(pos.mean()) if len(y) else 0.0
    return {
        "name": name, "threshold": float(threshold), "tp": tp, "fp": fp, "tn": tn, "fn": fn,
        "sensitivity": sens, "sensitivity_ci": wilson_ci(tp, tp + fn),
        "specificity": spec, "specificity_ci": wilson_ci(tn, tn + fp),
        "ppv": _ratio(tp, tp + fp), "npv": _ratio(tn, tn + fn), "fpr": _ratio(fp, fp + tn),
        "at_data_prevalence": at_prevalence(sens, spec, prevalence),
        "at_user_prevalence": None if user_prevalence is None else at_prevalence(sens, spec, user_prevalence),
    }


def threshold_table(
    y: np.ndarray, score: np.ndarray, operating_threshold: float | None, user_prevalence: float | None = None,
    targets: Sequence[float] = (0.90, 0.95, 0.99), fixed: Sequence[float] = (0.1, 0.3, 0.5, 0.7, 0.9),
) -> dict[str, Any]:
    """Rows for the model's operating point, Youden's J, each sensitivity target and fixed thresholds.

    A data-chosen threshold that cannot be computed (one class present) becomes a row
    with ``threshold: None`` and the reason, so the table always has the same rows.
    """
    y = np.asarray(y).astype(int)
    s = np.asarray(score, dtype=np.float64)
    rows: list[dict[str, Any]] = []
    if operating_threshold is not None:
        rows.append(row_at(y, s, operating_threshold, "model operating point (card)", user_prevalence))
    chosen: list[tuple[str, Any]] = [("max Youden's J *", lambda: youden_threshold(y, s))]
    chosen += [(f"sensitivity ≥ {t:.2f} *", lambda t=t: threshold_for_sensitivity(y, s, t)) for t in targets]
    for name, pick in chosen:
        try:
            rows.append(row_at(y, s, pick(), name, user_prevalence))
        except MetricNotComputableError as e:
            rows.append({"name": name, "threshold": None, "not_computable": str(e)})
    rows += [row_at(y, s, t, f"fixed {t:.2f}", user_prevalence) for t in fixed]
    return {
        "n": int(len(y)), "n_positive": int(y.sum()), "data_prevalence": float(y.mean()) if len(y) else None,
        "user_prevalence": user_prevalence, "rows": rows,
    }
