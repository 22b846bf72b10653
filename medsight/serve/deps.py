"""FastAPI dependencies: the service context, the request's transaction, who is calling, the role gates, the audit.

One set of gates serves the JSON API and the pages: ``STAFF`` guards an API route,
``STAFF.for_pages`` the page that shows the same thing. The page variant sends a
caller without a session to the login page instead of answering 401, and checks
the form's ``csrf_token`` on every post; the API variant checks ``X-CSRF-Token`` on
cookie-authenticated writes (bearer clients cannot be forged cross-site).

A handler's database work, and the audit event that describes it, share one
transaction (:data:`DbSession`) that commits after the handler returns and before
the response leaves; an exception rolls both back. So a failure that must stay
audited (a wrong password) is *returned* as a response, not raised.
"""

from __future__ import annotations

import hmac
from collections.abc import Iterator
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address, ip_network
from functools import cached_property
from typing import Annotated, Any

from fastapi import Depends, HTTPException, Path, Request
from fastapi.routing import APIRoute
from sqlalchemy.orm import Session

from medsight.serve.audit import Auditor
from medsight.serve.auth import COOKIE, Principal, user_for_token
from medsight.serve.context import ServiceContext
from medsight.serve.db import ROLES
from medsight.serve.schemas import REFUSALS
from medsight.serve.throttle import LoginGuard, RepeatReads

SAFE_METHODS = ("GET", "HEAD", "OPTIONS")


async def get_ctx(request: Request) -> ServiceContext:  # async: nothing to wait for, no thread hop
    return request.app.state.ctx


Ctx = Annotated[ServiceContext, Depends(get_ctx)]


def get_session(ctx: Ctx) -> Iterator[Session]:
    with ctx.db.session() as s:
        yield s


#: ``scope="function"``: the commit happens before the response is sent, so a client
#: never receives data whose audit event then failed to commit.
DbSession = Annotated[Session, Depends(get_session, scope="function")]


def _ip(text: str) -> IPv4Address | IPv6Address | None:
    try:
        return ip_address(text)
    except ValueError:
        return None


def client_ip(request: Request) -> str | None:
    """The caller's address: the peer, or what a configured proxy (``trusted_proxies``) says in
    ``X-Forwarded-For`` (the nearest hop that is not itself a trusted proxy). Anyone else's header is
    ignored: it would let a client pick the address its failed logins and audit events are filed under."""
    peer = request.client.host if request.client else None
    nets = getattr(request.app.state, "trusted_proxies", ())
    trusted = lambda a: a is not None and any(a in n for n in nets)  # noqa: E731
    if peer is None or not trusted(_ip(peer)):
        return peer
    for hop in reversed([h.strip() for h in request.headers.get("x-forwarded-for", "").split(",") if h.strip()]):
        addr = _ip(hop)
        if addr is None:
            return peer
        if not trusted(addr):
            return str(addr)
    return peer


def trusted_networks(entries: list[str]) -> tuple[IPv4Network | IPv6Network, ...]:
    return tuple(ip_network(e, strict=False) for e in entries)


async def get_guard(request: Request) -> LoginGuard:
    return request.app.state.login_guard


async def get_repeats(request: Request) -> RepeatReads:
    return request.app.state.repeat_reads


Guard = Annotated[LoginGuard, Depends(get_guard)]
Repeats = Annotated[RepeatReads, Depends(get_repeats)]

#: Largest id a database row can have (signed 64-bit): a larger one in a path is a 422, not an overflow.
MAX_ID = 2**63 - 1
#: Deepest page a list can be asked for (its offset must fit the database's integer too).
MAX_PAGE = 10**9
Id = Annotated[int, Path(ge=1, le=MAX_ID)]


def credentials(request: Request) -> tuple[str | None, bool]:
    """The session token and whether it came in the cookie (else the bearer header)."""
    header = request.headers.get("authorization", "")
    if header.lower().startswith("bearer "):
        return header[7:].strip() or None, False
    cookie = request.cookies.get(COOKIE)
    return (cookie, True) if cookie else (None, False)


def current_user(request: Request, ctx: Ctx) -> Principal | None:
    """The logged-in caller, or None. Its own short transaction: the token lookup must not hold
    the request's transaction open while a handler runs work that opens its own (an upload)."""
    raw, via_cookie = credentials(request)
    if not raw:
        return None
    with ctx.db.session() as s:
        u = user_for_token(s, raw)
        return None if u is None else Principal(u.id, u.username, u.role, client_ip(request), raw, via_cookie)


CurrentUser = Annotated[Principal | None, Depends(current_user)]


class LoginRequired(Exception):
    """Raised by page gates; the app turns it into a redirect to the login page."""

    def __init__(self, next_url: str):
        self.next_url = next_url


def _same(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode(), b.encode())


class Require:
    """The caller must be logged in with one of ``roles``.

    API: 401 without valid credentials, 403 with a role not in the list or a
    cookie-authenticated write without the CSRF header. Pages (``page=True``): a
    redirect to the login page, 403 for the role, 403 for a post without the form's
    CSRF token. :class:`GatedRoute` lists ``roles`` in the route's OpenAPI entry (``x-roles``).
    """

    def __init__(self, *roles: str, page: bool = False):
        unknown = [r for r in roles if r not in ROLES]
        if unknown or not roles:
            raise ValueError(f"bad roles {roles}")
        self.roles = tuple(roles)
        self.page = page

    @cached_property
    def for_pages(self) -> Require:
        return Require(*self.roles, page=True)

    async def __call__(self, request: Request, user: CurrentUser) -> Principal:
        if user is None:
            if self.page:
                raise LoginRequired(str(request.url.path))
            raise HTTPException(401, "not authenticated: log in and send 'Authorization: Bearer <token>'",
                                headers={"WWW-Authenticate": "Bearer"})
        if user.role not in self.roles:
            raise HTTPException(403, f"role {user.role!r} may not do this; allowed: {', '.join(self.roles)}")
        if request.method not in SAFE_METHODS:
            if self.page:
                form = await request.form()  # parsed once: FastAPI's own form parameters reuse it
                if not _same(str(form.get("csrf_token") or ""), user.csrf):
                    raise HTTPException(403, "invalid CSRF token: reload the page and try again")
            elif user.via_cookie and not _same(request.headers.get("x-csrf-token", ""), user.csrf):
                raise HTTPException(403, "missing or wrong X-CSRF-Token header for a cookie-authenticated request")
        return user


STAFF = Require("radiologist", "technologist", "admin")
CLINICAL = Require("radiologist", "admin")
RADIOLOGIST = Require("radiologist")
UPLOADER = Require("technologist", "radiologist", "admin")
ADMIN = Require("admin")
AUDITOR = Require("auditor")
QUALITY = Require("radiologist", "admin", "auditor")
ANYONE = Require(*ROLES)


def gate_of(route: APIRoute) -> Require | None:
    """The role gate a route's handler depends on."""
    return next((d.call for d in route.dependant.dependencies if isinstance(d.call, Require)), None)


class GatedRoute(APIRoute):
    """An API route whose OpenAPI entry lists the roles its gate really admits (``x-roles``) and the
    refusals it can answer: 401/403 behind a gate, 404 with an id in the path, 422 (one body schema
    for FastAPI's validation and the service's own refusals)."""

    def __init__(self, path: str, endpoint: Any, **kwargs: Any):
        super().__init__(path, endpoint, **kwargs)
        gate = gate_of(self)  # known once the route is built: built again with what it implies
        codes = [422] + ([401, 403] if gate is not None else []) + ([404] if "{" in path else [])
        kwargs["responses"] = {**{c: REFUSALS[c] for c in codes}, **(kwargs.get("responses") or {})}
        if gate is not None:
            kwargs["openapi_extra"] = {**(kwargs.get("openapi_extra") or {}), "x-roles": list(gate.roles)}
        super().__init__(path, endpoint, **kwargs)


async def get_audit(session: DbSession, user: CurrentUser) -> Auditor:
    return Auditor(session, user.actor if user else None)


#: The request's audit recorder: in the request's transaction, on behalf of the caller the gate let in.
Audit = Annotated[Auditor, Depends(get_audit)]
