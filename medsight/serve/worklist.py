"""The triage worklist: studies ordered by priority score, filtered and paginated in SQL."""

from __future__ import annotations

import math
import time
from datetime import timezone
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from medsight.errors import MedSightError
from medsight.serve.config import TriageWeights
from medsight.serve.db import STUDY_STATUSES, Study
from medsight.serve.triage import score_sql, urgency

#: not yet reviewed; a study no model applies to is open too: it still waits for a human reader
OPEN_STATUSES = ("queued", "analysing", "analysed", "not_analysed", "failed")


class WorklistError(MedSightError, ValueError):
    """A worklist filter names a status that does not exist."""


def parse_statuses(status: str | None) -> list[str] | None:
    """``None``/"all" -> no filter; "open" -> everything not yet reviewed; else a comma list of statuses."""
    if not status or status == "all":
        return None
    if status == "open":
        return list(OPEN_STATUSES)
    wanted = [s.strip() for s in status.split(",") if s.strip()]
    bad = [s for s in wanted if s not in STUDY_STATUSES]
    if bad:
        raise WorklistError(f"unknown status {', '.join(bad)}; use open, all or {', '.join(STUDY_STATUSES)}")
    return wanted


def study_row(st: Study, score: float, w: TriageWeights, now_epoch: float) -> dict[str, Any]:
    return {
        "id": st.id, "study_uid": st.study_uid, "accession_number": st.accession_number,
        "description": st.description, "modality": st.modality, "model": st.model,
        "requested_priority": st.requested_priority, "status": st.status,
        "finding": None if st.status == "not_analysed" else st.finding,  # the reported finding only (None: referred)
        "critical_probability": st.critical_probability, "critical": st.critical, "refer": st.refer,
        "received_at": st.received_at.replace(tzinfo=timezone.utc).isoformat(),
        "waiting_minutes": round(max(now_epoch - st.received_epoch, 0.0) / 60.0, 1),
        "score": round(float(score), 4), "urgency": urgency(w, float(score)), "error": st.error,
        "not_analysed_reason": st.not_analysed_reason,
    }


def worklist(session: Session, w: TriageWeights, modality: str | None = None, status: str | None = None,
             page: int = 1, page_size: int = 50, now_epoch: float | None = None) -> dict[str, Any]:
    now_epoch = time.time() if now_epoch is None else now_epoch
    score = score_sql(w, now_epoch).label("score")
    filters = []
    statuses = parse_statuses(status)
    if statuses:
        filters.append(Study.status.in_(statuses))
    if modality:
        filters.append(Study.modality == modality.upper())
    total = session.execute(select(func.count(Study.id)).where(*filters)).scalar_one()
    rows = session.execute(
        select(Study, score).where(*filters)
        .order_by(score.desc(), Study.received_epoch.asc(), Study.id.asc())
        .limit(page_size).offset((page - 1) * page_size)
    ).all()
    return {
        "items": [study_row(st, sc, w, now_epoch) for st, sc in rows],
        "total": total, "page": page, "page_size": page_size, "pages": max(1, math.ceil(total / page_size)),
        "filters": {"modality": modality.upper() if modality else None, "status": status or "all"},
    }
