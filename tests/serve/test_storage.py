"""Schema migrations, content-addressed storage, and 'nothing stored half-way'."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
from sqlalchemy import inspect, text

from medsight.serve.database import current_revision, downgrade, make_engine, upgrade
from medsight.serve.db import Base
from medsight.serve.storage import FileStore, StorageError


#: the newest migration (several engineers add them: the number is read from the folder, not written here)
HEAD = max(p.name.split("_", 1)[0] for p in (Path(__file__).parents[2] / "medsight/serve/migrations/versions").glob("0*.py"))


def test_migrations_upgrade_downgrade_upgrade_match_models(db_url: str) -> None:
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    engine = make_engine(db_url)
    try:
        assert current_revision(engine) is None
        upgrade(engine)
        assert current_revision(engine) == HEAD  # the head
        tables = set(inspect(engine).get_table_names())
        assert {"users", "studies", "instances", "jobs", "results", "reviews", "audit_events", "worker_beats"} <= tables
        with engine.connect() as conn:
            diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
        assert diff == [], f"models and migrations disagree: {diff}"
        downgrade(engine, "base")
        assert current_revision(engine) is None
        assert set(inspect(engine).get_table_names()) <= {"alembic_version"}
        upgrade(engine)
        assert current_revision(engine) == HEAD  # the head
        # The append-only triggers came back with the second upgrade.
        with engine.begin() as conn:
            conn.execute(text("INSERT INTO audit_events (ts, actor, action, object_type, detail, prev_hash, hash) "
                              "VALUES ('2025-01-01 00:00:00', 'x', 'a', 't', '{}', :p, :h)"), {"p": "0" * 64, "h": "1" * 64})
        with pytest.raises(Exception, match="append-only"), engine.begin() as conn:
            conn.execute(text("UPDATE audit_events SET actor = 'y'"))
    finally:
        engine.dispose()


def test_file_store_is_content_addressed_and_atomic(tmp_path: Path) -> None:
    store = FileStore(tmp_path / "files")
    data = os.urandom(3 * (1 << 20) + 17)  # several read chunks
    sha = store.put_bytes(data)
    assert sha == hashlib.sha256(data).hexdigest()
    path = store.path_for(sha)
    assert path == tmp_path / "files" / sha[:2] / sha[2:4] / sha
    assert path.read_bytes() == data
    assert store.put_bytes(data) == sha  # idempotent, stored once
    assert list((tmp_path / "files" / ".tmp").iterdir()) == []  # no temp files left
    assert store.verify(sha)
    path.write_bytes(data[:-1])  # bit rot / tampering
    assert not store.verify(sha)
    with pytest.raises(StorageError):
        store.path_for("../../etc/passwd")


def test_failed_write_leaves_no_file(tmp_path: Path) -> None:
    store = FileStore(tmp_path / "files")

    class Exploding:
        def __init__(self) -> None:
            self.n = 0

        def read(self, _size: int) -> bytes:
            self.n += 1
            if self.n > 2:
                raise OSError("disk unplugged")
            return b"x" * 1000

    with pytest.raises(OSError):
        store.put_stream(Exploding())
    files = [p for p in (tmp_path / "files").rglob("*") if p.is_file()]
    assert files == []


def test_database_error_after_files_leaves_no_rows(svc, shape_pngs, monkeypatch) -> None:  # noqa: ANN001
    """If the transaction fails after the files were written, no study/instance/job row exists (only an orphan blob)."""
    from sqlalchemy import func, select

    import medsight.serve.ingest as ingest_mod
    from medsight.serve.db import Instance, Job, Study

    def broken_record(*_a, **_k):  # noqa: ANN002, ANN003
        raise RuntimeError("database went away mid-transaction")

    monkeypatch.setattr(ingest_mod, "record", broken_record)
    with pytest.raises(RuntimeError):
        svc.upload([("a.png", shape_pngs["disc"][0])], modality="CR")
    with svc.ctx.db.session() as s:
        for model in (Study, Instance, Job):
            assert s.execute(select(func.count(model.id))).scalar_one() == 0
