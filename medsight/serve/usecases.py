"""What the JSON API and the pages both do, written once.

Each use case does its work in the caller's transaction and audits it there with the
request's :class:`~medsight.serve.audit.Auditor`, so an API route and the page that
shows the same thing cannot drift apart in what they check, return or log. Reviews
go through :func:`medsight.serve.reviewed_report.submit_review`, uploads through
:func:`medsight.serve.ingest.ingest`; both audit themselves.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from medsight.errors import UploadError
from medsight.serve.audit import Actor, Auditor, verify
from medsight.serve.auth import (
    UserError,
    create_user,
    find_user,
    issue_token,
    keep_an_admin,
    password_matches,
    revoke_token,
    set_password,
    verify_password,
)
from medsight.serve.config import TriageWeights
from medsight.serve.context import ServiceContext
from medsight.serve.db import ROLES, AuditEvent, Study, User, utcnow
from medsight.serve.ingest import UploadRequest, ingest
from medsight.serve.reviews import agreement
from medsight.serve.throttle import LoginGuard, RepeatReads, account_failure, account_retry_after
from medsight.serve.views import audit_dict, study_detail
from medsight.serve.worklist import worklist


# --------------------------------------------------------------------------- sessions
@dataclass(frozen=True)
class LoginRefused:
    """A login answered without a session: 401 (wrong), 429 (wait: throttled or locked), 503 (busy)."""

    status: int
    detail: str
    retry_after_s: float = 0.0


def login(s: Session, audit: Auditor, guard: LoginGuard, client_ip: str | None, username: str, password: str,
          token_hours: float) -> tuple[str, User] | LoginRefused:
    """A new session token for a right password, else why not.

    Throttled clients and locked accounts are refused before any password hash (a flood costs a dict
    lookup), and not audited per attempt: the lock itself is audited once, when it begins.
    """
    client = client_ip or "?"
    wait = guard.clients.retry_after(client)
    if wait > 0:
        return LoginRefused(429, "too many failed logins from this address: wait and try again", wait)
    # Read the account in a short transaction of its own and check the password outside any: SQLite's
    # transaction holds the write lock, which would queue every other request behind each argon2 run.
    with Session(s.get_bind(), expire_on_commit=False) as r, r.begin():
        found = find_user(r, username)
    wait = account_retry_after(found.locked_until, utcnow()) if found is not None else 0.0
    if wait > 0:
        return LoginRefused(429, "this account is locked after repeated wrong passwords: wait, or ask an "
                                 "administrator to unlock it", wait)
    with guard.slots.slot() as got:
        if not got:
            return LoginRefused(503, "the service is busy checking other logins: try again", 1.0)
        matches = password_matches(found, password)
    # the row as it is now, in the request's transaction (locked on PostgreSQL: concurrent failures all count)
    user = None if found is None else s.get(User, found.id, with_for_update=True)
    ok = user if matches else None
    if ok is None:
        failures = guard.clients.failed(client)
        audit("login.failed", "user", None, actor=Actor(username[:64] or "?", None, None, client_ip))
        if failures == guard.clients.backoff.free_failures:  # the failure that starts the client's wait
            audit("login.client_throttled", "client", client, actor=Actor("system", None, None, client_ip),
                  failures=failures)
        if user is not None and user.active:
            user.failed_logins, locked = account_failure(user.failed_logins or 0, utcnow(), guard.account)
            if locked is not None:
                user.locked_until = locked
                audit("user.locked", "user", user.id, actor=Actor("system", None, None, client_ip),
                      failures=user.failed_logins, until=locked.isoformat() + "Z")
        return LoginRefused(401, "wrong username or password")
    guard.clients.succeeded(client)
    ok.failed_logins, ok.locked_until = 0, None
    raw, _ = issue_token(s, ok, token_hours)
    audit("login", "user", ok.id, actor=Actor(ok.username, ok.role, ok.id, client_ip))
    return raw, ok


def logout(s: Session, audit: Auditor, token: str, user_id: int) -> None:
    revoke_token(s, token)
    audit("logout", "user", user_id)


# --------------------------------------------------------------------------- studies
def save_uploads(ctx: ServiceContext, uploads: list[tuple[str | None, BinaryIO]]) -> tuple[Path, list[tuple[str, Path]]]:
    """Copy uploaded streams into a private temporary folder: (folder, [(file name, path)])."""
    work = Path(tempfile.mkdtemp(dir=ctx.store.tmp_dir, prefix="upload-"))
    files = []
    for k, (name, stream) in enumerate(uploads):
        dest = work / f"{k:05d}"
        with open(dest, "wb") as out:
            shutil.copyfileobj(stream, out, 1 << 20)
        files.append((Path(name or f"file{k}").name, dest))
    return work, files


def upload_study(ctx: ServiceContext, actor: Actor, uploads: list[tuple[str | None, BinaryIO]], modality: str | None,
                 model: str | None, priority: str | None, accession_number: str | None,
                 description: str | None) -> int:
    """Ingest one study (its own transactions: files are stored before rows); the new study's id."""
    if not uploads:
        raise UploadError("no files in the upload")
    work, files = save_uploads(ctx, uploads)
    try:
        return ingest(ctx, UploadRequest(files, modality or None, model or None, priority or "routine",
                                         accession_number or None, description or None), actor).id
    finally:
        shutil.rmtree(work, ignore_errors=True)


def get_study(s: Session, study_id: int) -> Study:
    st = s.get(Study, study_id)
    if st is None:
        raise LookupError(f"study {study_id} not found")
    return st


def read_study(s: Session, audit: Auditor, w: TriageWeights, study_id: int, include_reviews: bool) -> dict[str, Any]:
    out = study_detail(s, get_study(s, study_id), w, include_reviews=include_reviews)
    audit("study.read", "study", study_id)
    return out


def read_worklist(s: Session, audit: Auditor, w: TriageWeights, modality: str | None, status: str | None,
                  page: int, page_size: int, repeats: RepeatReads | None = None, session_key: str = "") -> dict[str, Any]:
    """One worklist page; audited, except a session's identical read again within ``repeats``' interval
    (the page's 5-s auto-refresh): the same session, view and studies are already on record."""
    out = worklist(s, w, modality, status, page, page_size)
    studies = [i["id"] for i in out["items"]]
    if repeats is None or repeats.due((session_key, "worklist", modality, status, page, tuple(studies))):
        audit("worklist.read", "study", None, modality=modality, status=status, page=page, studies=studies)
    return out


def read_agreement(s: Session, audit: Auditor, model: str | None, period: str) -> dict[str, Any]:
    out = agreement(s, model, period)
    audit("agreement.read", "review", None, model=model)
    return out


# --------------------------------------------------------------------------- users
def list_users(s: Session) -> list[User]:
    return list(s.execute(select(User).order_by(User.username)).scalars())


def add_user(s: Session, audit: Auditor, username: str, password: str, role: str, full_name: str = "") -> User:
    u = create_user(s, username, password, role, full_name)
    audit("user.create", "user", u.id, username=u.username, role=u.role)
    return u


def update_user(s: Session, audit: Auditor, by_user_id: int, user_id: int, active: bool | None = None,
                role: str | None = None) -> User:
    """Change a user's role or active flag (``by_user_id``: the administrator, who may not deactivate themself).

    Everything is checked before anything changes, so a caller that turns the refusal into a page can commit.
    """
    u = s.get(User, user_id)
    if u is None:
        raise LookupError(f"user {user_id} not found")
    if role is not None and role not in ROLES:
        raise UserError(f"role must be one of {', '.join(ROLES)}")
    if active is False and u.id == by_user_id:
        raise UserError("you cannot deactivate yourself")
    keep_an_admin(s, u, role, active)
    if role is not None:
        u.role = role
    if active is not None:
        u.active = active
    audit("user.update", "user", u.id, **{k: v for k, v in (("active", active), ("role", role)) if v is not None})
    return u


def get_user(s: Session, user_id: int) -> User:
    u = s.get(User, user_id)
    if u is None:
        raise LookupError(f"user {user_id} not found")
    return u


def unlock_user(s: Session, audit: Auditor, user_id: int) -> User:
    """Lift a login lock now (the failure count starts again)."""
    u = get_user(s, user_id)
    u.failed_logins, u.locked_until = 0, None
    audit("user.unlock", "user", u.id, username=u.username)
    return u


def reset_password(s: Session, audit: Auditor, user_id: int, password: str) -> User:
    """An administrator sets a user's password: the user's sessions end, a login lock is lifted."""
    u = get_user(s, user_id)
    set_password(s, u, password)
    audit("user.password_reset", "user", u.id, username=u.username)
    return u


def change_own_password(s: Session, audit: Auditor, user_id: int, token: str, old: str, new: str) -> User:
    """The caller's own password, against the old one; their other sessions end, this one stays."""
    u = get_user(s, user_id)
    if not verify_password(old, u.password_hash):
        raise UserError("the current password is wrong")
    set_password(s, u, new, keep_token=token)
    audit("user.password_change", "user", u.id)
    return u


# --------------------------------------------------------------------------- audit trail
def audit_events(s: Session, page: int, page_size: int, actor: str | None = None, object_type: str | None = None,
                 object_id: str | None = None) -> dict[str, Any]:
    """One page of the audit trail, newest first, optionally filtered (not itself audited: see :func:`read_audit`)."""
    q = select(AuditEvent)
    for col, val in ((AuditEvent.actor, actor), (AuditEvent.object_type, object_type), (AuditEvent.object_id, object_id)):
        if val:
            q = q.where(col == val)
    total = s.execute(select(func.count()).select_from(q.subquery())).scalar_one()
    rows = s.execute(q.order_by(AuditEvent.id.desc()).limit(page_size).offset((page - 1) * page_size)).scalars()
    return {"items": [audit_dict(e) for e in rows], "total": total, "page": page, "page_size": page_size}


def read_audit(s: Session, audit: Auditor, page: int, page_size: int, **filters: str | None) -> dict[str, Any]:
    out = audit_events(s, page, page_size, **filters)
    audit("audit.read", "audit", None, page=page)
    return out


def verify_audit(s: Session, audit: Auditor, **detail: Any) -> dict[str, Any]:
    """Recompute the hash chain; every edited or deleted event is reported."""
    rep = verify(s)
    audit("audit.verify", "audit", None, ok=rep.ok, checked=rep.checked, **detail)
    return rep.to_dict()
