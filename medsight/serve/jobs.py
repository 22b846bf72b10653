"""A durable job queue in the service's own database, with leases.

Why not Celery/RQ: they need a broker (Redis, RabbitMQ) that a hospital
department would have to run next to the database, and the queue would then
live apart from the studies it refers to. Keeping jobs in the same database
means "study accepted" and "job queued" commit in one transaction: an accepted
study can never be without its job.

A worker *claims* a job by taking a time-limited lease (random token + expiry)
and *heartbeats* while it works. If it dies (``kill -9``, power loss) the lease
runs out and another worker claims the job. Completion is a conditional
``UPDATE ... WHERE lease_token = :mine``, committed in the same transaction as
the job's results, so a worker that lost its lease cannot write results and a
job finishes exactly once.

Claiming: on PostgreSQL ``SELECT ... FOR UPDATE SKIP LOCKED`` lets many workers
claim different jobs without waiting on each other; on SQLite the transaction
already holds the database write lock (``BEGIN IMMEDIATE``), and the claim is
the same conditional ``UPDATE``, checked by its row count.
"""

from __future__ import annotations

import os
import secrets
import socket
import threading
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import and_, or_, select, update
from sqlalchemy.orm import Session

from medsight.serve.database import Database
from medsight.serve.db import Job, utcnow


def worker_identity() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"


@dataclass(frozen=True)
class Lease:
    job_id: int
    kind: str
    study_id: int | None
    payload: dict[str, Any]
    owner: str
    token: str
    attempt: int


def _claimable(now: datetime):  # noqa: ANN202 - SQL expression
    return or_(
        and_(Job.status == "queued", Job.run_after <= now),
        and_(Job.status == "running", Job.lease_expires_at < now),
    )


class JobQueue:
    def __init__(self, db: Database, lease_seconds: float):
        self.db = db
        self.lease = timedelta(seconds=lease_seconds)

    # -- producers ------------------------------------------------------------
    @staticmethod
    def enqueue(session: Session, kind: str, study_id: int | None = None, payload: dict[str, Any] | None = None,
                priority: int = 0, max_attempts: int = 3, run_after: datetime | None = None) -> Job:
        """Add a job inside the caller's transaction (it exists iff the caller's work commits)."""
        job = Job(kind=kind, study_id=study_id, payload=payload or {}, priority=priority, max_attempts=max_attempts,
                  run_after=run_after or utcnow(), status="queued")
        session.add(job)
        session.flush()
        return job

    # -- workers --------------------------------------------------------------
    def claim(self, owner: str, kinds: tuple[str, ...] | None = None) -> Lease | None:
        """Take the most urgent claimable job, or return None when there is none."""
        while True:
            with self.db.session() as s:
                now = utcnow()
                q = select(Job).where(_claimable(now)).order_by(Job.priority.desc(), Job.id).limit(1)
                if kinds:
                    q = q.where(Job.kind.in_(kinds))
                if self.db.dialect == "postgresql":
                    q = q.with_for_update(skip_locked=True)
                job = s.execute(q).scalar_one_or_none()
                if job is None:
                    return None
                if job.status == "running" and job.attempts >= job.max_attempts:
                    # Its workers keep dying on it (a poison job): stop retrying.
                    job.status, job.finished_at = "failed", now
                    job.last_error = f"abandoned: {job.attempts} workers lost their lease on this job"
                    job.lease_token = None
                    self._on_abandoned(s, job)
                    continue
                token = secrets.token_hex(16)
                res = s.execute(
                    update(Job).where(Job.id == job.id, _claimable(now)).values(
                        status="running", lease_owner=owner, lease_token=token, lease_expires_at=now + self.lease,
                        attempts=Job.attempts + 1, started_at=now,
                    ).execution_options(synchronize_session=False))
                if res.rowcount != 1:
                    continue  # someone else got it first
                return Lease(job.id, job.kind, job.study_id, dict(job.payload or {}), owner, token, job.attempts + 1)

    def _on_abandoned(self, s: Session, job: Job) -> None:
        if job.kind == "analyse" and job.study_id is not None:
            from medsight.serve.db import Study

            study = s.get(Study, job.study_id)
            if study is not None and study.status in ("queued", "analysing"):
                study.status, study.error = "failed", job.last_error

    def heartbeat(self, lease: Lease) -> bool:
        """Extend the lease; False when it was lost (expired and taken by another worker)."""
        with self.db.session() as s:
            res = s.execute(
                update(Job).where(Job.id == lease.job_id, Job.lease_token == lease.token, Job.status == "running")
                .values(lease_expires_at=utcnow() + self.lease).execution_options(synchronize_session=False))
            return res.rowcount == 1

    @staticmethod
    def complete(session: Session, lease: Lease) -> bool:
        """Mark done inside the caller's transaction; False (caller must roll back) if the lease is gone."""
        res = session.execute(
            update(Job).where(Job.id == lease.job_id, Job.lease_token == lease.token, Job.status == "running")
            .values(status="done", finished_at=utcnow(), finished_by=lease.owner, lease_token=None, last_error=None)
            .execution_options(synchronize_session=False))
        return res.rowcount == 1

    def fail(self, lease: Lease, error: str, retry_in_s: float | None = None) -> str | None:
        """Requeue after ``retry_in_s`` while attempts remain, else mark failed. Returns the new status."""
        with self.db.session() as s:
            job = s.get(Job, lease.job_id)
            if job is None or job.lease_token != lease.token or job.status != "running":
                return None
            now = utcnow()
            if retry_in_s is not None and job.attempts < job.max_attempts:
                job.status, job.run_after = "queued", now + timedelta(seconds=retry_in_s)
            else:
                job.status, job.finished_at = "failed", now
                self._on_failed(s, job, error)
            job.last_error, job.lease_token, job.lease_expires_at = error[:4000], None, None
            return job.status

    #: Kinds an administrator may send again after they failed: deliveries, whose
    #: receiver may be fixed now. A failed analysis means an unusable image; it is re-uploaded instead.
    RETRYABLE = ("deliver", "notify")

    @classmethod
    def requeue(cls, session: Session, job_id: int, extra_attempts: int = 3) -> Job:
        """Queue a failed delivery again now, with ``extra_attempts`` more tries (inside the caller's transaction)."""
        from medsight.serve.auth import UserError

        job = session.get(Job, job_id)
        if job is None:
            raise LookupError(f"job {job_id} not found")
        if job.kind not in cls.RETRYABLE or job.status != "failed":
            raise UserError(f"only failed {' / '.join(cls.RETRYABLE)} jobs can be retried; job {job_id} is a {job.status} {job.kind} job")
        job.status, job.run_after, job.finished_at = "queued", utcnow(), None
        job.max_attempts = job.attempts + extra_attempts
        return job

    @staticmethod
    def _on_failed(s: Session, job: Job, error: str) -> None:
        if job.kind == "analyse" and job.study_id is not None:
            from medsight.serve.db import Study

            study = s.get(Study, job.study_id)
            if study is not None:
                study.status, study.error = "failed", error[:4000]


class Heartbeat:
    """Keeps a lease alive from a background thread while the job runs."""

    def __init__(self, queue: JobQueue, lease: Lease, interval_s: float):
        self.queue, self.lease, self.interval = queue, lease, interval_s
        self.lost = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"heartbeat-{lease.job_id}", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                if not self.queue.heartbeat(self.lease):
                    self.lost = True
                    return
            except Exception:  # a transient database error: try again next beat
                continue

    def __enter__(self) -> "Heartbeat":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
