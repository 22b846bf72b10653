"""Users, roles, password hashing (argon2 via pwdlib) and token/session authentication.

One credential type serves both the API and the web pages: a random token
issued at login, sent as ``Authorization: Bearer <token>`` by API clients and
as an HttpOnly, SameSite=Strict cookie by the browser. The database stores only
the token's SHA-256. Pages posting forms with the cookie also send a CSRF
token derived from the session token (a cross-site page cannot read it).

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

from fastapi import HTTPException, Request
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
    if len(password) < MIN_PASSWORD:
        raise UserError(f"password must be at least {MIN_PASSWORD} characters")
    if password.lower() == username or password.lower() in ("password", "medsight"):
        raise UserError("password is too easy to guess")
    if session.execute(select(User.id).where(User.username == username)).first():
        raise UserError(f"user {username!r} already exists")
    user = User(username=username, password_hash=hash_password(password), role=role, full_name=full_name.strip())
    session.add(user)
    session.flush()
    return user


def authenticate(session: Session, username: str, password: str) -> User | None:
    user = session.execute(select(User).where(User.username == username.strip().lower())).scalar_one_or_none()
    if user is None or not user.active:
        verify_password(password, _DUMMY_HASH)
        return None
    return user if verify_password(password, user.password_hash) else None


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


class LoginRequired(Exception):
    """Raised by page dependencies; the app turns it into a redirect to the login page."""

    def __init__(self, next_url: str):
        self.next_url = next_url


def client_ip(request: Request) -> str | None:
    return request.client.host if request.client else None


def credentials(request: Request) -> tuple[str | None, bool]:
    header = request.headers.get("authorization", "")
    if header.lower().startswith("bearer "):
        return header[7:].strip() or None, False
    cookie = request.cookies.get(COOKIE)
    return (cookie, True) if cookie else (None, False)


class Require:
    """FastAPI dependency: the caller must be logged in with one of ``roles``.

    401 without valid credentials, 403 with a role not in the list. ``openapi``
    puts the allowed roles in the route's OpenAPI entry (``x-roles``), which both
    documents them and lets the test suite check every route.
    """

    def __init__(self, *roles: str, page: bool = False):
        unknown = [r for r in roles if r not in ROLES]
        if unknown or not roles:
            raise ValueError(f"bad roles {roles}")
        self.roles = tuple(roles)
        self.page = page

    @property
    def openapi(self) -> dict:
        return {"x-roles": list(self.roles)}

    def __call__(self, request: Request) -> Principal:
        raw, via_cookie = credentials(request)
        user = None
        if raw:
            with request.app.state.ctx.db.session() as s:
                u = user_for_token(s, raw)
                user = (u.id, u.username, u.role) if u else None
        if user is None:
            if self.page:
                raise LoginRequired(str(request.url.path))
            raise HTTPException(401, "not authenticated: log in and send 'Authorization: Bearer <token>'",
                                headers={"WWW-Authenticate": "Bearer"})
        principal = Principal(user[0], user[1], user[2], client_ip(request), raw, via_cookie)
        if principal.role not in self.roles:
            raise HTTPException(403, f"role {principal.role!r} may not do this; allowed: {', '.join(self.roles)}")
        if (via_cookie and not self.page and request.method not in ("GET", "HEAD", "OPTIONS")
                and not hmac.compare_digest(request.headers.get("x-csrf-token", ""), principal.csrf)):
            raise HTTPException(403, "missing or wrong X-CSRF-Token header for a cookie-authenticated request")
        return principal


ANY_ROLE = ROLES
