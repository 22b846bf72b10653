"""Is the service doing its work? The readiness rule behind ``/health``.

A web process can answer requests while nothing analyses the studies it accepts: the
worker crashed, or was never started. Uploads would still get 202. So readiness needs
evidence of work: a worker that beat recently (:class:`~medsight.serve.db.WorkerBeat`)
and a queue whose oldest job is not older than the site allows.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from sqlalchemy import func, select

from medsight.serve.db import Job, WorkerBeat, utcnow


@dataclass(frozen=True)
class Health:
    status: str  # "ok" | "degraded"
    reasons: list[str] = field(default_factory=list)
    jobs: dict[str, int] = field(default_factory=dict)
    workers_alive: int = 0
    oldest_queued_s: float | None = None

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def as_dict(self) -> dict[str, Any]:
        return {"status": self.status, "reasons": self.reasons, "jobs": self.jobs,
                "workers_alive": self.workers_alive, "oldest_queued_s": self.oldest_queued_s}


def service_health(ctx) -> Health:  # noqa: ANN001 - ServiceContext (imported by the caller's layer)
    """Degraded when no worker beat within ``worker_stale_s`` or a queued job waited past ``queue_max_age_s``."""
    cfg = ctx.settings
    now = utcnow()
    with ctx.db.session() as s:
        counts = dict(s.execute(select(Job.status, func.count()).group_by(Job.status)).all())
        alive = s.execute(select(func.count(WorkerBeat.name)).where(
            WorkerBeat.last_seen >= now - timedelta(seconds=cfg.worker_stale_s))).scalar_one()
        # a job waiting for its retry time is not overdue: age counts from when it became due
        oldest = s.execute(select(func.min(Job.run_after)).where(Job.status == "queued", Job.run_after <= now)).scalar_one()
    reasons = []
    if alive == 0:
        reasons.append(f"no worker has reported in the last {cfg.worker_stale_s:g} s: studies are accepted but not analysed")
    age = None if oldest is None else max(0.0, (now - oldest).total_seconds())
    if age is not None and age > cfg.queue_max_age_s:
        reasons.append(f"the oldest due job has waited {age:.0f} s (limit {cfg.queue_max_age_s:g} s)")
    jobs = {k: counts.get(k, 0) for k in ("queued", "running", "done", "failed")}
    return Health("degraded" if reasons else "ok", reasons, jobs, int(alive), age)
