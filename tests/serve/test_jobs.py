"""Durable jobs: exclusive claims, lease expiry, lost leases, and a worker killed with SIGKILL mid-job."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from sqlalchemy import func, select

from medsight.serve.audit import verify
from medsight.serve.db import AuditEvent, Job, Result, Study
from medsight.serve.jobs import JobQueue


def _enqueue(svc, n: int, kind: str = "test", **kw: object) -> list[int]:  # noqa: ANN001
    with svc.ctx.db.session() as s:
        return [JobQueue.enqueue(s, kind, None, {"i": i}, **kw).id for i in range(n)]


def test_concurrent_claims_never_share_a_job(svc) -> None:  # noqa: ANN001
    ids = _enqueue(svc, 24)
    q = JobQueue(svc.ctx.db, 30)
    got: list[int] = []
    lock = threading.Lock()

    def claimer(name: str) -> None:
        while (lease := q.claim(name, ("test",))) is not None:
            with lock:
                got.append(lease.job_id)

    threads = [threading.Thread(target=claimer, args=(f"w{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(got) == ids  # every job claimed, none twice


def test_priority_order_and_lost_lease_cannot_complete(svc) -> None:  # noqa: ANN001
    low = _enqueue(svc, 1, priority=0)[0]
    high = _enqueue(svc, 1, priority=2)[0]
    short = JobQueue(svc.ctx.db, 0.3)
    a = short.claim("worker-a", ("test",))
    assert a is not None and a.job_id == high  # STAT before routine
    assert short.heartbeat(a)
    time.sleep(0.5)  # a's lease runs out (no heartbeat)
    b = short.claim("worker-b", ("test",))
    assert b is not None and b.job_id == high and b.attempt == 2
    assert not short.heartbeat(a)
    with svc.ctx.db.session() as s:
        assert not JobQueue.complete(s, a)  # the stale worker cannot finish it
    with svc.ctx.db.session() as s:
        assert JobQueue.complete(s, b)
    with svc.ctx.db.session() as s:
        job = s.get(Job, high)
        assert (job.status, job.finished_by, job.attempts) == ("done", "worker-b", 2)
        assert s.get(Job, low).status == "queued"


def test_job_whose_workers_keep_dying_is_failed_not_retried_forever(svc, shape_pngs) -> None:  # noqa: ANN001
    r = svc.upload([("a.png", shape_pngs["disc"][0])], modality="CR")
    study_id = r.json()["id"]
    q = JobQueue(svc.ctx.db, 0.05)
    with svc.ctx.db.session() as s:
        s.execute(Job.__table__.update().values(max_attempts=2))
    for _ in range(2):
        assert q.claim("dies", ("analyse",)) is not None
        time.sleep(0.1)
    assert q.claim("dies", ("analyse",)) is None
    with svc.ctx.db.session() as s:
        job = s.execute(select(Job).where(Job.study_id == study_id)).scalar_one()
        assert job.status == "failed" and "2 workers lost" in job.last_error
        assert s.get(Study, study_id).status == "failed"


def _wait_for(predicate, timeout: float, what: str):  # noqa: ANN001, ANN202
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def test_worker_killed_with_sigkill_mid_job_is_finished_exactly_once(svc, shape_pngs, tmp_path: Path) -> None:  # noqa: ANN001
    from medsight.serve.worker import Worker

    study_id = svc.upload([("a.png", shape_pngs["disc"][0])], modality="CR", priority="stat").json()["id"]
    with svc.ctx.db.session() as s:
        job_id = s.execute(select(Job.id).where(Job.study_id == study_id)).scalar_one()
    # The doomed worker: a real `medsight worker` process that holds its claim for a while (heartbeating).
    settings = svc.ctx.settings.model_copy(update={"lease_seconds": 2.0, "fault_claim_delay_s": 120.0,
                                                    "database_url": svc.ctx.settings.db_url})
    path = settings.write_json(tmp_path / "doomed.json")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEDSIGHT_")}
    proc = subprocess.Popen([sys.executable, "-m", "medsight.cli", "worker", "--settings", str(path)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        def running() -> Job | None:
            with svc.ctx.db.session() as s:
                job = s.get(Job, job_id)
                return job if job.status == "running" and f":{proc.pid}:" in (job.lease_owner or "") else None

        first = _wait_for(running, 90, "the subprocess worker to claim the job")
        assert first.attempts == 1
        time.sleep(3.0)  # longer than the 2 s lease: only heartbeats keep it alive
        still = running()
        assert still is not None and still.lease_expires_at > first.lease_expires_at, "heartbeats did not extend the lease"
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(30) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    killed_at = time.monotonic()
    rescuers = [Worker(svc.ctx, name=f"rescuer-{i}") for i in range(2)]
    assert rescuers[0].run_once() is False  # the dead worker's lease has not run out yet
    results: list[bool] = []
    finished: list[float] = []

    def job_done() -> bool:
        with svc.ctx.db.session() as s:
            return s.get(Job, job_id).status == "done"

    def rescue(w: Worker) -> None:
        end = time.monotonic() + 30
        while time.monotonic() < end and not job_done():
            if w.run_once():
                results.append(True)
                finished.append(time.monotonic())
            time.sleep(0.05)

    threads = [threading.Thread(target=rescue, args=(w,)) for w in rescuers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [True]  # exactly one rescuer ran it
    assert finished[0] - killed_at < 25  # picked up soon after the 2 s lease ran out
    with svc.ctx.db.session() as s:
        job = s.get(Job, job_id)
        assert job.status == "done" and job.attempts == 2 and job.finished_by.startswith("rescuer-")
        assert s.execute(select(func.count(Result.id)).where(Result.job_id == job_id)).scalar_one() == 1
        assert s.get(Study, study_id).status == "analysed"
        creates = s.execute(select(func.count(AuditEvent.id)).where(AuditEvent.action == "result.create",
                                                                    AuditEvent.object_id == str(study_id))).scalar_one()
        assert creates == 1
        assert verify(s).ok


def test_admin_retries_a_failed_delivery_once_its_receiver_is_fixed(tmp_path: Path, models_dir: Path, shape_pngs) -> None:  # noqa: ANN001
    """A FHIR server that was down: the delivery gives up after its attempts, the admin re-queues it
    through the API once the server is back, and it is delivered with the very same bundle."""
    import socket

    from tests.integration.test_delivery import FhirServer
    from tests.serve.conftest import make_service

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    svc = make_service(tmp_path, f"sqlite:///{tmp_path / 'db.sqlite'}", models_dir,
                       outputs={"fhir_url": f"http://127.0.0.1:{port}/fhir", "max_attempts": 1, "timeout_s": 3.0})
    try:
        assert svc.upload([("a.png", shape_pngs["disc"][0])], modality="CR").status_code == 202
        svc.work()
        with svc.ctx.db.session() as s:
            job = s.execute(select(Job).where(Job.kind == "deliver")).scalar_one()
        assert (job.status, job.attempts) == ("failed", 1)
        listed = svc.client.get("/api/jobs?status=failed", headers=svc.headers["admin"]).json()
        assert [(j["kind"], j["channel"]) for j in listed] == [("deliver", "fhir")]
        assert svc.client.post(f"/api/jobs/{job.id}/retry", headers=svc.headers["radiologist"]).status_code == 403
        analyse = next(j for j in svc.client.get("/api/jobs", headers=svc.headers["admin"]).json() if j["kind"] == "analyse")
        r = svc.client.post(f"/api/jobs/{analyse['id']}/retry", headers=svc.headers["admin"])
        assert r.status_code == 422 and "only failed deliver / notify jobs" in r.json()["detail"]
        assert svc.client.post("/api/jobs/9999/retry", headers=svc.headers["admin"]).status_code == 404
        fhir = FhirServer()
        fhir.server.server_close()
        from http.server import ThreadingHTTPServer

        fhir.server = ThreadingHTTPServer(("127.0.0.1", port), fhir.server.RequestHandlerClass)
        threading.Thread(target=fhir.server.serve_forever, daemon=True).start()
        try:
            r = svc.client.post(f"/api/jobs/{job.id}/retry", headers=svc.headers["admin"])
            assert r.status_code == 200 and r.json()["status"] == "queued", r.text
            svc.work()
        finally:
            fhir.stop()
        with svc.ctx.db.session() as s:
            job = s.get(Job, job.id)
            actions = [a.action for a in s.execute(select(AuditEvent).order_by(AuditEvent.id)).scalars()]
        assert (job.status, job.attempts) == ("done", 2) and len(fhir.bundles) == 1
        assert actions.index("deliver.failed") < actions.index("job.retry") < actions.index("deliver.sent")
    finally:
        svc.client.close()
        svc.ctx.close()


def test_worker_started_by_serve_stops_when_serve_is_killed(tmp_path: Path) -> None:
    """SIGKILL skips serve's cleanup; its worker notices it was orphaned and exits by itself."""
    parent_code = (
        "import os, subprocess, sys, time\n"
        "p = subprocess.Popen([sys.executable, '-m', 'medsight.cli', 'worker', '--data-dir', sys.argv[1],"
        " '--parent-pid', str(os.getpid())])\n"
        "print(p.pid, flush=True)\n"
        "time.sleep(600)\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", parent_code, str(tmp_path / "data")], stdout=subprocess.PIPE, text=True)
    worker_pid = int(parent.stdout.readline())
    try:
        time.sleep(3.0)  # the worker is up and polling
        assert _alive(worker_pid)
        parent.kill()
        parent.wait(timeout=10)
        end = time.monotonic() + 60
        while _alive(worker_pid) and time.monotonic() < end:
            time.sleep(0.5)
        assert not _alive(worker_pid), "orphaned worker kept running"
    finally:
        if _alive(worker_pid):
            os.kill(worker_pid, signal.SIGKILL)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"  # a zombie has exited
    except FileNotFoundError:
        return False
