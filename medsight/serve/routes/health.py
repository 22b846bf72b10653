"""``/health``: is the service up, which database, how deep is the job queue. No login."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from sqlalchemy import func, select

from medsight._version import __version__
from medsight.serve import schemas
from medsight.serve.db import Job
from medsight.serve.deps import Ctx, DbSession, GatedRoute

router = APIRouter(tags=["service"], route_class=GatedRoute)


@router.get("/health", response_model=schemas.Health)
def health(ctx: Ctx, s: DbSession) -> dict[str, Any]:
    """Liveness and readiness: database reachable, job queue depth. No authentication."""
    counts = dict(s.execute(select(Job.status, func.count()).group_by(Job.status)).all())
    return {"status": "ok", "version": __version__, "database": ctx.db.dialect,
            "jobs": {k: counts.get(k, 0) for k in ("queued", "running", "done", "failed")}}
