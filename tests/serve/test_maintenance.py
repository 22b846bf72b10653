"""Storage upkeep: unreferenced blobs are collected (never young ones, never referenced ones), and a
referenced blob that was deleted or altered is reported by `medsight storage verify`."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from typer.testing import CliRunner

from medsight.cli import app
from medsight.serve.maintenance import collect_garbage, referenced_blobs, stored_blobs, verify_storage


def test_gc_removes_only_old_unreferenced_blobs_and_verify_finds_damage(svc_sqlite, shape_pngs) -> None:  # noqa: ANN001
    svc = svc_sqlite
    assert svc.upload([("a.png", shape_pngs["disc"][0])], modality="CR").status_code == 202
    svc.work()
    store = svc.ctx.store
    refs = referenced_blobs(svc.ctx)
    assert len(refs) == 4  # the upload, its display PNG, overlay and heat map
    orphan_old = store.put_bytes(b"written by a transaction that then failed")
    orphan_new = store.put_bytes(b"written a moment ago by an upload still in flight")
    old = time.time() - 3 * 86400
    os.utime(store.path_for(orphan_old), (old, old))
    for sha in refs:  # age does not matter for referenced files
        os.utime(store.path_for(sha), (old, old))
    (store.tmp_dir / "put-crashed").write_bytes(b"partial")
    os.utime(store.tmp_dir / "put-crashed", (old, old))

    dry = collect_garbage(svc.ctx, dry_run=True)
    assert (dry.removed, dry.kept_recent, dry.referenced, dry.temp_removed) == (1, 1, 4, 1)
    assert store.path_for(orphan_old).exists()  # dry run removes nothing
    rep = collect_garbage(svc.ctx)
    assert rep.removed == 1 and rep.removed_bytes == len(b"written by a transaction that then failed")
    assert set(stored_blobs(store.root)) == refs | {orphan_new}
    assert not (store.tmp_dir / "put-crashed").exists()
    assert verify_storage(svc.ctx).ok

    victim, tampered = sorted(refs)[:2]
    store.path_for(victim).unlink()
    store.path_for(tampered).write_bytes(b"bit rot")
    bad = verify_storage(svc.ctx)
    assert (bad.missing, bad.corrupt, bad.checked) == ([victim], [tampered], 4)


def test_storage_cli_reports_and_audits(svc_sqlite, tmp_path: Path) -> None:  # noqa: ANN001
    db = ["--settings", str(svc_sqlite.ctx.settings.write_json(tmp_path / "s.json"))]
    runner = CliRunner()
    r = runner.invoke(app, ["storage", "verify", *db])
    assert r.exit_code == 0 and json.loads(r.stdout)["checked"] == 0, r.output
    sha = svc_sqlite.ctx.store.put_bytes(b"orphan")
    r = runner.invoke(app, ["storage", "gc", "--min-age-hours", "0", *db])
    assert r.exit_code == 0 and json.loads(r.stdout)["removed"] == 1, r.output
    assert not svc_sqlite.ctx.store.path_for(sha).exists()
    from sqlalchemy import select

    from medsight.serve.db import AuditEvent

    with svc_sqlite.ctx.db.session() as s:
        last = s.execute(select(AuditEvent).order_by(AuditEvent.id.desc()).limit(1)).scalar_one()
    assert last.action == "storage.gc" and last.actor.startswith("cli:")
    r = runner.invoke(app, ["audit", "verify", *db])
    assert r.exit_code == 0, r.output
