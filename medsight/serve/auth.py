"""Users, roles, password hashing (argon2 via pwdlib) and token/session authentication.

One credential type serves both the API and the web pages: a random token
issued at login, sent as ``Authorization: Bearer <token>`` by API clients and
as an HttpOnly, SameSite=Strict cookie by the browser. The database stores only
the token's SHA-256. Pages posting forms with the cookie also send a CSRF
token derived from the session token (a cross-site page cannot read it).
The FastAPI side (reading credentials, role gates) is :mod:`medsight.serve.deps`.

Roles and what they may do:

* ``admin``: users; studies and results (IT/PACS administration),
* ``radiologist``: worklist, studies, results, reviews, agreement,
* ``technologist``: upload, worklist and study status,
* ``auditor``: audit log, agreement; no access to images.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass
from datetime import timedelta

from pwdlib import PasswordHash
from sqlalchemy import select
from sqlalchemy.orm import Session

from medsight.errors import MedSightError
from medsight.serve.audit import Actor
from medsight.serve.db import ROLES, ApiToken, User, utcnow

COOKIE = "medsight_session"
MIN_PASSWORD = 10
_USERNAME = re.compile(r"^[a-z0-9][a-z0-9._-]{1,62}$")
_hasher = PasswordHash.recommended()  # argon2id with the library's current recommended parameters
_DUMMY_HASH = _hasher.hash(secrets.token_hex(16))  # equalises timing for unknown usernames


class UserError(MedSightError):
    """Invalid user data: bad username, weak password, unknown role, duplicate name."""


class LastAdminError(UserError):
    """The change would leave no active administrator (nobody could manage users any more): 409."""


def check_password(username: str, password: str) -> None:
    if len(password) < MIN_PASSWORD:
        raise UserError(f"password must be at least {MIN_PASSWORD} characters")
    if password.lower() == username or password.lower() in ("password", "medsight"):
        raise UserError("password is too easy to guess")


def keep_an_admin(session: Session, user: User, role: str | None = None, active: bool | None = None) -> None:
    """Refuse a change of ``user`` that would leave no active admin (the admin rows are locked on PostgreSQL,
    so two admins demoting each other at once cannot both succeed; SQLite serialises every write)."""
    stays = (role or user.role) == "admin" and (user.active if active is None else active)
    if user.role != "admin" or not user.active or stays:
        return
    admins = session.execute(select(User.id).where(User.role == "admin", User.active.is_(True))
                             .with_for_update()).scalars().all()
    if not [i for i in admins if i != user.id]:
        raise LastAdminError(f"{user.username!r} is the last active administrator: "
                             "make another user an admin first")


def hash_password(password: str) -> str:
    return _hasher.hash(password)


def verify_password(password: str, password_hash: str) -> bool:
    return _hasher.verify(password, password_hash)


def create_user(session: Session, username: str, password: str, role: str, full_name: str = "") -> User:
    username = username.strip().lower()
    if not _USERNAME.match(username):
        raise UserError("username must be 2-63 characters: lower-case letters, digits, '.', '_' or '-'")
    if role not in ROLES:
        raise UserError(f"role must be one of {', '.join(ROLES)}, not {role!r}")
    check_password(username, password)
    if session.execute(select(User.id).where(User.username == username)).first():
        raise UserError(f"user {username!r} already exists")
    user = User(username=username, password_hash=hash_password(password), role=role, full_name=full_name.strip())
    session.add(user)
    session.flush()
    return user


def find_user(session: Session, username: str) -> User | None:
    return session.execute(select(User).where(User.username == username.strip().lower())).scalar_one_or_none()


def password_matches(user: User | None, password: str) -> bool:
    """Is ``user`` active and this its password? An unknown user costs the same hash (no timing oracle)."""
    if user is None or not user.active:
        verify_password(password, _DUMMY_HASH)
        return False
    return verify_password(password, user.password_hash)


def set_password(session: Session, user: User, password: str, keep_token: str | None = None) -> None:
    """New password; every session of the user ends except ``keep_token``'s (the one that changed it)."""
    check_password(user.username, password)
    user.password_hash = hash_password(password)
    user.failed_logins, user.locked_until = 0, None
    keep = token_sha(keep_token) if keep_token else None
    for tok in session.execute(select(ApiToken).where(ApiToken.user_id == user.id, ApiToken.revoked.is_(False))).scalars():
        if tok.token_sha256 != keep:
            tok.revoked = True


def token_sha(raw: str) -> str:
    return hashlib.sha256(raw.encode()).hexdigest()


def issue_token(session: Session, user: User, hours: float) -> tuple[str, ApiToken]:
    raw = secrets.token_urlsafe(32)
    tok = ApiToken(token_sha256=token_sha(raw), user_id=user.id, expires_at=utcnow() + timedelta(hours=hours))
    session.add(tok)
    session.flush()
    return raw, tok


def user_for_token(session: Session, raw: str) -> User | None:
    tok = session.execute(select(ApiToken).where(ApiToken.token_sha256 == token_sha(raw))).scalar_one_or_none()
    if tok is None or tok.revoked or tok.expires_at <= utcnow() or not tok.user.active:
        return None
    return tok.user


def revoke_token(session: Session, raw: str) -> None:
    tok = session.execute(select(ApiToken).where(ApiToken.token_sha256 == token_sha(raw))).scalar_one_or_none()
    if tok is not None:
        tok.revoked = True


def csrf_token(raw: str) -> str:
    return hmac.new(raw.encode(), b"medsight-csrf", hashlib.sha256).hexdigest()[:40]


@dataclass(frozen=True)
class Principal:
    """The authenticated caller of one request."""

    user_id: int
    username: str
    role: str
    client_ip: str | None
    token: str
    via_cookie: bool

    @property
    def actor(self) -> Actor:
        return Actor(self.username, self.role, self.user_id, self.client_ip)

    @property
    def csrf(self) -> str:
        return csrf_token(self.token)
