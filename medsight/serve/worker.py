"""``medsight worker``: claims jobs from the database and runs them until stopped.

Any number of workers (processes, machines) can run against one database; the
lease protocol in :mod:`medsight.serve.jobs` keeps them from doing a job twice
and hands the job of a dead worker to a live one.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time

from sqlalchemy.orm import Session

from medsight.serve.analysis import AnalysisFailed, LeaseLost, analyse_study
from medsight.serve.audit import Actor, record
from medsight.serve.context import ServiceContext
from medsight.serve.db import Study, WorkerBeat, utcnow
from medsight.serve.jobs import Heartbeat, Lease, worker_identity
from medsight.serve.notify import DeliveryError, backoff_seconds, critical_payload, deliver

log = logging.getLogger("medsight.worker")


class Worker:
    def __init__(self, ctx: ServiceContext, name: str | None = None):
        self.ctx = ctx
        self.name = name or worker_identity()
        self.stop_event = threading.Event()
        self.done = 0

    def run_once(self) -> bool:
        """Claim and run one job; False when none was due."""
        lease = self.ctx.queue.claim(self.name, ("analyse", "notify", "deliver"))
        if lease is None:
            return False
        log.info("claimed job %s (%s, study %s, attempt %s)", lease.job_id, lease.kind, lease.study_id, lease.attempt)
        with Heartbeat(self.ctx.queue, lease, self.ctx.settings.heartbeat_interval) as hb:
            if self.ctx.settings.fault_claim_delay_s:
                time.sleep(self.ctx.settings.fault_claim_delay_s)
            if lease.kind == "analyse":
                self._analyse(lease)
            elif lease.kind == "notify":
                self._notify(lease)
            elif lease.kind == "deliver":
                self._deliver(lease)
            else:
                self.ctx.queue.fail(lease, f"unknown job kind {lease.kind!r}")
            if hb.lost:
                log.warning("job %s: lease was lost while running", lease.job_id)
        self.done += 1
        return True

    def beat(self) -> None:
        """Record that this worker is alive (``/health`` counts fresh beats)."""
        with self.ctx.db.session() as s:
            row = s.get(WorkerBeat, self.name)
            if row is None:
                s.add(WorkerBeat(name=self.name, pid=os.getpid(), host=socket.gethostname()[:255], started_at=utcnow(),
                                 last_seen=utcnow(), jobs_done=self.done))
            else:
                row.last_seen, row.jobs_done = utcnow(), self.done

    def _beat_until(self, done: threading.Event) -> None:
        while not done.wait(self.ctx.settings.heartbeat_interval) and not self.stop_event.is_set():
            try:
                self.beat()
            except Exception:  # database unreachable: /health will say so; keep trying
                log.warning("worker %s: heartbeat failed", self.name, exc_info=True)

    def run(self, max_jobs: int | None = None, exit_when_idle: bool = False) -> int:
        """Loop until stopped (or ``max_jobs`` ran, or the queue is empty with ``exit_when_idle``)."""
        try:
            self.beat()
        except Exception:
            log.warning("worker %s: first heartbeat failed", self.name, exc_info=True)
        done = threading.Event()
        threading.Thread(target=self._beat_until, args=(done,), name="medsight-worker-beat", daemon=True).start()
        try:
            return self._loop(max_jobs, exit_when_idle)
        finally:
            done.set()

    def _loop(self, max_jobs: int | None, exit_when_idle: bool) -> int:
        while not self.stop_event.is_set():
            try:
                worked = self.run_once()
            except Exception:  # database unreachable etc.: keep the worker alive and try again
                log.exception("worker loop error")
                worked = False
            if max_jobs is not None and self.done >= max_jobs:
                break
            if not worked:
                if exit_when_idle:
                    break
                self.stop_event.wait(self.ctx.settings.poll_seconds)
        return self.done

    def stop(self) -> None:
        self.stop_event.set()

    # -- job kinds ------------------------------------------------------------
    def _analyse(self, lease: Lease) -> None:
        try:
            study = analyse_study(self.ctx, lease)
            log.info("study %s analysed: %s (P(critical)=%.3f)", study.id, study.finding, study.critical_probability or 0)
        except LeaseLost as e:
            log.warning("%s", e)
        except AnalysisFailed as e:
            self.ctx.queue.fail(lease, str(e))
            with self.ctx.db.session() as s:
                record(s, Actor(f"worker:{self.name}", "worker"), "analysis.failed", "study", lease.study_id, error=str(e)[:500])
            log.error("study %s failed: %s", lease.study_id, e)
        except Exception as e:  # unexpected (database hiccup, disk full): retry later
            log.exception("job %s crashed", lease.job_id)
            self.ctx.queue.fail(lease, f"{type(e).__name__}: {e}", retry_in_s=5.0)

    def _notify(self, lease: Lease) -> None:
        cfg = self.ctx.settings.webhook
        url = lease.payload.get("url") or cfg.url
        with self.ctx.db.session() as s:
            study = s.get(Study, lease.study_id)
            payload = critical_payload(study, self.ctx.settings.public_url) if study else {"study_id": lease.study_id}
        try:
            status = deliver(cfg, url, payload, idempotency_key=f"medsight-notify-{lease.job_id}")
        except DeliveryError as e:
            new = self.ctx.queue.fail(lease, str(e), retry_in_s=backoff_seconds(cfg, lease.attempt))
            if new == "failed":
                with self.ctx.db.session() as s:
                    self._audit_notify(s, lease, "notify.failed", error=str(e), attempts=lease.attempt)
            return
        with self.ctx.db.session() as s:
            if self.ctx.queue.complete(s, lease):
                self._audit_notify(s, lease, "notify.sent", status=status, attempts=lease.attempt, url=url)

    def _deliver(self, lease: Lease) -> None:
        """Send one stored batch of result objects (SR/SC, FHIR bundle, HL7 message) to its channel's destination.

        Transient failures are retried with backoff until ``outputs.max_attempts``;
        a permanent refusal fails the job at once. Either way the blobs stay in
        storage and the job row records the error, so nothing is dropped silently.
        """
        from medsight.integration.delivery import DeliveryFailed, send_payloads

        outputs = self.ctx.settings.outputs
        channel = str(lease.payload.get("channel"))
        try:
            payloads = [self.ctx.store.read_bytes(sha) for sha in lease.payload.get("blobs", [])]
            receipt = send_payloads(channel, payloads, outputs)
        except (DeliveryFailed, OSError) as e:
            permanent = getattr(e, "permanent", False)
            new = self.ctx.queue.fail(lease, str(e), retry_in_s=None if permanent else outputs.backoff(lease.attempt))
            log.warning("deliver %s for study %s (attempt %s): %s%s", channel, lease.study_id, lease.attempt, e,
                        "" if new == "queued" else " - given up")
            if new == "failed":
                with self.ctx.db.session() as s:
                    self._audit_notify(s, lease, "deliver.failed", channel=channel, error=str(e)[:500],
                                       attempts=lease.attempt, permanent=permanent)
            return
        with self.ctx.db.session() as s:
            if self.ctx.queue.complete(s, lease):
                self._audit_notify(s, lease, "deliver.sent", channel=channel, receipt=receipt, attempts=lease.attempt)
        log.info("deliver %s for study %s: %s", channel, lease.study_id, receipt)

    def _audit_notify(self, s: Session, lease: Lease, action: str, **detail: object) -> None:
        record(s, Actor(f"worker:{self.name}", "worker"), action, "study", lease.study_id, job=lease.job_id, **detail)


def run_worker(ctx: ServiceContext, max_jobs: int | None = None, exit_when_idle: bool = False) -> int:
    return Worker(ctx).run(max_jobs=max_jobs, exit_when_idle=exit_when_idle)
