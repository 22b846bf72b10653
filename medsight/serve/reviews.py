"""Human review of model results, and agreement between model and reviewers.

A review records, per finding, whether the model called it present, whether the
reviewer says it is present, and so whether the reviewer *confirmed* or
*corrected* the model. Reviews are insert-only (database triggers refuse
updates); a second review of the same result is a new row, and the most recent
review of a result is the reference label for export and agreement.
"""

from __future__ import annotations

from collections import defaultdict
from datetime import datetime
from typing import Any

from scipy.stats import binomtest
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from medsight.errors import MedSightError
from medsight.serve.audit import Actor, record
from medsight.serve.db import Result, Review, ReviewFinding, Study
from medsight.serve.triage import most_urgent


#: What a reader may answer instead of one of the model's labels: the image is not for this model. Such a
#: review (action "exclude") holds no per-finding verdict, so it never counts in agreement and never becomes
#: training data for a label (medsight.serve.export skips it).
EXCLUSIONS = ("not applicable", "wrong body part", "poor quality")


class ReviewError(MedSightError):
    """A review that does not fit the result it is about (unknown label, missing finding...)."""


def latest_results(session: Session, study_id: int) -> list[Result]:
    """The results of the study's latest analysis: a late instance analyses the whole study again, and the
    earlier analysis's results (kept for the record and their reviews) no longer describe the study."""
    last = session.execute(select(func.max(Result.job_id)).where(Result.study_id == study_id)).scalar_one_or_none()
    if last is None:
        return []
    return list(session.execute(select(Result).where(Result.study_id == study_id, Result.job_id == last)
                                .order_by(Result.id)).scalars())


def key_result(session: Session, study_id: int) -> Result | None:
    """The study's most urgent image of its latest analysis: the one the worklist ranked it by."""
    return most_urgent(latest_results(session, study_id))


def model_calls(result: Result) -> dict[str, bool]:
    """Per finding: did the model call it present? (multilabel: calibrated probability >= 0.5)."""
    if result.task == "multilabel":
        return {f: float(result.probabilities.get(f, 0.0)) >= 0.5 for f in result.findings}
    return {f: result.label == f for f in result.findings}


def reviewer_calls(result: Result, label: str | None, findings: dict[str, bool] | None) -> tuple[str, dict[str, bool]]:
    """The reviewer's label and per-finding calls, validated against the result's label set."""
    if result.task == "multilabel":
        if findings is None:
            raise ReviewError(f"a multilabel result needs 'findings': a true/false for each of {result.findings}")
        missing = [f for f in result.findings if f not in findings]
        extra = [f for f in findings if f not in result.findings]
        if missing or extra:
            raise ReviewError(f"findings must be exactly {result.findings}; missing {missing}, unknown {extra}")
        present = [f for f in result.findings if findings[f]]
        return (",".join(present) or "no finding"), {f: bool(findings[f]) for f in result.findings}
    if label is None and findings:
        present = [f for f, v in findings.items() if v]
        if len(present) > 1:
            raise ReviewError("a single-label model's result can have only one finding present")
        label = present[0] if present else _negative(result)
    if label not in result.labels:
        raise ReviewError(f"label {label!r} is not one of the model's labels {result.labels}")
    return label, {f: label == f for f in result.findings}


def _negative(result: Result) -> str:
    if result.task != "binary":
        raise ReviewError("give the reviewer's 'label' (one of the model's labels)")
    return next(lab for lab in result.labels if lab not in result.findings)


def create_review(session: Session, study_id: int, reviewer: Actor, label: str | None = None,
                  findings: dict[str, bool] | None = None, note: str = "", result_id: int | None = None) -> Review:
    study = session.get(Study, study_id)
    if study is None:
        raise LookupError(f"study {study_id} not found")
    result = session.get(Result, result_id) if result_id is not None else key_result(session, study_id)
    if result is None or result.study_id != study_id:
        raise ReviewError(f"study {study_id} has no analysed result" + (f" {result_id}" if result_id else "") + " to review")
    if label in EXCLUSIONS:
        rev_label, rev_calls, mod_calls, actions = label, {}, {}, {}
        verdict = "exclude"
    else:
        rev_label, rev_calls = reviewer_calls(result, label, findings)
        mod_calls = model_calls(result)
        actions = {f: "confirm" if rev_calls[f] == mod_calls[f] else "correct" for f in result.findings}
        verdict = "confirm" if all(a == "confirm" for a in actions.values()) else "correct"
    review = Review(study_id=study_id, result_id=result.id, reviewer_id=reviewer.user_id, label=rev_label,
                    action=verdict, note=note.strip()[:10000])
    session.add(review)
    session.flush()
    for f in actions:
        session.add(ReviewFinding(review_id=review.id, finding=f, model_present=mod_calls[f],
                                  reviewer_present=rev_calls[f], action=actions[f]))
    study.status = "reviewed"
    session.flush()
    record(session, reviewer, "review.create", "review", review.id, study=study_id, result=result.id,
           label=rev_label, verdict=review.action)
    return review


def review_dict(r: Review) -> dict[str, Any]:
    return {
        "id": r.id, "study_id": r.study_id, "result_id": r.result_id, "reviewer": r.reviewer.username,
        "reviewer_name": r.reviewer.full_name, "label": r.label, "action": r.action, "note": r.note,
        "created_at": r.created_at.isoformat() + "Z",
        "findings": [{"finding": f.finding, "model_present": f.model_present, "reviewer_present": f.reviewer_present,
                      "action": f.action} for f in r.findings],
    }


def latest_reviews(session: Session) -> list[tuple[Review, Result]]:
    """The most recent review of every reviewed result (the reference standard)."""
    rows = session.execute(select(Review, Result).join(Result, Review.result_id == Result.id)
                           .order_by(Review.result_id, Review.created_at, Review.id)).all()
    latest: dict[int, tuple[Review, Result]] = {}
    for rev, res in rows:
        latest[res.id] = (rev, res)
    return list(latest.values())


def _period(ts: datetime, period: str) -> str:
    if period == "day":
        return ts.strftime("%Y-%m-%d")
    if period == "month":
        return ts.strftime("%Y-%m")
    y, w, _ = ts.isocalendar()
    return f"{y}-W{w:02d}"


def _rates(c: dict[str, int]) -> dict[str, Any]:
    tp, fn, tn, fp = c["tp"], c["fn"], c["tn"], c["fp"]

    def prop(k: int, n: int) -> dict[str, Any]:
        if n == 0:
            return {"value": None, "ci": None, "n": 0}
        ci = binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
        return {"value": k / n, "ci": [float(ci.low), float(ci.high)], "n": n}

    return {**c, "n": tp + fn + tn + fp, "sensitivity": prop(tp, tp + fn), "specificity": prop(tn, tn + fp),
            "agreement": prop(tp + tn, tp + fn + tn + fp)}


def agreement(session: Session, model: str | None = None, period: str = "week") -> dict[str, Any]:
    """Per model and finding: the model's sensitivity/specificity against reviewers (95% Wilson CIs), overall and per period."""
    if period not in ("day", "week", "month"):
        raise ValueError("period must be day, week or month")
    empty = lambda: {"tp": 0, "fn": 0, "tn": 0, "fp": 0}  # noqa: E731
    overall: dict[tuple[str, str], dict[str, int]] = defaultdict(empty)
    series: dict[tuple[str, str], dict[str, dict[str, int]]] = defaultdict(lambda: defaultdict(empty))
    for rev, res in latest_reviews(session):
        name = res.model.split("@", 1)[0]
        if model and name != model:
            continue
        for f in rev.findings:
            cell = ("tp" if f.model_present else "fn") if f.reviewer_present else ("fp" if f.model_present else "tn")
            overall[(name, f.finding)][cell] += 1
            series[(name, f.finding)][_period(rev.created_at, period)][cell] += 1
    out: dict[str, Any] = {"period": period, "reference": "most recent review of each result", "models": {}}
    for (name, finding), c in sorted(overall.items()):
        out["models"].setdefault(name, {})[finding] = {
            "overall": _rates(c),
            "over_time": [{"period": p, **_rates(v)} for p, v in sorted(series[(name, finding)].items())],
        }
    return out
