"""Worklist priority: which study should a radiologist read next?

    score = w_critical * P(critical)                 # calibrated, from the model card
          + w_requested[requested priority]          # the clinician's STAT / urgent / routine
          + w_refer * [model referred to a human]    # uncertain or out-of-distribution
          + w_waiting * min(minutes waiting / cap, 1)

``P(critical)`` is the calibrated probability that the study shows one of the
card's ``critical_findings`` (:func:`medsight.models.policy.critical_probability`,
the card's policy). A study with several images takes its most urgent image.

A referred image reports no finding (:func:`medsight.models.policy.reported_finding`):
it is never flagged ``critical`` (no bold label, no critical-finding webhook) and the
worklist shows no label for it. Its P(critical) still counts in the score, with the
refer weight on top: the model's uncertainty may only move a study up, towards a
human, never below where a confident result with the same probability would be. Everything but waiting time is fixed when
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


def most_urgent(results):  # noqa: ANN001, ANN201 - results of one analysis (db.Result rows)
    """The image a study is ranked and reviewed by: the highest P(critical), a referred one on a tie."""
    return max(results, key=lambda r: (r.critical_probability, r.refer), default=None)


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
