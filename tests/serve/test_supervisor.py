"""Supervision: a dead worker is restarted (backoff, audited) and readiness says when nobody works."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

from sqlalchemy import create_engine, select, update

from medsight.serve.db import AuditEvent, Job, WorkerBeat, utcnow
from medsight.serve.health import service_health
from medsight.serve.supervisor import WorkerSupervisor
from medsight.serve.worker import Worker


def _wait_for(predicate, timeout: float, what: str):  # noqa: ANN001, ANN202
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        got = predicate()
        if got:
            return got
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def test_a_worker_that_exits_is_restarted_with_growing_backoff_and_reported() -> None:
    calls: list[tuple[int, int, float]] = []
    sup = WorkerSupervisor([sys.executable, "-c", "import sys; sys.exit(3)"], 1, base_backoff_s=0.05, max_backoff_s=0.4, poll_s=0.02,
                           on_restart=lambda *a: calls.append(a)).start()
    try:
        _wait_for(lambda: len(calls) >= 5, 30, "five restarts")
    finally:
        sup.stop()
    assert all(slot == 0 and code == 3 for slot, code, _ in calls)
    backoffs = [b for *_, b in calls]
    assert backoffs[:5] == [0.05, 0.1, 0.2, 0.4, 0.4]  # doubling, capped
    assert sup.restarts >= 5


def test_stop_terminates_the_workers_and_restarts_nothing() -> None:
    sup = WorkerSupervisor([sys.executable, "-c", "import time; time.sleep(600)"], 2, poll_s=0.02).start()
    pids = sup.pids
    assert len(pids) == 2 and all(pids)
    sup.stop(timeout=10)
    assert sup.pids == [None, None] and sup.restarts == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker_children(pid: int) -> list[int]:
    kids = []  # children are listed under the thread that forked them (the supervisor's, after a restart)
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            kids += (task / "children").read_text().split()
        except (FileNotFoundError, ProcessLookupError):
            continue
    found = []
    for k in kids:
        try:
            cmd = Path(f"/proc/{k}/cmdline").read_bytes().split(b"\0")
        except FileNotFoundError:
            continue
        if b"worker" in cmd and Path(f"/proc/{k}/stat").read_text().split(")")[-1].split()[0] != "Z":
            found.append(int(k))
    return found


def test_serve_restarts_a_worker_killed_with_sigkill_and_audits_it(tmp_path: Path) -> None:
    data = tmp_path / "data"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEDSIGHT_")}
    serve = subprocess.Popen([sys.executable, "-m", "medsight.cli", "serve", "--data-dir", str(data), "--port", str(_free_port()),
                              "--workers", "1"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        first = _wait_for(lambda: _worker_children(serve.pid), 60, "the first worker")[0]
        os.kill(first, signal.SIGKILL)
        second = _wait_for(lambda: [p for p in _worker_children(serve.pid) if p != first], 30, "a restarted worker")[0]
        assert second != first
        engine = create_engine(f"sqlite:///{data / 'medsight.db'}")
        try:
            with engine.connect() as c:
                rows = c.execute(select(AuditEvent.action, AuditEvent.detail).where(AuditEvent.action == "worker.restarted")).all()
        finally:
            engine.dispose()
        assert rows and rows[0].detail["exit_code"] == -signal.SIGKILL
    finally:
        serve.terminate()
        try:
            serve.wait(timeout=30)
        except subprocess.TimeoutExpired:
            serve.kill()
    assert not _worker_children(serve.pid)


def test_health_is_degraded_without_a_worker_and_ok_while_one_beats(svc_sqlite) -> None:  # noqa: ANN001
    ctx = svc_sqlite.ctx
    h = service_health(ctx)
    assert h.status == "degraded" and h.workers_alive == 0 and "no worker" in h.reasons[0]
    Worker(ctx, name="w-test").beat()
    assert service_health(ctx).ok
    with ctx.db.session() as s:  # the beat goes stale
        s.execute(update(WorkerBeat).values(last_seen=utcnow() - timedelta(seconds=ctx.settings.worker_stale_s + 5)))
    assert not service_health(ctx).ok


def test_health_is_degraded_when_the_oldest_due_job_waits_too_long(svc_sqlite, shape_pngs) -> None:  # noqa: ANN001
    ctx = svc_sqlite.ctx
    Worker(ctx, name="w-test").beat()
    svc_sqlite.upload([("a.png", shape_pngs["disc"][0])], modality="CR")
    assert service_health(ctx).ok  # just queued
    with ctx.db.session() as s:
        s.execute(update(Job).values(run_after=utcnow() - timedelta(seconds=ctx.settings.queue_max_age_s + 10)))
    h = service_health(ctx)
    assert h.status == "degraded" and "oldest due job" in h.reasons[0] and h.oldest_queued_s > ctx.settings.queue_max_age_s
    with ctx.db.session() as s:  # a job scheduled for a later retry is not overdue
        s.execute(update(Job).values(run_after=utcnow() + timedelta(seconds=60)))
    assert service_health(ctx).ok


def test_health_answers_503_with_reasons_until_a_worker_beats(svc_sqlite) -> None:  # noqa: ANN001
    r = svc_sqlite.client.get("/health")
    body = r.json()
    assert r.status_code == 503 and body["status"] == "degraded" and "no worker" in body["reasons"][0]
    assert body["jobs"]["queued"] == 0 and body["database"] == "sqlite" and body["version"]
    Worker(svc_sqlite.ctx, name="w-test").beat()
    r = svc_sqlite.client.get("/health")
    assert r.status_code == 200 and r.json()["status"] == "ok" and r.json()["reasons"] == []
