"""Fixtures for the clinical service: isolated services on SQLite and (when reachable) PostgreSQL.

PostgreSQL: a server on 127.0.0.1:5432 with trust auth and a database ``test``
(user ``postgres`` or ``root``). Every service gets its own fresh schema (via the
libpq ``search_path`` option in the URL) that is dropped afterwards, so parallel
and earlier runs never see each other's tables. Without a server those variants
skip and say why.
"""

from __future__ import annotations

import io
import shutil
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.conftest import make_images

PG_HOST = "127.0.0.1:5432"
PASSWORD = "correct-horse-battery"


def _pg_base_url() -> tuple[str | None, str]:
    try:
        import psycopg
    except ImportError as e:
        return None, f"psycopg not installed ({e})"
    last = ""
    for user in ("postgres", "root"):
        try:
            with psycopg.connect(f"host=127.0.0.1 port=5432 dbname=test user={user} connect_timeout=2"):
                return f"postgresql+psycopg://{user}@{PG_HOST}/test", ""
        except Exception as e:  # noqa: BLE001 - any failure means "not reachable"
            last = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return None, f"no PostgreSQL reachable at {PG_HOST} (database 'test', users postgres/root): {last}"


_PG = _pg_base_url()


def _pg_schema() -> tuple[str, str, str]:
    """A new, uniquely named schema: (SQLAlchemy URL that uses it, libpq conninfo, schema name)."""
    import psycopg

    base, why = _PG
    if base is None:
        pytest.skip(why)
    schema = f"ms_test_{uuid.uuid4().hex[:12]}"
    conninfo = base.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(conninfo, autocommit=True) as c:
        c.execute(f'CREATE SCHEMA "{schema}"')
    return f"{base}?options=-csearch_path%3D{schema}", conninfo, schema


def _drop_schema(conninfo: str, schema: str) -> None:
    import psycopg

    with psycopg.connect(conninfo, autocommit=True) as c:
        c.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A database URL for a fresh, EMPTY database (SQLite file or PostgreSQL schema): for migration tests."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'svc.db'}"
        return
    url, conninfo, schema = _pg_schema()
    try:
        yield url
    finally:
        _drop_schema(conninfo, schema)


@pytest.fixture(scope="session")
def pg_migrated() -> Iterator[str]:
    """One migrated schema for this test session; each service test starts from it truncated."""
    from medsight.serve.database import make_engine, upgrade

    url, conninfo, schema = _pg_schema()
    engine = make_engine(url)
    upgrade(engine)
    engine.dispose()
    try:
        yield url
    finally:
        _drop_schema(conninfo, schema)


def _truncate(url: str) -> None:
    """Empty every table (TRUNCATE fires no row triggers, so the append-only tables empty too)."""
    from sqlalchemy import text

    from medsight.serve.database import make_engine
    from medsight.serve.db import Base

    engine = make_engine(url)
    with engine.begin() as conn:
        names = ", ".join(t.name for t in Base.metadata.sorted_tables)
        conn.execute(text(f"TRUNCATE {names} RESTART IDENTITY CASCADE"))
    engine.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def service_db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A migrated, empty database for a service test (SQLite: a copy of a migrated file; PostgreSQL: a truncated schema)."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'svc.db'}"
        return
    url = request.getfixturevalue("pg_migrated")
    _truncate(url)
    yield url


def png_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="session")
def shape_pngs() -> dict[str, list[bytes]]:
    """PNG images of the tiny model's two classes: 'disc' (its critical finding) and 'bar'."""
    x, y = make_images(12, seed=42)
    out: dict[str, list[bytes]] = {"bar": [], "disc": []}
    for img, lab in zip(x, y[:, 0]):
        out["disc" if lab == 1 else "bar"].append(png_bytes(img))
    return out


@dataclass
class Svc:
    """A running in-process service with one logged-in user per role."""

    app: object
    client: object
    ctx: object
    headers: dict[str, dict[str, str]]

    def upload(self, files: list[tuple[str, bytes]], role: str = "technologist", **form: str):  # noqa: ANN201
        return self.client.post("/api/studies", headers=self.headers[role],
                                files=[("files", (n, b, "application/octet-stream")) for n, b in files], data=form)

    def work(self) -> int:
        from medsight.serve.worker import Worker

        return Worker(self.ctx, name="test-worker").run(exit_when_idle=True)


ROLES = ("admin", "radiologist", "technologist", "auditor")


def post_login_form(client, username: str, password: str, **extra: str):  # noqa: ANN001, ANN201
    """Log in through the login page as a browser does: fetch the form (its CSRF token and cookie), post it."""
    import re

    page = client.get("/login")
    token = re.search(r'name="csrf_token" value="([^"]+)"', page.text).group(1)
    return client.post("/login", data={"username": username, "password": password, "csrf_token": token, **extra},
                       follow_redirects=False)


_HASH: dict[str, str] = {}
_SQLITE_TEMPLATE: dict[str, Path] = {}


def _password_hash() -> str:
    """One argon2 hash per test session (hashing is deliberately slow; users share the test password)."""
    if not _HASH:
        from medsight.serve.auth import hash_password

        _HASH["h"] = hash_password(PASSWORD)
    return _HASH["h"]


def _sqlite_from_template(db_url: str) -> None:
    """Copy a migrated empty SQLite database instead of running the migrations for every test."""
    import tempfile

    from medsight.serve.database import make_engine, upgrade

    if "t" not in _SQLITE_TEMPLATE:
        path = Path(tempfile.mkdtemp(prefix="medsight-tpl-")) / "template.db"
        engine = make_engine(f"sqlite:///{path}")
        upgrade(engine)
        engine.dispose()  # the last connection to close checkpoints the WAL into the main file
        _SQLITE_TEMPLATE["t"] = path
    target = Path(db_url.removeprefix("sqlite:///"))
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(_SQLITE_TEMPLATE["t"], target)


def make_service(tmp_path: Path, db_url: str, models_dir: Path, **overrides: object) -> Svc:
    from fastapi.testclient import TestClient

    from medsight.serve.app import create_app
    from medsight.serve.auth import issue_token
    from medsight.serve.config import ServiceSettings
    from medsight.serve.context import ServiceContext
    from medsight.serve.db import User

    if db_url.startswith("sqlite:///"):
        _sqlite_from_template(db_url)
    settings = ServiceSettings(data_dir=tmp_path / "data", database_url=db_url, model_paths=[models_dir],
                               default_models={"CR": "tiny-xr"}, use_zoo=False, **overrides)
    ctx = ServiceContext.build(settings)
    headers = {}
    with ctx.db.session() as s:
        for role in ROLES:
            user = User(username=f"{role}1", password_hash=_password_hash(), role=role, full_name=f"Test {role}")
            s.add(user)
            s.flush()
            raw, _ = issue_token(s, user, 1.0)
            headers[role] = {"Authorization": f"Bearer {raw}"}
    app = create_app(settings, ctx=ctx)
    return Svc(app, TestClient(app), ctx, headers)


@pytest.fixture
def svc(tmp_path: Path, service_db_url: str, models_dir: Path) -> Iterator[Svc]:
    s = make_service(tmp_path, service_db_url, models_dir)
    yield s
    s.client.close()
    s.ctx.close()


@pytest.fixture
def svc_sqlite(tmp_path: Path, models_dir: Path) -> Iterator[Svc]:
    s = make_service(tmp_path, f"sqlite:///{tmp_path / 'svc.db'}", models_dir)
    yield s
    s.client.close()
    s.ctx.close()
