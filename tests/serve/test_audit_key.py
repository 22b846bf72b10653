"""The keyed audit chain (issue 13): a rewrite of the whole table with recomputed hashes is caught by
``medsight audit verify``; chains written before the key still verify."""

from __future__ import annotations

import json
import sqlite3
import stat
from pathlib import Path

from typer.testing import CliRunner

from medsight.serve.audit import KEYED, Actor, canonical, chain_hash, record, verify
from medsight.serve.config import ServiceSettings
from medsight.serve.context import ServiceContext
from medsight.serve.database import open_database

OPERATOR = Actor("cli:test", "operator")


def _rewrite(db_file: Path, key: bytes | None, scheme: str | None) -> None:
    """What someone with write access to the database file can do: drop the triggers, edit an event, rehash all."""
    con = sqlite3.connect(db_file)
    con.row_factory = sqlite3.Row
    con.execute("DROP TRIGGER IF EXISTS audit_events_no_update")
    rows = [dict(r) for r in con.execute("SELECT * FROM audit_events ORDER BY id")]
    prev = "0" * 64
    for r in rows:
        r["detail"] = json.loads(r["detail"] or "{}")
        if r["id"] == 2:
            r["detail"]["username"] = "someone-else"
        h = chain_hash(prev, canonical({**r, "ts": r["ts"].replace(" ", "T")}), key)
        con.execute("UPDATE audit_events SET detail=?, prev_hash=?, hash=?, scheme=? WHERE id=?",
                    (json.dumps(r["detail"]), prev, h, scheme, r["id"]))
        prev = h
    con.commit()
    con.close()


def _ctx(tmp_path: Path) -> ServiceContext:
    return ServiceContext.build(ServiceSettings(data_dir=tmp_path / "data", use_zoo=False))


def _events(ctx: ServiceContext, n: int) -> None:
    with ctx.db.session() as s:
        for i in range(n):
            record(s, OPERATOR, "user.create", "user", i, username=f"user{i}")


def _verify(ctx: ServiceContext):  # noqa: ANN202
    with ctx.db.session() as s:
        return verify(s)


def test_a_rewrite_with_recomputed_hashes_is_detected(tmp_path: Path) -> None:
    ctx = _ctx(tmp_path)
    _events(ctx, 4)
    assert _verify(ctx).ok
    with ctx.db.session() as s:
        assert {e for (e,) in s.execute(__import__("sqlalchemy").text("SELECT scheme FROM audit_events"))} == {KEYED}
    ctx.close()
    db_file = tmp_path / "data" / "medsight.db"
    _rewrite(db_file, None, None)  # as an unkeyed chain: what passed before the key ...
    plain = open_database(f"sqlite:///{db_file}")
    with plain.session() as s:
        assert verify(s).ok  # ... as a plain hash chain check still shows
    plain.dispose()
    ctx = _ctx(tmp_path)
    rep = _verify(ctx)
    assert not rep.ok and "unkeyed hash after the keyed chain began" in rep.problems[0]
    ctx.close()
    _rewrite(db_file, b"a guessed key", KEYED)  # keyed, without the real key
    ctx = _ctx(tmp_path)
    rep = _verify(ctx)
    assert not rep.ok and all("does not match its hash" in p for p in rep.problems) and len(rep.problems) == 4
    settings = ctx.settings.write_json(tmp_path / "settings.json")
    ctx.close()
    from medsight.cli import app

    r = CliRunner().invoke(app, ["audit", "verify", "--settings", str(settings)])
    assert r.exit_code == 1 and "does not match" in r.output


def test_a_chain_written_before_the_key_still_verifies_and_continues_keyed(tmp_path: Path) -> None:
    settings = ServiceSettings(data_dir=tmp_path / "data", use_zoo=False)
    settings.data_dir.mkdir()
    old = open_database(settings.db_url)  # a service of the previous version: no key
    with old.session() as s:
        for i in range(3):
            record(s, OPERATOR, "login", "user", i)
    old.dispose()
    assert not settings.audit_key_path.exists()
    ctx = ServiceContext.build(settings)  # first start of this version: the key is created
    key = json.loads(settings.audit_key_path.read_text())
    assert key["unkeyed_through"] == 3 and stat.S_IMODE(settings.audit_key_path.stat().st_mode) == 0o600
    assert settings.audit_key_path.parent != settings.data_dir.resolve()  # not inside the data dir
    _events(ctx, 2)
    rep = _verify(ctx)
    assert rep.ok and rep.checked == 5
    ctx.close()
    ctx = ServiceContext.build(settings)  # a later start keeps the key
    assert json.loads(settings.audit_key_path.read_text()) == key and _verify(ctx).ok
    ctx.close()
    # without the key the keyed events cannot be checked: said so, not passed
    no_key = open_database(settings.db_url)
    with no_key.session() as s:
        rep = verify(s)
    no_key.dispose()
    assert not rep.ok and sum("no audit key" in p for p in rep.problems) == 2
