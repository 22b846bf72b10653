"""Service commands: ``serve``, ``worker``, ``users``, ``audit``, ``export-reviews``, ``db``.

Registered on the main ``medsight`` app in :mod:`medsight.cli`. Settings come
from ``--data-dir`` / ``--settings`` and ``MEDSIGHT_*`` environment variables
(see :class:`~medsight.serve.config.ServiceSettings`).
"""

from __future__ import annotations

import getpass
import json
import logging
import os
import secrets
import signal
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from medsight.errors import MedSightError

err = Console(stderr=True)

DataDirOpt = Annotated[Optional[Path], typer.Option("--data-dir", "-d", help="service data folder (default: $MEDSIGHT_DATA_DIR or ./medsight-data)")]
SettingsOpt = Annotated[Optional[Path], typer.Option("--settings", help="JSON file of ServiceSettings fields")]
DEMO_DIR = Path("medsight-demo")
DEMO_MARKER = ".medsight-demo"


def _fail(e: Exception, code: int = 2) -> None:
    err.print(f"[red]error:[/red] {e}", markup=True, highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def load_settings(data_dir: Path | None, settings_file: Path | None, **overrides: object):  # noqa: ANN201
    from medsight.serve.config import ServiceSettings

    return ServiceSettings.from_env(settings_file, data_dir=data_dir, **overrides)


def _context(data_dir: Path | None, settings_file: Path | None, **overrides: object):  # noqa: ANN201
    from medsight.serve.context import ServiceContext

    try:
        return ServiceContext.build(load_settings(data_dir, settings_file, **overrides))
    except MedSightError as e:
        _fail(e)


def _cli_actor():  # noqa: ANN202
    from medsight.serve.audit import Actor

    try:
        who = getpass.getuser()
    except Exception:
        who = "unknown"
    return Actor(f"cli:{who}", "operator", None, None)


# --------------------------------------------------------------------------- worker
def worker_cmd(
    data_dir: DataDirOpt = None,
    settings: SettingsOpt = None,
    max_jobs: Annotated[Optional[int], typer.Option(min=1, help="exit after this many jobs")] = None,
    exit_when_idle: Annotated[bool, typer.Option(help="exit when no job is due")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
    parent_pid: Annotated[Optional[int], typer.Option("--parent-pid", hidden=True,
                                                      help="stop (after the current job) when this process is gone")] = None,
) -> None:
    """Run background jobs (analysis, notifications) until stopped (SIGTERM/Ctrl-C finish the current job)."""
    from medsight.serve.worker import Worker

    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    ctx = _context(data_dir, settings)
    w = Worker(ctx)
    signal.signal(signal.SIGTERM, lambda *_: w.stop())
    if parent_pid is not None:
        _stop_with_parent(w, parent_pid)
    err.print(f"worker {w.name} on {ctx.db.dialect} ({ctx.settings.data_dir})", highlight=False)
    try:
        n = w.run(max_jobs=max_jobs, exit_when_idle=exit_when_idle)
    except KeyboardInterrupt:
        n = w.done
    finally:
        ctx.close()
    err.print(f"worker {w.name}: {n} jobs done", highlight=False)


def _stop_with_parent(w, parent_pid: int, period_s: float = 2.0) -> None:  # noqa: ANN001
    """A worker started by ``medsight serve`` must not outlive it: if serve is killed with SIGKILL its
    ``finally`` never runs, and the orphan would keep claiming jobs. When the parent is gone we are
    re-parented, so ``getppid()`` changes; the worker then finishes its current job and exits."""
    import threading

    def watch() -> None:
        while not w.stop_event.wait(period_s):
            if os.getppid() != parent_pid:
                err.print(f"worker {w.name}: parent process {parent_pid} is gone, stopping", highlight=False)
                w.stop()

    threading.Thread(target=watch, name="medsight-parent-watch", daemon=True).start()


# --------------------------------------------------------------------------- serve
def serve_cmd(
    host: Annotated[str, typer.Option(help="address to listen on")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port")] = 8000,
    data_dir: DataDirOpt = None,
    settings: SettingsOpt = None,
    demo: Annotated[bool, typer.Option("--demo", help="load and analyse the bundled sample studies (data dir: ./medsight-demo)")] = False,
    workers: Annotated[int, typer.Option(min=0, help="background worker processes to start with the server (0: run 'medsight worker' yourself)")] = 1,
) -> None:
    """Start the clinical service (API, web pages) and its background workers."""
    import uvicorn

    from medsight.serve.app import create_app

    if demo and data_dir is None and not os.environ.get("MEDSIGHT_DATA_DIR"):
        data_dir = DEMO_DIR
    from medsight.serve.context import ServiceContext

    cfg = load_settings(data_dir, settings)
    if "public_url" not in cfg.model_fields_set:  # links in notifications point at this server
        cfg = cfg.model_copy(update={"public_url": f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}"})
    try:
        ctx = ServiceContext.build(cfg)
    except MedSightError as e:
        _fail(e)
    logins: list[tuple[str, str, str]] = []
    if demo:
        try:
            logins = prepare_demo(ctx)
        except MedSightError as e:
            _fail(e)
    from medsight.serve.shared_outputs import claim_outputs

    try:  # the listener on this data folder must send results where this service does (reviews' verified SRs)
        release = claim_outputs(ctx.settings, "service")
    except MedSightError as e:
        _fail(e)
    settings_path = ctx.settings.write_json(ctx.settings.data_dir / "settings.json")
    supervisor = _start_workers(ctx, settings_path, workers)
    app = create_app(ctx.settings, ctx=ctx)
    out = Console()
    out.print(f"\nMedSight service: [bold]{ctx.settings.public_url}/[/bold]   (API docs: {ctx.settings.public_url}/docs)")
    out.print(f"data: {ctx.settings.data_dir.resolve()}  database: {ctx.db.dialect}  workers: {workers}", highlight=False)
    for user, role, pw in logins:
        out.print(f"log in as [bold]{user}[/bold] ({role}) with password [bold]{pw}[/bold]  (shown once; change it)")
    if demo and not logins:
        out.print("demo users were created on the first start; their passwords were printed then", highlight=False)
    if not demo and not _has_users(ctx):
        out.print("no users yet: create the first admin with  medsight users create --username admin --role admin", highlight=False)
    try:
        # proxy_headers off: X-Forwarded-For is read by the app, and only from settings.trusted_proxies
        uvicorn.run(app, host=host, port=port, log_level="warning", proxy_headers=False)
    finally:
        supervisor.stop()
        release()


def _start_workers(ctx, settings_path: Path, count: int):  # noqa: ANN001, ANN202 - ServiceContext, WorkerSupervisor
    """The service's worker processes, restarted with backoff when one dies (each restart audited)."""
    from medsight.serve.audit import Actor, record
    from medsight.serve.supervisor import WorkerSupervisor

    def audited(slot: int, code: int, backoff_s: float) -> None:
        with ctx.db.session() as s:
            record(s, Actor("medsight-serve", "operator"), "worker.restarted", "worker", slot, exit_code=code, backoff_s=backoff_s)

    argv = [sys.executable, "-m", "medsight.cli", "worker", "--settings", str(settings_path), "--parent-pid", str(os.getpid())]
    return WorkerSupervisor(argv, count, max_backoff_s=ctx.settings.worker_restart_max_backoff_s, on_restart=audited).start()


def _has_users(ctx) -> bool:  # noqa: ANN001
    from sqlalchemy import func, select

    from medsight.serve.db import User

    with ctx.db.session() as s:
        return s.execute(select(func.count(User.id))).scalar_one() > 0


def prepare_demo(ctx) -> list[tuple[str, str, str]]:  # noqa: ANN001
    """Demo data folder only: create demo users (generated passwords, printed once) and queue the sample studies."""
    from medsight.serve.auth import create_user
    from medsight.serve.demo import load_demo_studies

    marker = ctx.settings.data_dir / DEMO_MARKER
    fresh = not _has_users(ctx)
    if not fresh and not marker.exists():
        raise MedSightError(f"{ctx.settings.data_dir} is not a demo data folder (it has users but no {DEMO_MARKER}); "
                            "use --data-dir with an empty or demo folder")
    logins = []
    if fresh:
        marker.write_text("created by medsight serve --demo; demo users have generated passwords\n")
        with ctx.db.session() as s:
            for user, role in (("admin", "admin"), ("radiologist", "radiologist")):
                pw = secrets.token_urlsafe(12)
                create_user(s, user, pw, role, full_name=f"Demo {role}")
                logins.append((user, role, pw))
        load_demo_studies(ctx, Console(stderr=True))
    return logins


# --------------------------------------------------------------------------- users
users_app = typer.Typer(help="Manage service users.", no_args_is_help=True)


def _read_password(password_stdin: bool) -> str:
    if password_stdin:
        return sys.stdin.readline().rstrip("\n")
    if os.environ.get("MEDSIGHT_PASSWORD"):
        return os.environ["MEDSIGHT_PASSWORD"]
    if sys.stdin.isatty():
        return typer.prompt("password", hide_input=True, confirmation_prompt=True)
    _fail(MedSightError("no password: use --password-stdin, set MEDSIGHT_PASSWORD, or run in a terminal"))


def _change_user(username: str, data_dir: Path | None, settings: Path | None, change) -> None:  # noqa: ANN001
    """Run ``change(session, auditor, user_id)`` on the named user as the command-line operator; print the user."""
    from medsight.serve.audit import Auditor
    from medsight.serve.auth import find_user

    ctx = _context(data_dir, settings)
    try:
        with ctx.db.session() as s:
            u = find_user(s, username)
            if u is None:
                raise MedSightError(f"no user {username!r}")
            u = change(s, Auditor(s, _cli_actor()), u.id)
            print(json.dumps({"id": u.id, "username": u.username, "role": u.role, "active": u.active}))
    except MedSightError as e:
        _fail(e)
    finally:
        ctx.close()


@users_app.command("create")
def users_create(
    username: Annotated[str, typer.Option("--username", "-u")],
    role: Annotated[str, typer.Option("--role", "-r", help="admin | radiologist | technologist | auditor")],
    full_name: Annotated[str, typer.Option("--full-name")] = "",
    password_stdin: Annotated[bool, typer.Option("--password-stdin", help="read the password from standard input")] = False,
    data_dir: DataDirOpt = None,
    settings: SettingsOpt = None,
) -> None:
    """Create a user. Password: --password-stdin, else $MEDSIGHT_PASSWORD, else an interactive prompt."""
    from medsight.serve.audit import record
    from medsight.serve.auth import create_user

    password = _read_password(password_stdin)
    ctx = _context(data_dir, settings)
    try:
        with ctx.db.session() as s:
            u = create_user(s, username, password, role, full_name)
            record(s, _cli_actor(), "user.create", "user", u.id, username=u.username, role=u.role)
            print(json.dumps({"id": u.id, "username": u.username, "role": u.role}))
    except MedSightError as e:
        _fail(e)
    finally:
        ctx.close()


@users_app.command("list")
def users_list(data_dir: DataDirOpt = None, settings: SettingsOpt = None) -> None:
    """List users (never their password hashes)."""
    from sqlalchemy import select

    from medsight.serve.db import User

    ctx = _context(data_dir, settings)
    with ctx.db.session() as s:
        for u in s.execute(select(User).order_by(User.username)).scalars():
            print(json.dumps({"id": u.id, "username": u.username, "role": u.role, "active": u.active}))
    ctx.close()


@users_app.command("unlock")
def users_unlock(username: Annotated[str, typer.Argument()], data_dir: DataDirOpt = None,
                 settings: SettingsOpt = None) -> None:
    """Lift a login lock (after repeated wrong passwords) now."""
    from medsight.serve.usecases import unlock_user

    _change_user(username, data_dir, settings, unlock_user)


@users_app.command("reactivate")
def users_reactivate(username: Annotated[str, typer.Argument()], data_dir: DataDirOpt = None,
                     settings: SettingsOpt = None) -> None:
    """Make a deactivated user active again (e.g. the only admin, deactivated by another)."""
    from medsight.serve.usecases import update_user

    _change_user(username, data_dir, settings, lambda s, audit, uid: update_user(s, audit, 0, uid, active=True))


@users_app.command("reset-password")
def users_reset_password(
    username: Annotated[str, typer.Argument()],
    password_stdin: Annotated[bool, typer.Option("--password-stdin", help="read the password from standard input")] = False,
    data_dir: DataDirOpt = None,
    settings: SettingsOpt = None,
) -> None:
    """Set a user's password (their sessions end, a login lock is lifted). Password as for create."""
    from medsight.serve.usecases import reset_password

    password = _read_password(password_stdin)
    _change_user(username, data_dir, settings, lambda s, audit, uid: reset_password(s, audit, uid, password))


# --------------------------------------------------------------------------- audit
audit_app = typer.Typer(help="Audit trail.", no_args_is_help=True)


@audit_app.command("verify")
def audit_verify(
    data_dir: DataDirOpt = None,
    settings: SettingsOpt = None,
    expect_head: Annotated[Optional[str], typer.Option(help="head hash printed by an earlier verify (detects removed tail events)")] = None,
) -> None:
    """Recompute the audit hash chain; exit 1 and list the rows if any event was edited or deleted."""
    from medsight.serve.audit import verify

    ctx = _context(data_dir, settings)
    with ctx.db.session() as s:
        rep = verify(s, expect_head)
    ctx.close()
    print(json.dumps(rep.to_dict(), indent=2))
    if not rep.ok:
        err.print(f"[red]audit chain BROKEN:[/red] {len(rep.problems)} problem(s)", markup=True)
        raise typer.Exit(1)
    err.print(f"audit chain intact: {rep.checked} events, head {rep.head}", highlight=False)


# --------------------------------------------------------------------------- storage
storage_app = typer.Typer(help="Stored files: integrity check and clean-up.", no_args_is_help=True)


@storage_app.command("verify")
def storage_verify(data_dir: DataDirOpt = None, settings: SettingsOpt = None) -> None:
    """Re-hash every stored file the database references; exit 1 if any is missing or altered."""
    from medsight.serve.maintenance import verify_storage

    ctx = _context(data_dir, settings)
    try:
        rep = verify_storage(ctx)
    finally:
        ctx.close()
    print(json.dumps({"checked": rep.checked, "missing": rep.missing, "corrupt": rep.corrupt}, indent=2))
    if not rep.ok:
        err.print(f"[red]storage damaged:[/red] {len(rep.missing)} missing, {len(rep.corrupt)} altered", markup=True)
        raise typer.Exit(1)
    err.print(f"storage intact: {rep.checked} referenced files", highlight=False)


@storage_app.command("gc")
def storage_gc(
    data_dir: DataDirOpt = None,
    settings: SettingsOpt = None,
    min_age_hours: Annotated[float, typer.Option(min=0.0, help="keep unreferenced files younger than this (uploads in flight)")] = 24.0,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="report what would be removed, remove nothing")] = False,
) -> None:
    """Remove stored files no database row references (left by failed transactions), audited."""
    from medsight.serve.audit import record
    from medsight.serve.maintenance import collect_garbage

    ctx = _context(data_dir, settings)
    try:
        rep = collect_garbage(ctx, min_age_s=min_age_hours * 3600, dry_run=dry_run)
        if not dry_run:
            with ctx.db.session() as s:
                record(s, _cli_actor(), "storage.gc", "storage", None, **rep.to_dict())
    finally:
        ctx.close()
    print(json.dumps(rep.to_dict(), indent=2))
    verb = "would remove" if dry_run else "removed"
    err.print(f"{verb} {rep.removed} unreferenced files ({rep.removed_bytes} bytes) and {rep.temp_removed} temporary files; "
              f"kept {rep.referenced} referenced and {rep.kept_recent} recent", highlight=False)


# --------------------------------------------------------------------------- export
def export_reviews_cmd(
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="folder for manifest.csv and images/")],
    model: Annotated[Optional[str], typer.Option("--model", "-m", help="model whose reviewed cases to export")] = None,
    originals: Annotated[bool, typer.Option("--originals", help="copy stored files instead of writing de-identified PNGs")] = False,
    data_dir: DataDirOpt = None,
    settings: SettingsOpt = None,
) -> None:
    """Write reviewed cases as a labelled data set (CSV manifest) for 'medsight train --data DIR/manifest.csv'."""
    from medsight.serve.export import export_reviews

    ctx = _context(data_dir, settings)
    try:
        summary = export_reviews(ctx, out_dir, _cli_actor(), model, originals)
    except MedSightError as e:
        _fail(e)
    finally:
        ctx.close()
    print(json.dumps({"manifest": str(summary.manifest), "cases": summary.cases, "model": summary.model,
                      "labels": summary.labels}, indent=2))


# --------------------------------------------------------------------------- db
db_app = typer.Typer(help="Database schema migrations (Alembic).", no_args_is_help=True)


@db_app.command("upgrade")
def db_upgrade(revision: str = "head", data_dir: DataDirOpt = None, settings: SettingsOpt = None) -> None:
    from medsight.serve.database import current_revision, make_engine, upgrade

    engine = make_engine(load_settings(data_dir, settings).db_url)
    upgrade(engine, revision)
    print(current_revision(engine))


@db_app.command("downgrade")
def db_downgrade(revision: Annotated[str, typer.Argument(help="target revision, e.g. base")],
                 data_dir: DataDirOpt = None, settings: SettingsOpt = None) -> None:
    from medsight.serve.database import current_revision, downgrade, make_engine

    engine = make_engine(load_settings(data_dir, settings).db_url)
    downgrade(engine, revision)
    print(current_revision(engine))


@db_app.command("current")
def db_current(data_dir: DataDirOpt = None, settings: SettingsOpt = None) -> None:
    from medsight.serve.database import current_revision, make_engine

    print(current_revision(make_engine(load_settings(data_dir, settings).db_url)))
