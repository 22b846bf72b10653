"""Worklist priority: which study should a radiologist read next?

    score = w_critical * P(critical)                 # calibrated, from the model card
          + w_requested[requested priority]          # the clinician's STAT / urgent / routine
          + w_refer * [model referred to a human]    # uncertain or out-of-distribution
          + w_waiting * min(minutes waiting / cap, 1)

``P(critical)`` is the calibrated probability that the study shows one of the
card's ``critical_findings`` (:func:`medsight.models.policy.critical_probability`,
the card's policy). A study with several images takes its most urgent image. Everything but waiting time is fixed when
analysis finishes and stored as ``priority_base``; waiting time is added in SQL
at query time, so the order is always current. Weights live in
:class:`~medsight.serve.config.TriageWeights`.
"""

from __future__ import annotations

from sqlalchemy import ColumnElement, case, literal

from medsight.serve.config import TriageWeights
from medsight.serve.db import Study


def base_score(w: TriageWeights, requested: str, p_critical: float | None, refer: bool) -> float:
    """The time-independent part of the score."""
    return (w.critical * (p_critical or 0.0) + w.requested.get(requested.lower(), 0.0)
            + (w.refer if refer else 0.0))


def waiting_term(w: TriageWeights, received_epoch: float, now_epoch: float) -> float:
    return w.waiting * min(max(now_epoch - received_epoch, 0.0) / 60.0 / w.waiting_cap_minutes, 1.0)


def score(w: TriageWeights, requested: str, p_critical: float | None, refer: bool, received_epoch: float, now_epoch: float) -> float:
    return base_score(w, requested, p_critical, refer) + waiting_term(w, received_epoch, now_epoch)


def score_sql(w: TriageWeights, now_epoch: float) -> ColumnElement[float]:
    """The same score as a SQL expression (plain arithmetic and CASE: identical on SQLite and PostgreSQL)."""
    fraction = (literal(now_epoch) - Study.received_epoch) / (60.0 * w.waiting_cap_minutes)
    capped = case((fraction > 1.0, 1.0), (fraction < 0.0, 0.0), else_=fraction)
    return Study.priority_base + w.waiting * capped


def urgency(w: TriageWeights, value: float) -> str:
    """Colour band of a score: "high" (red), "medium" (amber), "low" (green)."""
    return "high" if value >= w.high else "medium" if value >= w.medium else "low"
