"""FastAPI application factory: ``create_app(settings)`` builds a complete, isolated service.

Collaborators (database, file store, model catalog, job queue) live in one
:class:`~medsight.serve.context.ServiceContext` on ``app.state.ctx`` and reach the
handlers through :mod:`medsight.serve.deps`, so tests can run several apps side by
side. This module is also the one place where errors the library raises on purpose
become HTTP statuses, and where uploads are held to their size limit.
"""

from __future__ import annotations

import time
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from medsight._version import __version__
from medsight.errors import (
    DuplicateStudyError,
    ImageReadError,
    ImageTooLargeError,
    MedSightError,
    UnknownModelError,
    UploadTooLargeError,
)
from medsight.serve import pages
from medsight.serve.config import ServiceSettings
from medsight.serve.context import ServiceContext
from medsight.serve.auth import LastAdminError
from medsight.serve.deps import LoginRequired, trusted_networks
from medsight.serve.routes import ROUTERS
from medsight.serve.throttle import LoginGuard, RepeatReads

UPLOAD_PATHS = ("/api/studies", "/upload")


# --------------------------------------------------------------------------- error mapping
def _error(status: int, e: Exception, **extra: Any) -> JSONResponse:
    return JSONResponse({"detail": str(e), "error": type(e).__name__, **extra}, status_code=status)


def error_response(e: MedSightError) -> JSONResponse:
    """A refused request's answer: 4xx with the message, the error's class name and what a client can act on."""
    if isinstance(e, (UploadTooLargeError, ImageTooLargeError)):
        return _error(413, e)
    if isinstance(e, DuplicateStudyError):
        return _error(409, e, study_id=e.study_id)
    if isinstance(e, LastAdminError):
        return _error(409, e)
    if isinstance(e, UnknownModelError):
        return _error(404, e, available=e.available)
    if isinstance(e, ImageReadError):
        return _error(422, e, reason=e.reason)
    return _error(422, e)  # bad input of any other kind: modality, review, user, worklist filter...


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(MedSightError)
    async def _medsight(_req: Request, e: MedSightError) -> Response:
        return error_response(e)

    @app.exception_handler(LookupError)
    async def _missing(_req: Request, e: LookupError) -> Response:
        return _error(404, e)

    @app.exception_handler(OverflowError)
    async def _too_large_number(_req: Request, e: OverflowError) -> Response:
        return _error(404, LookupError(f"no such object (a number out of range: {e})"))  # no row has such an id

    @app.exception_handler(LoginRequired)
    async def _login(_req: Request, e: LoginRequired) -> Response:
        return RedirectResponse(f"/login?next={e.next_url}", status_code=303)


# --------------------------------------------------------------------------- upload size limit
class BodyLimit:
    """Refuse oversize uploads with 413 before (Content-Length) or while (streamed) reading them.

    Enforced at the ASGI layer because by the time a handler sees an ``UploadFile``
    the whole body has already been spooled to disk.
    """

    def __init__(self, app: ASGIApp, limit: int, paths: tuple[str, ...]):
        self.app, self.limit, self.paths = app, limit, paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] not in self.paths:
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            resp = JSONResponse({"detail": f"upload of {int(declared)} bytes exceeds the {self.limit}-byte limit",
                                 "error": "UploadTooLargeError"}, status_code=413)
            await resp(scope, receive, send)
            return
        seen = 0

        async def limited() -> dict:
            nonlocal seen
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > self.limit:
                    raise StarletteHTTPException(413, f"upload exceeds the {self.limit}-byte limit")
            return msg

        await self.app(scope, limited, send)


# --------------------------------------------------------------------------- HTTP hygiene
#: The pages load only their own script and style sheet; ``style-src-attr`` admits the inline ``style``
#: attributes that size bars and set the heat map's opacity; no page may be framed (clickjacking).
CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; style-src-attr 'unsafe-inline'; "
       "img-src 'self' data: blob:; object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'")
#: FastAPI's interactive docs load Swagger UI / ReDoc from their CDN with an inline bootstrap script.
DOCS_CSP = ("default-src 'self'; script-src 'self' 'unsafe-inline' https://cdn.jsdelivr.net; "
            "style-src 'self' 'unsafe-inline' https://cdn.jsdelivr.net https://fonts.googleapis.com; "
            "img-src 'self' data: https://fastapi.tiangolo.com; font-src https://fonts.gstatic.com; frame-ancestors 'none'")
DOCS_PATHS = ("/docs", "/redoc")
SECURITY_HEADERS = ((b"x-frame-options", b"DENY"), (b"x-content-type-options", b"nosniff"),
                    (b"referrer-policy", b"no-referrer"), (b"cross-origin-opener-policy", b"same-origin"))


class SecurityHeaders:
    """Security headers on every response, and ``Cache-Control: no-store`` on all but the static files:
    pages, API answers and patient images must not stay in a shared workstation's browser cache."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        csp = (DOCS_CSP if path.startswith(DOCS_PATHS) else CSP).encode()
        cacheable = path.startswith("/static/")

        async def send_with_headers(msg: dict) -> None:
            if msg["type"] == "http.response.start":
                headers = [(k, v) for k, v in msg.get("headers", []) if cacheable or k.lower() != b"cache-control"]
                headers += [*SECURITY_HEADERS, (b"content-security-policy", csp)]
                if not cacheable:
                    headers += [(b"cache-control", b"no-store"), (b"pragma", b"no-cache")]
                msg = {**msg, "headers": headers}
            await send(msg)

        await self.app(scope, receive, send_with_headers)


# --------------------------------------------------------------------------- the app
def create_app(settings: ServiceSettings | None = None, ctx: ServiceContext | None = None) -> FastAPI:
    """A complete service for ``settings`` (default: from ``MEDSIGHT_*`` environment variables)."""
    settings = settings or ServiceSettings.from_env()
    ctx = ctx or ServiceContext.build(settings)

    @asynccontextmanager
    async def lifespan(_app: FastAPI):  # noqa: ANN202
        yield
        ctx.close()

    app = FastAPI(title="MedSight clinical service", version=__version__, lifespan=lifespan,
                  description="Upload studies, triage worklist, human review and audit. "
                              "Every endpoint except /health and /api/auth/login needs a bearer token; "
                              "`x-roles` on each operation lists the roles allowed.")
    app.state.ctx = ctx
    app.state.started = time.time()
    app.state.login_guard = LoginGuard.from_settings(settings)  # per process: the account lock is on the user row
    app.state.repeat_reads = RepeatReads(settings.audit_repeat_read_s)
    app.state.trusted_proxies = trusted_networks(settings.trusted_proxies)
    install_error_handlers(app)
    app.add_middleware(BodyLimit, limit=settings.max_upload_bytes + 64 * 1024, paths=UPLOAD_PATHS)
    app.add_middleware(SecurityHeaders)  # added last: outermost, so refusals of the other layers get them too
    for router in ROUTERS:
        app.include_router(router)
    app.include_router(pages.router)
    app.mount("/static", StaticFiles(directory=pages.STATIC_DIR), name="static")
    return app
