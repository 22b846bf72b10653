"""Critical-result webhook: queued with the result, retried with backoff against a local receiver on loopback."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import select

from medsight.serve.config import WebhookSettings
from medsight.serve.db import AuditEvent, Job
from medsight.serve.notify import backoff_seconds
from tests.serve.conftest import make_service


class Receiver:
    """A webhook endpoint on 127.0.0.1 that fails the first ``fail_first`` POSTs with 503."""

    def __init__(self, fail_first: int):
        self.fail_first = fail_first
        self.calls: list[tuple[float, dict, dict]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server API
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.calls.append((time.monotonic(), dict(self.headers), body))
                code = 503 if len(outer.calls) <= outer.fail_first else 200
                self.send_response(code)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *_a: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver(fail_first=2)
    yield r
    r.close()


def _critical_png(svc, shape_pngs) -> bytes:  # noqa: ANN001
    """A disc image that the tiny model calls 'disc' (its critical finding)."""
    import io

    from PIL import Image

    from medsight.io.image import MedImage

    pred = svc.ctx.catalog.predictor("tiny-xr")
    for data in shape_pngs["disc"]:
        arr = np.asarray(Image.open(io.BytesIO(data)))
        if pred.predict(MedImage.from_array(arr), explain=False).label == "disc":
            return data
    pytest.fail("the tiny model found no disc")


def _run_until(svc, done, timeout: float = 20.0) -> None:  # noqa: ANN001
    from medsight.serve.worker import Worker

    w = Worker(svc.ctx, name="notifier")
    end = time.monotonic() + timeout
    while time.monotonic() < end and not done():
        if not w.run_once():
            time.sleep(0.05)


def test_critical_result_is_posted_with_retry_and_backoff(tmp_path: Path, models_dir: Path, receiver: Receiver,
                                                          shape_pngs) -> None:  # noqa: ANN001
    hook = WebhookSettings(url=receiver.url, backoff_base_s=0.3, max_attempts=5, timeout_s=2)
    svc = make_service(tmp_path, f"sqlite:///{tmp_path / 'db.sqlite'}", models_dir, webhook=hook,
                       public_url="http://127.0.0.1:8000")
    try:
        sid = svc.upload([("c.png", _critical_png(svc, shape_pngs))], modality="CR", accession_number="ACC9").json()["id"]
        _run_until(svc, lambda: len(receiver.calls) >= 3 and _job(svc, "notify").status == "done")
        assert len(receiver.calls) == 3
        (t1, h1, body), (t2, h2, _), (t3, h3, _) = receiver.calls
        assert h1["Idempotency-Key"] == h2["Idempotency-Key"] == h3["Idempotency-Key"]  # receivers can de-duplicate
        assert body["event"] == "critical_result" and body["study_id"] == sid and body["accession_number"] == "ACC9"
        assert body["finding"] == "disc" and body["critical_probability"] > 0.5
        assert body["url"] == f"http://127.0.0.1:8000/studies/{sid}"
        assert "patient" not in json.dumps(body).lower()
        assert t2 - t1 >= backoff_seconds(hook, 1) - 0.05  # 0.3 s
        assert t3 - t2 >= backoff_seconds(hook, 2) - 0.05  # 0.6 s
        job = _job(svc, "notify")
        assert job.attempts == 3 and job.status == "done"
        with svc.ctx.db.session() as s:
            sent = s.execute(select(AuditEvent).where(AuditEvent.action == "notify.sent")).scalars().all()
        assert len(sent) == 1 and sent[0].detail["attempts"] == 3
    finally:
        svc.client.close()
        svc.ctx.close()


def test_undeliverable_notification_fails_after_max_attempts(tmp_path: Path, models_dir: Path, shape_pngs) -> None:  # noqa: ANN001
    dead = Receiver(fail_first=10**6)
    hook = WebhookSettings(url=dead.url, backoff_base_s=0.05, max_attempts=3, timeout_s=2)
    svc = make_service(tmp_path, f"sqlite:///{tmp_path / 'db.sqlite'}", models_dir, webhook=hook)
    try:
        svc.upload([("c.png", _critical_png(svc, shape_pngs))], modality="CR")
        _run_until(svc, lambda: (j := _job(svc, "notify")) is not None and j.status == "failed")
        assert len(dead.calls) == 3
        assert "HTTP 503" in _job(svc, "notify").last_error
        with svc.ctx.db.session() as s:
            assert s.execute(select(AuditEvent).where(AuditEvent.action == "notify.failed")).scalar_one()
    finally:
        dead.close()
        svc.client.close()
        svc.ctx.close()


def test_backoff_doubles_and_is_capped() -> None:
    cfg = WebhookSettings(backoff_base_s=2, backoff_max_s=10)
    assert [backoff_seconds(cfg, a) for a in (1, 2, 3, 4, 5)] == [2, 4, 8, 10, 10]


def _job(svc, kind: str) -> Job | None:  # noqa: ANN001
    with svc.ctx.db.session() as s:
        return s.execute(select(Job).where(Job.kind == kind).order_by(Job.id.desc()).limit(1)).scalar_one_or_none()
