"""The background job queue: recent jobs, and sending a failed delivery again."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query
from sqlalchemy import select

from medsight.serve import schemas
from medsight.serve.auth import Principal
from medsight.serve.db import Job
from medsight.serve.deps import ADMIN, UPLOADER, Audit, Ctx, DbSession, GatedRoute, Id

router = APIRouter(prefix="/api/jobs", tags=["service"], route_class=GatedRoute)


@router.get("", response_model=list[schemas.Job])
def jobs(s: DbSession, _p: Annotated[Principal, Depends(UPLOADER)], status: str | None = None,
         limit: Annotated[int, Query(ge=1, le=500)] = 50) -> list[dict[str, Any]]:
    """Recent background jobs (analysis, notifications, result deliveries) with attempts and errors."""
    q = select(Job).order_by(Job.id.desc()).limit(limit)
    if status:
        q = q.where(Job.status == status)
    return [{"id": j.id, "kind": j.kind, "study_id": j.study_id, "status": j.status, "attempts": j.attempts,
             "channel": (j.payload or {}).get("channel"),
             "owner": j.lease_owner, "finished_by": j.finished_by, "last_error": j.last_error,
             "created_at": j.created_at.isoformat() + "Z"} for j in s.execute(q).scalars()]


@router.post("/{job_id}/retry", response_model=schemas.JobRetried)
def retry_job(job_id: Id, ctx: Ctx, s: DbSession, audit: Audit, _p: Annotated[Principal, Depends(ADMIN)]) -> dict[str, Any]:
    """Send a failed delivery (PACS, FHIR, HL7, webhook) again, e.g. after its receiver was fixed."""
    job = ctx.queue.requeue(s, job_id)
    audit("job.retry", "job", job.id, kind=job.kind, study=job.study_id, channel=(job.payload or {}).get("channel"))
    return {"id": job.id, "kind": job.kind, "status": job.status, "attempts": job.attempts,
            "max_attempts": job.max_attempts}
