"""Bounded load test of the clinical service on loopback.

Starts a real ``medsight serve`` (uvicorn + worker processes) on 127.0.0.1, then
``--concurrency`` uploaders POST ``--studies`` distinct studies (28x28 chest
radiograph PNGs derived from the bundled pneumonia-cxr samples with seeded
noise, declared modality CR) and the script waits until every accepted study
has a result. Reports accepted / analysed / failed / lost, upload latency
percentiles, per-study time to result, and end-to-end time; writes JSON and
Markdown to ``--out``.

"Lost" = accepted (202) but, at the end, missing from the database or never
analysed although the queue drained. Traffic only goes to 127.0.0.1; every loop
is bounded by ``--timeout``.

    python benchmarks/service/run.py --studies 2000 --concurrency 20 --workers 2
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

HERE = Path(__file__).resolve().parent
PASSWORD = "load-test-password"


def make_studies(n: int, seed: int = 0) -> list[bytes]:
    from medsight.io.samples import SAMPLES_DIR

    bases = [np.asarray(Image.open(SAMPLES_DIR / f).convert("L"), dtype=np.int16)
             for f in ("pneumonia-cxr_test0000_pneumonia.png", "pneumonia-cxr_test0001_normal.png")]
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        img = np.clip(bases[i % 2] + rng.integers(-6, 7, bases[0].shape), 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


def pct(xs: list[float], q: float) -> float | None:
    return float(np.percentile(xs, q)) if xs else None


async def upload_all(base: str, token: str, studies: list[bytes], concurrency: int, deadline: float) -> list[dict]:
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(len(studies)):
        queue.put_nowait(i)
    records: list[dict] = []
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)

    async def uploader(client: httpx.AsyncClient) -> None:
        while time.monotonic() < deadline:
            try:
                i = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            t0 = time.monotonic()
            try:
                r = await client.post("/api/studies", files=[("files", (f"s{i}.png", studies[i], "image/png"))],
                                      data={"modality": "CR", "accession_number": f"LOAD-{i:05d}"})
                rec = {"i": i, "status": r.status_code, "latency_s": time.monotonic() - t0, "sent": t0}
                if r.status_code == 202:
                    rec["study_id"] = r.json()["id"]
                else:
                    rec["error"] = r.text[:300]
            except httpx.HTTPError as e:
                rec = {"i": i, "status": None, "latency_s": time.monotonic() - t0, "sent": t0, "error": repr(e)}
            records.append(rec)

    async with httpx.AsyncClient(base_url=base, headers={"Authorization": f"Bearer {token}"}, timeout=120,
                                 limits=limits) as client:
        await asyncio.gather(*(uploader(client) for _ in range(concurrency)))
    return records


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--studies", type=int, default=2000)
    ap.add_argument("--concurrency", type=int, default=20)
    ap.add_argument("--workers", type=int, default=2, help="worker processes started by medsight serve")
    ap.add_argument("--model", default="pneumonia-cxr")
    ap.add_argument("--model-path", type=Path, action="append", default=[], help="extra model package folders")
    ap.add_argument("--database-url", default=None, help="default: SQLite in a temporary data folder")
    ap.add_argument("--timeout", type=float, default=1800.0, help="hard limit for the whole run, seconds")
    ap.add_argument("--out", type=Path, default=HERE / "results")
    ap.add_argument("--tag", default="", help="suffix for the result file names")
    args = ap.parse_args(argv)

    from sqlalchemy import func, select

    from medsight.serve.auth import create_user
    from medsight.serve.config import ServiceSettings
    from medsight.serve.context import ServiceContext
    from medsight.serve.db import Job, Study

    tmp = Path(tempfile.mkdtemp(prefix="medsight-load-"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    settings = ServiceSettings(data_dir=tmp / "data", database_url=args.database_url, model_paths=args.model_path,
                               default_models={"CR": args.model}, public_url=f"http://127.0.0.1:{port}", poll_seconds=0.2)
    ctx = ServiceContext.build(settings)
    ctx.catalog.card(args.model)  # fail early if the model is not installed
    with ctx.db.session() as s:
        create_user(s, "loadtest", PASSWORD, "technologist")
    path = settings.write_json(tmp / "settings.json")
    studies = make_studies(args.studies)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEDSIGHT_")}
    log = open(tmp / "server.log", "wb")
    server = subprocess.Popen([sys.executable, "-m", "medsight.cli", "serve", "--host", "127.0.0.1", "--port", str(port),
                               "--settings", str(path), "--workers", str(args.workers)], env=env, stdout=log, stderr=log)
    base = f"http://127.0.0.1:{port}"
    hard_deadline = time.monotonic() + args.timeout
    try:
        while True:
            try:
                if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > hard_deadline or server.poll() is not None:
                raise SystemExit(f"server did not start; see {tmp / 'server.log'}")
            time.sleep(0.3)
        token = httpx.post(f"{base}/api/auth/login", json={"username": "loadtest", "password": PASSWORD}).json()["token"]
        t_start = time.monotonic()
        wall_start = time.time()
        records = asyncio.run(upload_all(base, token, studies, args.concurrency, hard_deadline))
        t_uploaded = time.monotonic()
        accepted = {r["study_id"] for r in records if r["status"] == 202}
        # Wait until every accepted study is analysed (or failed), bounded by the hard deadline.
        while time.monotonic() < hard_deadline:
            with ctx.db.session() as s:
                pending = s.execute(select(func.count(Job.id)).where(Job.kind == "analyse",
                                                                     Job.status.in_(("queued", "running")))).scalar_one()
            if pending == 0:
                break
            time.sleep(0.5)
        t_done = time.monotonic()
        with ctx.db.session() as s:
            rows = s.execute(select(Study.id, Study.status, Study.received_at, Study.analysed_at)).all()
    finally:
        server.terminate()
        try:
            server.wait(60)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()
    by_id = {r.id: r for r in rows}
    analysed = [r for r in rows if r.id in accepted and r.analysed_at is not None]
    failed = [r for r in rows if r.id in accepted and r.status == "failed"]
    lost = sorted(i for i in accepted if i not in by_id or (by_id[i].analysed_at is None and by_id[i].status != "failed"))
    lat = [r["latency_s"] for r in records if r["status"] == 202]
    ttr = [(r.analysed_at - r.received_at).total_seconds() for r in analysed]
    last_result = max((r.analysed_at for r in analysed), default=None)
    result = {
        "benchmark": "service-load", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "config": {"studies": args.studies, "concurrency": args.concurrency, "workers": args.workers, "model": args.model,
                   "database": ctx.db.dialect, "image": "28x28 PNG, modality CR"},
        "sent": len(records), "accepted": len(accepted),
        "rejected": {str(k): sum(1 for r in records if r["status"] == k) for k in {r["status"] for r in records if r["status"] != 202}},
        "analysed": len(analysed), "failed": len(failed), "lost": len(lost), "lost_ids": lost[:50],
        "upload_latency_s": {"p50": pct(lat, 50), "p95": pct(lat, 95), "p99": pct(lat, 99), "max": max(lat, default=None),
                             "mean": statistics.fmean(lat) if lat else None},
        "time_to_result_s": {"p50": pct(ttr, 50), "p95": pct(ttr, 95), "p99": pct(ttr, 99), "max": max(ttr, default=None)},
        "upload_phase_s": t_uploaded - t_start,
        "end_to_end_s": (last_result.replace(tzinfo=timezone.utc).timestamp() - wall_start) if last_result else None,
        "wait_loop_s": t_done - t_start,
        "uploads_per_s": len(accepted) / (t_uploaded - t_start) if t_uploaded > t_start else None,
        "results_per_s": len(analysed) / (t_done - t_start) if t_done > t_start else None,
        "timed_out": time.monotonic() >= hard_deadline,
    }
    ctx.close()
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"service_load{('_' + args.tag) if args.tag else ''}"
    (args.out / f"{stem}.json").write_text(json.dumps(result, indent=2))
    (args.out / f"{stem}.md").write_text(markdown(result))
    print(markdown(result))
    return 0 if result["lost"] == 0 and not result["timed_out"] else 1


def markdown(r: dict) -> str:
    f = lambda v, d=3: "-" if v is None else f"{v:.{d}f}"  # noqa: E731
    c = r["config"]
    return "\n".join([
        "# Service load test", "",
        f"{r['date']} · {r['machine']['cpus']} CPUs · {c['database']} · model {c['model']} · {c['workers']} worker processes · "
        f"{c['concurrency']} concurrent uploaders · {c['studies']} studies ({c['image']})", "",
        "| sent | accepted | analysed | failed | lost | rejected |", "|---:|---:|---:|---:|---:|---|",
        f"| {r['sent']} | {r['accepted']} | {r['analysed']} | {r['failed']} | **{r['lost']}** | {r['rejected'] or '-'} |", "",
        "| metric | p50 | p95 | p99 | max |", "|---|---:|---:|---:|---:|",
        f"| upload latency (s) | {f(r['upload_latency_s']['p50'])} | {f(r['upload_latency_s']['p95'])} | {f(r['upload_latency_s']['p99'])} | {f(r['upload_latency_s']['max'])} |",
        f"| time to result (s) | {f(r['time_to_result_s']['p50'])} | {f(r['time_to_result_s']['p95'])} | {f(r['time_to_result_s']['p99'])} | {f(r['time_to_result_s']['max'])} |",
        "",
        f"Upload phase {f(r['upload_phase_s'], 1)} s ({f(r['uploads_per_s'], 1)} uploads/s); end to end (first upload to last result) "
        f"{f(r['end_to_end_s'], 1)} s; {f(r['results_per_s'], 1)} results/s." + (" **Timed out.**" if r["timed_out"] else ""),
        "",
    ])


if __name__ == "__main__":
    sys.exit(main())
