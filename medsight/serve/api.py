"""FastAPI application factory: ``create_app(settings)`` builds a complete, isolated service.

Collaborators (database, file store, model catalog, job queue) live in one
:class:`~medsight.serve.context.ServiceContext` on ``app.state.ctx`` and reach the
handlers through dependencies, so tests can run several apps side by side.
Errors the library raises on purpose become specific 4xx answers here.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, File, Form, HTTPException, Query, Request, UploadFile
from fastapi.responses import JSONResponse, RedirectResponse, Response
from pydantic import BaseModel, Field
from sqlalchemy import func, select
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from medsight._version import __version__
from medsight.errors import (
    DuplicateStudyError,
    ImageReadError,
    ImageTooLargeError,
    MedSightError,
    UnknownModelError,
    UnsupportedModalityError,
    UploadError,
    UploadTooLargeError,
)
from medsight.serve import audit as audit_log
from medsight.serve.analysis import display_png
from medsight.serve.auth import (
    COOKIE,
    LoginRequired,
    Principal,
    Require,
    UserError,
    authenticate,
    client_ip,
    create_user,
    issue_token,
    revoke_token,
)
from medsight.serve.catalog import card_modalities, finding_labels
from medsight.serve.config import ServiceSettings
from medsight.serve.context import ServiceContext
from medsight.serve.db import ROLES, AuditEvent, Instance, Job, Result, Review, Study, User
from medsight.serve.ingest import UploadRequest, ingest
from medsight.serve.reviewed_report import submit_review
from medsight.serve.reviews import ReviewError, agreement, review_dict
from medsight.serve.views import study_detail
from medsight.serve.worklist import worklist

STAFF = Require("radiologist", "technologist", "admin")
CLINICAL = Require("radiologist", "admin")
RADIOLOGIST = Require("radiologist")
UPLOADER = Require("technologist", "radiologist", "admin")
ADMIN = Require("admin")
AUDITOR = Require("auditor")
QUALITY = Require("radiologist", "admin", "auditor")
ANYONE = Require(*ROLES)
UPLOAD_PATHS = ("/api/studies", "/upload")


def get_ctx(request: Request) -> ServiceContext:
    return request.app.state.ctx


Ctx = Annotated[ServiceContext, Depends(get_ctx)]


# --------------------------------------------------------------------------- error mapping
def _error(status: int, e: Exception, **extra: Any) -> JSONResponse:
    return JSONResponse({"detail": str(e), "error": type(e).__name__, **extra}, status_code=status)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(MedSightError)
    async def _medsight(_req: Request, e: MedSightError) -> Response:
        if isinstance(e, (UploadTooLargeError, ImageTooLargeError)):
            return _error(413, e)
        if isinstance(e, DuplicateStudyError):
            return _error(409, e, study_id=e.study_id)
        if isinstance(e, UnknownModelError):
            return _error(404, e, available=e.available)
        if isinstance(e, ImageReadError):
            return _error(422, e, reason=e.reason)
        if isinstance(e, (UnsupportedModalityError, UploadError, ReviewError, UserError)):
            return _error(422, e)
        return _error(422, e)

    @app.exception_handler(LookupError)
    async def _missing(_req: Request, e: LookupError) -> Response:
        return _error(404, e)

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


# --------------------------------------------------------------------------- request bodies
class LoginBody(BaseModel):
    username: str
    password: str


class UserBody(BaseModel):
    username: str
    password: str = Field(min_length=1)
    role: str
    full_name: str = ""


class UserPatch(BaseModel):
    active: bool | None = None
    role: str | None = None


class ReviewBody(BaseModel):
    label: str | None = Field(default=None, description="the reviewer's label for the image (single-label models)")
    findings: dict[str, bool] | None = Field(default=None, description="per finding: present? (multilabel models)")
    note: str = ""
    result_id: int | None = Field(default=None, description="which image's result; default: the study's key image")


# --------------------------------------------------------------------------- helpers
def save_uploads(ctx: ServiceContext, uploads: list[UploadFile]) -> tuple[Path, list[tuple[str, Path]]]:
    work = Path(tempfile.mkdtemp(dir=ctx.store.tmp_dir, prefix="upload-"))
    files = []
    for k, up in enumerate(uploads):
        dest = work / f"{k:05d}"
        with open(dest, "wb") as out:
            shutil.copyfileobj(up.file, out, 1 << 20)
        files.append((Path(up.filename or f"file{k}").name, dest))
    return work, files


def do_upload(ctx: ServiceContext, p: Principal, uploads: list[UploadFile], modality: str | None, model: str | None,
              priority: str | None, accession_number: str | None, description: str | None) -> Study:
    if not uploads:
        raise UploadError("no files in the upload")
    work, files = save_uploads(ctx, uploads)
    try:
        return ingest(ctx, UploadRequest(files, modality or None, model or None, priority or "routine",
                                         accession_number or None, description or None), p.actor)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def get_study(s: Any, study_id: int) -> Study:
    st = s.get(Study, study_id)
    if st is None:
        raise LookupError(f"study {study_id} not found")
    return st


def png(data: bytes) -> Response:
    return Response(data, media_type="image/png", headers={"Cache-Control": "private, max-age=3600"})


def user_dict(u: User) -> dict[str, Any]:
    return {"id": u.id, "username": u.username, "role": u.role, "full_name": u.full_name, "active": u.active,
            "created_at": u.created_at.isoformat() + "Z"}


def login(ctx: ServiceContext, request: Request, username: str, password: str) -> tuple[str, User] | None:
    with ctx.db.session() as s:
        user = authenticate(s, username, password)
        ip = client_ip(request)
        if user is None:
            audit_log.record(s, audit_log.Actor(username[:64] or "?", None, None, ip), "login.failed", "user", None)
            return None
        raw, _ = issue_token(s, user, ctx.settings.token_hours)
        audit_log.record(s, audit_log.Actor(user.username, user.role, user.id, ip), "login", "user", user.id)
        s.expunge(user)
        return raw, user


# --------------------------------------------------------------------------- routes
def api_router() -> APIRouter:
    r = APIRouter()

    @r.get("/health", tags=["service"])
    def health(ctx: Ctx) -> dict[str, Any]:
        """Liveness and readiness: database reachable, job queue depth. No authentication."""
        with ctx.db.session() as s:
            counts = dict(s.execute(select(Job.status, func.count()).group_by(Job.status)).all())
        return {"status": "ok", "version": __version__, "database": ctx.db.dialect,
                "jobs": {k: counts.get(k, 0) for k in ("queued", "running", "done", "failed")}}

    # -- auth ---------------------------------------------------------------
    @r.post("/api/auth/login", tags=["auth"])
    def api_login(body: LoginBody, request: Request, ctx: Ctx) -> dict[str, Any]:
        """Exchange username and password for a bearer token."""
        got = login(ctx, request, body.username, body.password)
        if got is None:
            raise HTTPException(401, "wrong username or password", headers={"WWW-Authenticate": "Bearer"})
        raw, user = got
        return {"token": raw, "token_type": "bearer", "expires_in_s": int(ctx.settings.token_hours * 3600),
                "user": user_dict(user)}

    @r.post("/api/auth/logout", tags=["auth"], openapi_extra=ANYONE.openapi)
    def api_logout(ctx: Ctx, p: Annotated[Principal, Depends(ANYONE)]) -> dict[str, str]:
        with ctx.db.session() as s:
            revoke_token(s, p.token)
            audit_log.record(s, p.actor, "logout", "user", p.user_id)
        return {"status": "logged out"}

    @r.get("/api/auth/me", tags=["auth"], openapi_extra=ANYONE.openapi)
    def me(p: Annotated[Principal, Depends(ANYONE)]) -> dict[str, Any]:
        return {"id": p.user_id, "username": p.username, "role": p.role}

    # -- models -------------------------------------------------------------
    @r.get("/api/models", tags=["models"], openapi_extra=ANYONE.openapi)
    def models(ctx: Ctx, _p: Annotated[Principal, Depends(ANYONE)]) -> list[dict[str, Any]]:
        """Installed models: which modalities each reads, its labels and critical findings."""
        return [{"name": c.name, "version": c.version, "modality": c.modality, "modalities": sorted(card_modalities(c)),
                 "task": c.task, "labels": c.labels, "findings": finding_labels(c),
                 "critical_findings": c.critical_findings, "body_part": c.body_part} for c in ctx.catalog.cards()]

    # -- studies ------------------------------------------------------------
    @r.post("/api/studies", tags=["studies"], status_code=202, openapi_extra=UPLOADER.openapi)
    def upload(ctx: Ctx, p: Annotated[Principal, Depends(UPLOADER)], response: Response,
               files: Annotated[list[UploadFile], File(description="DICOM file(s) of one study, a zip of them, or PNG/JPEG")],
               modality: Annotated[str | None, Form(description="required for PNG/JPEG: DICOM modality code, e.g. CR")] = None,
               model: Annotated[str | None, Form(description="model name; default: chosen by modality")] = None,
               priority: Annotated[str, Form(description="routine | urgent | stat")] = "routine",
               accession_number: Annotated[str | None, Form()] = None,
               description: Annotated[str | None, Form()] = None) -> dict[str, Any]:
        """Accept one study. 202: stored and queued for analysis (never lost from here on)."""
        st = do_upload(ctx, p, files, modality, model, priority, accession_number, description)
        response.headers["Location"] = f"/api/studies/{st.id}"
        with ctx.db.session() as s:
            return study_detail(s, get_study(s, st.id), ctx.settings.triage, include_reviews=False)

    @r.get("/api/worklist", tags=["studies"], openapi_extra=STAFF.openapi)
    def api_worklist(ctx: Ctx, p: Annotated[Principal, Depends(STAFF)],
                     modality: str | None = None,
                     status: Annotated[str | None, Query(description="open | all | comma list of statuses")] = "open",
                     page: Annotated[int, Query(ge=1)] = 1,
                     page_size: Annotated[int, Query(ge=1, le=500)] = 50) -> dict[str, Any]:
        """Studies ordered by triage priority (most urgent first)."""
        try:
            with ctx.db.session() as s:
                out = worklist(s, ctx.settings.triage, modality, status, page, page_size)
                audit_log.record(s, p.actor, "worklist.read", "study", None, modality=modality, status=status,
                                 page=page, studies=[i["id"] for i in out["items"]])
        except ValueError as e:
            raise HTTPException(422, str(e)) from None
        return out

    @r.get("/api/studies/{study_id}", tags=["studies"], openapi_extra=STAFF.openapi)
    def get_study_api(study_id: int, ctx: Ctx, p: Annotated[Principal, Depends(STAFF)]) -> dict[str, Any]:
        with ctx.db.session() as s:
            out = study_detail(s, get_study(s, study_id), ctx.settings.triage, include_reviews=p.role != "technologist")
            audit_log.record(s, p.actor, "study.read", "study", study_id)
        return out

    @r.get("/api/instances/{instance_id}/image.png", tags=["images"], openapi_extra=STAFF.openapi)
    def instance_image(instance_id: int, ctx: Ctx, p: Annotated[Principal, Depends(STAFF)]) -> Response:
        """The image as displayed (rendered from the stored file with the core reader)."""
        from medsight.io.readers import read_image

        with ctx.db.session() as s:
            inst = s.get(Instance, instance_id)
            if inst is None:
                raise LookupError(f"instance {instance_id} not found")
            sha, study_id = inst.file_sha256, inst.study_id
            rendered = s.execute(select(Result.display_sha256).where(Result.instance_id == instance_id)
                                 .order_by(Result.id.desc()).limit(1)).scalar_one_or_none()
            audit_log.record(s, p.actor, "image.read", "study", study_id, instance=instance_id)
        if rendered:  # the worker already rendered it: no second decode of a large DICOM
            return png(ctx.store.read_bytes(rendered))
        return png(display_png(read_image(ctx.store.path_for(sha))))

    def _result_png(result_id: int, ctx: ServiceContext, p: Principal, which: str) -> Response:
        with ctx.db.session() as s:
            res = s.get(Result, result_id)
            if res is None:
                raise LookupError(f"result {result_id} not found")
            sha = {"image": res.display_sha256, "overlay": res.overlay_sha256, "heatmap": res.heatmap_sha256}[which]
            if sha is None:
                raise LookupError(f"result {result_id} has no {which}")
            audit_log.record(s, p.actor, f"result.{which}.read", "result", result_id, study=res.study_id)
        return png(ctx.store.read_bytes(sha))

    @r.get("/api/results/{result_id}/image.png", tags=["images"], openapi_extra=STAFF.openapi)
    def result_image(result_id: int, ctx: Ctx, p: Annotated[Principal, Depends(STAFF)]) -> Response:
        return _result_png(result_id, ctx, p, "image")

    @r.get("/api/results/{result_id}/overlay.png", tags=["images"], openapi_extra=CLINICAL.openapi)
    def result_overlay(result_id: int, ctx: Ctx, p: Annotated[Principal, Depends(CLINICAL)]) -> Response:
        """Grad-CAM heat map blended over the image (full strength: pages set the opacity)."""
        return _result_png(result_id, ctx, p, "overlay")

    @r.get("/api/results/{result_id}/heatmap.png", tags=["images"], openapi_extra=CLINICAL.openapi)
    def result_heatmap(result_id: int, ctx: Ctx, p: Annotated[Principal, Depends(CLINICAL)]) -> Response:
        """The bare heat map, 8-bit gray, at the image's resolution."""
        return _result_png(result_id, ctx, p, "heatmap")

    # -- reviews ------------------------------------------------------------
    @r.post("/api/studies/{study_id}/reviews", tags=["reviews"], status_code=201, openapi_extra=RADIOLOGIST.openapi)
    def post_review(study_id: int, body: ReviewBody, ctx: Ctx, p: Annotated[Principal, Depends(RADIOLOGIST)]) -> dict[str, Any]:
        """Confirm or correct the model's findings. A later review never replaces an earlier one."""
        with ctx.db.session() as s:
            rev = submit_review(ctx, s, study_id, p.actor, body.label, body.findings, body.note, body.result_id)
            return review_dict(rev)

    @r.get("/api/studies/{study_id}/reviews", tags=["reviews"], openapi_extra=CLINICAL.openapi)
    def get_reviews(study_id: int, ctx: Ctx, p: Annotated[Principal, Depends(CLINICAL)]) -> list[dict[str, Any]]:
        with ctx.db.session() as s:
            get_study(s, study_id)
            rows = s.execute(select(Review).where(Review.study_id == study_id).order_by(Review.id)).scalars().all()
            audit_log.record(s, p.actor, "review.read", "study", study_id, reviews=[r.id for r in rows])
            return [review_dict(r) for r in rows]

    @r.get("/api/agreement", tags=["reviews"], openapi_extra=QUALITY.openapi)
    def get_agreement(ctx: Ctx, p: Annotated[Principal, Depends(QUALITY)], model: str | None = None,
                      period: Annotated[str, Query(pattern="^(day|week|month)$")] = "week") -> dict[str, Any]:
        """Per model and finding: sensitivity and specificity of the model against reviewers, overall and over time."""
        with ctx.db.session() as s:
            out = agreement(s, model, period)
            audit_log.record(s, p.actor, "agreement.read", "review", None, model=model)
        return out

    # -- queue ----------------------------------------------------------------
    @r.get("/api/jobs", tags=["service"], openapi_extra=UPLOADER.openapi)
    def jobs(ctx: Ctx, _p: Annotated[Principal, Depends(UPLOADER)], status: str | None = None,
             limit: Annotated[int, Query(ge=1, le=500)] = 50) -> list[dict[str, Any]]:
        """Recent background jobs (analysis, notifications, result deliveries) with attempts and errors."""
        with ctx.db.session() as s:
            q = select(Job).order_by(Job.id.desc()).limit(limit)
            if status:
                q = q.where(Job.status == status)
            return [{"id": j.id, "kind": j.kind, "study_id": j.study_id, "status": j.status, "attempts": j.attempts,
                     "channel": (j.payload or {}).get("channel"),
                     "owner": j.lease_owner, "finished_by": j.finished_by, "last_error": j.last_error,
                     "created_at": j.created_at.isoformat() + "Z"} for j in s.execute(q).scalars()]

    @r.post("/api/jobs/{job_id}/retry", tags=["service"], openapi_extra=ADMIN.openapi)
    def retry_job(job_id: int, ctx: Ctx, p: Annotated[Principal, Depends(ADMIN)]) -> dict[str, Any]:
        """Send a failed delivery (PACS, FHIR, HL7, webhook) again, e.g. after its receiver was fixed."""
        with ctx.db.session() as s:
            job = ctx.queue.requeue(s, job_id)
            audit_log.record(s, p.actor, "job.retry", "job", job.id, kind=job.kind, study=job.study_id,
                             channel=(job.payload or {}).get("channel"))
            return {"id": job.id, "kind": job.kind, "status": job.status, "attempts": job.attempts,
                    "max_attempts": job.max_attempts}

    # -- users ----------------------------------------------------------------
    @r.get("/api/users", tags=["users"], openapi_extra=ADMIN.openapi)
    def list_users(ctx: Ctx, _p: Annotated[Principal, Depends(ADMIN)]) -> list[dict[str, Any]]:
        with ctx.db.session() as s:
            return [user_dict(u) for u in s.execute(select(User).order_by(User.username)).scalars()]

    @r.post("/api/users", tags=["users"], status_code=201, openapi_extra=ADMIN.openapi)
    def add_user(body: UserBody, ctx: Ctx, p: Annotated[Principal, Depends(ADMIN)]) -> dict[str, Any]:
        with ctx.db.session() as s:
            u = create_user(s, body.username, body.password, body.role, body.full_name)
            audit_log.record(s, p.actor, "user.create", "user", u.id, username=u.username, role=u.role)
            return user_dict(u)

    @r.patch("/api/users/{user_id}", tags=["users"], openapi_extra=ADMIN.openapi)
    def patch_user(user_id: int, body: UserPatch, ctx: Ctx, p: Annotated[Principal, Depends(ADMIN)]) -> dict[str, Any]:
        with ctx.db.session() as s:
            u = s.get(User, user_id)
            if u is None:
                raise LookupError(f"user {user_id} not found")
            if body.role is not None:
                if body.role not in ROLES:
                    raise UserError(f"role must be one of {', '.join(ROLES)}")
                u.role = body.role
            if body.active is not None:
                if u.id == p.user_id and not body.active:
                    raise UserError("you cannot deactivate yourself")
                u.active = body.active
            audit_log.record(s, p.actor, "user.update", "user", u.id, **body.model_dump(exclude_none=True))
            return user_dict(u)

    # -- audit ----------------------------------------------------------------
    @r.get("/api/audit", tags=["audit"], openapi_extra=AUDITOR.openapi)
    def audit_events(ctx: Ctx, p: Annotated[Principal, Depends(AUDITOR)], actor: str | None = None,
                     object_type: str | None = None, object_id: str | None = None,
                     page: Annotated[int, Query(ge=1)] = 1, page_size: Annotated[int, Query(ge=1, le=500)] = 100) -> dict[str, Any]:
        """The audit trail, newest first."""
        with ctx.db.session() as s:
            q = select(AuditEvent)
            for col, val in ((AuditEvent.actor, actor), (AuditEvent.object_type, object_type), (AuditEvent.object_id, object_id)):
                if val:
                    q = q.where(col == val)
            total = s.execute(select(func.count()).select_from(q.subquery())).scalar_one()
            rows = s.execute(q.order_by(AuditEvent.id.desc()).limit(page_size).offset((page - 1) * page_size)).scalars().all()
            items = [audit_dict(e) for e in rows]
            audit_log.record(s, p.actor, "audit.read", "audit", None, page=page)
        return {"items": items, "total": total, "page": page, "page_size": page_size}

    @r.get("/api/audit/verify", tags=["audit"], openapi_extra=AUDITOR.openapi)
    def audit_verify(ctx: Ctx, p: Annotated[Principal, Depends(AUDITOR)]) -> dict[str, Any]:
        """Recompute the hash chain: any edited or deleted event is reported."""
        with ctx.db.session() as s:
            rep = audit_log.verify(s)
        with ctx.db.session() as s:
            audit_log.record(s, p.actor, "audit.verify", "audit", None, ok=rep.ok, checked=rep.checked)
        return rep.to_dict()

    return r


def audit_dict(e: AuditEvent) -> dict[str, Any]:
    return {"id": e.id, "ts": e.ts.isoformat() + "Z", "actor": e.actor, "role": e.role, "action": e.action,
            "object_type": e.object_type, "object_id": e.object_id, "client_ip": e.client_ip, "detail": e.detail,
            "hash": e.hash}


def create_app(settings: ServiceSettings | None = None, ctx: ServiceContext | None = None) -> FastAPI:
    """A complete service for ``settings`` (default: from ``MEDSIGHT_*`` environment variables)."""
    from contextlib import asynccontextmanager

    from fastapi.staticfiles import StaticFiles

    from medsight.serve.web import STATIC_DIR, web_router

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
    install_error_handlers(app)
    app.add_middleware(BodyLimit, limit=settings.max_upload_bytes + 64 * 1024, paths=UPLOAD_PATHS)
    app.include_router(api_router())
    app.include_router(web_router())
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    return app


__all__ = ["create_app", "COOKIE"]
