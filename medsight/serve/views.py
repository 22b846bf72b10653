"""Read models shared by the JSON API and the web pages: one place decides what a study, a user or an
audit event looks like. Their shapes are declared in :mod:`medsight.serve.schemas`.
"""

from __future__ import annotations

import time
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from medsight.serve.config import TriageWeights
from medsight.serve.db import AuditEvent, Job, Result, Review, Study, User
from medsight.models.policy import reported_finding
from medsight.serve.reviews import key_result, latest_results, review_dict
from medsight.serve.triage import score, urgency
from medsight.serve.worklist import study_row


def result_dict(r: Result) -> dict[str, Any]:
    return {
        "id": r.id, "instance_id": r.instance_id, "model": r.model, "task": r.task, "labels": r.labels,
        "findings": r.findings, "label": r.label, "reported_finding": reported_finding(r.label, r.refer),
        "probabilities": r.probabilities, "confidence": r.confidence,
        "refer": r.refer, "statement": r.statement, "critical_probability": r.critical_probability,
        "critical": r.critical, "heatmap_label": r.heatmap_label, "created_at": r.created_at.isoformat() + "Z",
        "image_url": f"/api/results/{r.id}/image.png",
        "overlay_url": f"/api/results/{r.id}/overlay.png" if r.overlay_sha256 else None,
        "heatmap_url": f"/api/results/{r.id}/heatmap.png" if r.heatmap_sha256 else None,
    }


def study_detail(s: Session, st: Study, w: TriageWeights, include_reviews: bool = True) -> dict[str, Any]:
    now = time.time()
    sc = score(w, st.requested_priority, st.critical_probability, st.refer, st.received_epoch, now)
    out = study_row(st, sc, w, now)
    out["urgency"] = urgency(w, sc)
    out["instances"] = [{
        "id": i.id, "original_name": i.original_name, "format": i.format, "rows": i.rows, "columns": i.columns,
        "sop_instance_uid": i.sop_instance_uid, "patient_sex": i.patient_sex, "patient_age": i.patient_age,
        "image_url": f"/api/instances/{i.id}/image.png",
    } for i in st.instances]
    out["results"] = [result_dict(r) for r in latest_results(s, st.id)]  # a re-analysis supersedes the earlier one
    key = key_result(s, st.id)
    out["key_result_id"] = key.id if key else None
    job = s.execute(select(Job).where(Job.study_id == st.id, Job.kind == "analyse").order_by(Job.id.desc()).limit(1)).scalar_one_or_none()
    out["job"] = None if job is None else {"id": job.id, "status": job.status, "attempts": job.attempts,
                                           "last_error": job.last_error}
    if include_reviews:
        reviews = s.execute(select(Review).where(Review.study_id == st.id).order_by(Review.id)).scalars().all()
        out["reviews"] = [review_dict(r) for r in reviews]
    return out


def user_dict(u: User) -> dict[str, Any]:
    return {"id": u.id, "username": u.username, "role": u.role, "full_name": u.full_name, "active": u.active,
            "created_at": u.created_at.isoformat() + "Z"}


def audit_dict(e: AuditEvent) -> dict[str, Any]:
    return {"id": e.id, "ts": e.ts.isoformat() + "Z", "actor": e.actor, "role": e.role, "action": e.action,
            "object_type": e.object_type, "object_id": e.object_id, "client_ip": e.client_ip, "detail": e.detail,
            "hash": e.hash}
