"""Server-rendered pages (Jinja2) for radiologists, technologists, admins and auditors.

Pages use the same session token as the API (HttpOnly cookie), the same role gates
(their page variant, which also checks each form's CSRF token) and the same use cases
(:mod:`medsight.serve.usecases`) as the JSON routes. A little plain JavaScript
refreshes the worklist and drives the heat-map toggle and opacity slider; everything
works without a build step.
"""

from __future__ import annotations

import math
import secrets
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import quote

from fastapi import APIRouter, Depends, File, Form, Request, UploadFile
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates
from sqlalchemy.orm import Session
from starlette.datastructures import FormData

from medsight.errors import MedSightError
from medsight.integration.results import model_context
from medsight.serve import usecases
from medsight.serve.audit import Auditor
from medsight.serve.auth import COOKIE, Principal, UserError
from medsight.serve.config import KNOWN_MODALITIES, PRIORITIES
from medsight.serve.context import ServiceContext
from medsight.serve.db import ROLES, STUDY_STATUSES, utcnow
from medsight.serve.deps import (
    ADMIN,
    ANYONE,
    AUDITOR,
    MAX_PAGE,
    QUALITY,
    RADIOLOGIST,
    STAFF,
    UPLOADER,
    Audit,
    Ctx,
    DbSession,
    Guard,
    Id,
    Repeats,
    client_ip,
)
from medsight.serve.reviewed_report import submit_review
from medsight.serve.throttle import RepeatReads
from medsight.serve.reviews import EXCLUSIONS

HERE = Path(__file__).resolve().parent
STATIC_DIR = HERE / "static"
templates = Jinja2Templates(directory=str(HERE / "templates"))
AUDIT_PAGE_SIZE = 50
LOGIN_CSRF_COOKIE = "medsight_login_csrf"

router = APIRouter(include_in_schema=False)


def home_for(role: str) -> str:
    return {"auditor": "/audit"}.get(role, "/worklist")


def render(request: Request, name: str, p: Principal | None, status_code: int = 200, **ctx: Any) -> HTMLResponse:
    return templates.TemplateResponse(request, name, {"me": p, "csrf": p.csrf if p else "", **ctx},
                                      status_code=status_code)


def _safe_next(url: str | None) -> str | None:
    return url if url and url.startswith("/") and not url.startswith("//") else None


def login_form(request: Request, status_code: int = 200, headers: dict[str, str] | None = None,
               **ctx: Any) -> HTMLResponse:
    """The login page with a fresh CSRF token, also set as a cookie (double submit): a cross-site page can
    post the form but cannot read or set the cookie, so it cannot log a browser in to an account it chose."""
    token = secrets.token_urlsafe(24)
    resp = render(request, "login.html", None, status_code=status_code, login_csrf=token, **ctx)
    resp.set_cookie(LOGIN_CSRF_COOKIE, token, httponly=True, samesite="strict", path="/login",
                    secure=request.app.state.ctx.settings.cookie_secure)
    resp.headers.update(headers or {})
    return resp


@router.get("/login", response_class=HTMLResponse)
def login_page(request: Request, next: str | None = None) -> HTMLResponse:
    return login_form(request, next=_safe_next(next) or "")


@router.post("/login")
def login_post(request: Request, ctx: Ctx, s: DbSession, audit: Audit, guard: Guard, username: Annotated[str, Form()],
               password: Annotated[str, Form()], next: Annotated[str, Form()] = "",
               csrf_token: Annotated[str, Form()] = "") -> Response:
    cookie = request.cookies.get(LOGIN_CSRF_COOKIE, "")
    if not cookie or not secrets.compare_digest(cookie.encode(), csrf_token.encode()):
        return login_form(request, status_code=403, error="The login form expired: please try again.",
                          next=_safe_next(next) or "", username=username)
    got = usecases.login(s, audit, guard, client_ip(request), username, password, ctx.settings.token_hours)
    if isinstance(got, usecases.LoginRefused):
        wait = max(1, math.ceil(got.retry_after_s))
        error = "Wrong username or password." if got.status == 401 else f"{got.detail[:1].upper()}{got.detail[1:]} ({wait} s)."
        return login_form(request, status_code=got.status, error=error, next=_safe_next(next) or "", username=username,
                          headers={} if got.status == 401 else {"Retry-After": str(wait)})
    raw, user = got
    resp = RedirectResponse(_safe_next(next) or home_for(user.role), status_code=303)
    resp.delete_cookie(LOGIN_CSRF_COOKIE, path="/login")
    resp.set_cookie(COOKIE, raw, max_age=int(ctx.settings.token_hours * 3600), httponly=True, samesite="strict",
                    secure=ctx.settings.cookie_secure, path="/")
    return resp


@router.post("/logout")
def logout(s: DbSession, audit: Audit, p: Annotated[Principal, Depends(ANYONE.for_pages)]) -> Response:
    usecases.logout(s, audit, p.token, p.user_id)
    resp = RedirectResponse("/login", status_code=303)
    resp.delete_cookie(COOKIE, path="/")
    return resp


@router.get("/")
def root(p: Annotated[Principal, Depends(ANYONE.for_pages)]) -> Response:
    return RedirectResponse(home_for(p.role), status_code=303)


def _worklist(ctx: ServiceContext, s: Session, audit: Auditor, modality: str, status: str, page: int,
              repeats: RepeatReads | None = None, session_key: str = "") -> dict[str, Any]:
    return usecases.read_worklist(s, audit, ctx.settings.triage, modality or None, status or "open",
                                  min(max(page, 1), MAX_PAGE), 25, repeats, session_key)


@router.get("/worklist", response_class=HTMLResponse)
def worklist_page(request: Request, ctx: Ctx, s: DbSession, audit: Audit, p: Annotated[Principal, Depends(STAFF.for_pages)],
                  modality: str = "", status: str = "open", page: int = 1) -> HTMLResponse:
    wl = _worklist(ctx, s, audit, modality, status, page)
    return render(request, "worklist.html", p, wl=wl, modality=modality, status=status,
                  statuses=("open", "all", *STUDY_STATUSES), modalities=KNOWN_MODALITIES)


@router.get("/worklist/rows", response_class=HTMLResponse)
def worklist_rows(request: Request, ctx: Ctx, s: DbSession, audit: Audit, repeats: Repeats,
                  p: Annotated[Principal, Depends(STAFF.for_pages)],
                  modality: str = "", status: str = "open", page: int = 1) -> HTMLResponse:
    """The table body alone: what the page's auto-refresh fetches (audited when it shows something new)."""
    return render(request, "_rows.html", p, wl=_worklist(ctx, s, audit, modality, status, page, repeats, p.csrf))


@router.get("/studies/{study_id}", response_class=HTMLResponse)
def study_page(study_id: Id, request: Request, ctx: Ctx, s: DbSession, audit: Audit,
               p: Annotated[Principal, Depends(STAFF.for_pages)], result: int | None = None,
               saved: int | None = None) -> HTMLResponse:
    st = usecases.read_study(s, audit, ctx.settings.triage, study_id, include_reviews=p.role != "technologist")
    shown = next((x for x in st["results"] if x["id"] == result), None) or next(
        (x for x in st["results"] if x["id"] == st["key_result_id"]), None)
    reviews = [rv for rv in st.get("reviews", []) if shown and rv["result_id"] == shown["id"]]
    return render(request, "study.html", p, st=st, res=shown, reviews=reviews, saved=saved,
                  can_review=p.role == "radiologist", can_see_overlay=p.role in ("radiologist", "admin"),
                  model_context=_model_context(ctx, st["model"]), exclusions=EXCLUSIONS)


def _model_context(ctx: ServiceContext, model: str) -> list[str]:
    """The card's intended use and applicable ages, as the SR states them: where the model may be trusted."""
    if not model:
        return []
    try:
        return model_context(ctx.catalog.card(model.split("@", 1)[0]))
    except MedSightError:  # the model was removed since: the study page still shows the study
        return []


async def form_data(request: Request) -> FormData:
    """The posted form as it is, for a form whose fields depend on the model (one per finding)."""
    return await request.form()


@router.post("/studies/{study_id}/review")
def review_post(study_id: Id, ctx: Ctx, s: DbSession, form: Annotated[FormData, Depends(form_data)],
                p: Annotated[Principal, Depends(RADIOLOGIST.for_pages)]) -> Response:
    result_id = int(str(form.get("result_id"))) if form.get("result_id") else None
    findings = {k[8:]: form.get(k) == "present" for k in form if k.startswith("finding:")}
    label = str(form.get("label")) if form.get("label") else None
    submit_review(ctx, s, study_id, p.actor, label, findings if label is None else None, str(form.get("note", "")),
                  result_id)
    suffix = f"&result={result_id}" if result_id else ""
    return RedirectResponse(f"/studies/{study_id}?saved=1{suffix}", status_code=303)


@router.get("/upload", response_class=HTMLResponse)
def upload_page(request: Request, ctx: Ctx, p: Annotated[Principal, Depends(UPLOADER.for_pages)]) -> HTMLResponse:
    return render(request, "upload.html", p, cards=ctx.catalog.cards(), modalities=KNOWN_MODALITIES,
                  priorities=PRIORITIES)


@router.post("/upload", response_class=HTMLResponse)
def upload_post(request: Request, ctx: Ctx, p: Annotated[Principal, Depends(UPLOADER.for_pages)],
                files: Annotated[list[UploadFile], File()], modality: Annotated[str, Form()] = "",
                model: Annotated[str, Form()] = "", priority: Annotated[str, Form()] = "routine",
                accession_number: Annotated[str, Form()] = "") -> Response:
    try:
        study_id = usecases.upload_study(ctx, p.actor, [(f.filename, f.file) for f in files if f.filename], modality,
                                         model, priority, accession_number, None)
    except MedSightError as e:
        return render(request, "upload.html", p, status_code=422, error=str(e), cards=ctx.catalog.cards(),
                      modalities=KNOWN_MODALITIES, priorities=PRIORITIES)
    return RedirectResponse(f"/studies/{study_id}", status_code=303)


@router.get("/users", response_class=HTMLResponse)
def users_page(request: Request, s: DbSession, p: Annotated[Principal, Depends(ADMIN.for_pages)],
               error: str | None = None) -> HTMLResponse:
    return render(request, "users.html", p, users=usecases.list_users(s), roles=ROLES, error=error, now=utcnow())


@router.post("/users")
def users_post(s: DbSession, audit: Audit, _p: Annotated[Principal, Depends(ADMIN.for_pages)],
               username: Annotated[str, Form()], password: Annotated[str, Form()], role: Annotated[str, Form()],
               full_name: Annotated[str, Form()] = "") -> Response:
    try:
        usecases.add_user(s, audit, username, password, role, full_name)  # refuses before it writes anything
    except UserError as e:
        return RedirectResponse(f"/users?error={quote(str(e))}", status_code=303)
    return RedirectResponse("/users", status_code=303)


@router.get("/account", response_class=HTMLResponse)
def account_page(request: Request, p: Annotated[Principal, Depends(ANYONE.for_pages)], error: str | None = None,
                 saved: int = 0) -> HTMLResponse:
    return render(request, "account.html", p, error=error, saved=saved)


@router.post("/account/password")
def account_password(s: DbSession, audit: Audit, p: Annotated[Principal, Depends(ANYONE.for_pages)],
                     old_password: Annotated[str, Form()], new_password: Annotated[str, Form()]) -> Response:
    try:
        usecases.change_own_password(s, audit, p.user_id, p.token, old_password, new_password)
    except UserError as e:
        return RedirectResponse(f"/account?error={quote(str(e))}", status_code=303)
    return RedirectResponse("/account?saved=1", status_code=303)


@router.post("/users/{user_id}/unlock")
def users_unlock(user_id: Id, s: DbSession, audit: Audit, _p: Annotated[Principal, Depends(ADMIN.for_pages)]) -> Response:
    usecases.unlock_user(s, audit, user_id)
    return RedirectResponse("/users", status_code=303)


@router.post("/users/{user_id}/password")
def users_password(user_id: Id, s: DbSession, audit: Audit, _p: Annotated[Principal, Depends(ADMIN.for_pages)],
                   password: Annotated[str, Form()]) -> Response:
    try:
        usecases.reset_password(s, audit, user_id, password)
    except UserError as e:
        return RedirectResponse(f"/users?error={quote(str(e))}", status_code=303)
    return RedirectResponse("/users", status_code=303)


@router.post("/users/{user_id}/role")
def users_role(user_id: Id, s: DbSession, audit: Audit, p: Annotated[Principal, Depends(ADMIN.for_pages)],
               role: Annotated[str, Form()]) -> Response:
    try:
        usecases.update_user(s, audit, p.user_id, user_id, role=role)
    except UserError as e:
        return RedirectResponse(f"/users?error={quote(str(e))}", status_code=303)
    return RedirectResponse("/users", status_code=303)


@router.post("/users/{user_id}/active")
def users_toggle(user_id: Id, s: DbSession, audit: Audit, p: Annotated[Principal, Depends(ADMIN.for_pages)],
                 active: Annotated[str, Form()]) -> Response:
    try:
        usecases.update_user(s, audit, p.user_id, user_id, active=active == "1")
    except UserError as e:
        return RedirectResponse(f"/users?error={quote(str(e))}", status_code=303)
    return RedirectResponse("/users", status_code=303)


@router.get("/audit", response_class=HTMLResponse)
def audit_page(request: Request, s: DbSession, audit: Audit, p: Annotated[Principal, Depends(AUDITOR.for_pages)],
               page: int = 1, verify: int = 0) -> HTMLResponse:
    page = min(max(page, 1), MAX_PAGE)
    if verify:
        events, report = usecases.audit_events(s, page, AUDIT_PAGE_SIZE), usecases.verify_audit(s, audit, page=page)
    else:
        events, report = usecases.read_audit(s, audit, page, AUDIT_PAGE_SIZE), None
    total = events["total"]
    return render(request, "audit.html", p, items=events["items"], total=total, page=page,
                  pages=max(1, -(-total // AUDIT_PAGE_SIZE)), report=report)


@router.get("/agreement", response_class=HTMLResponse)
def agreement_page(request: Request, s: DbSession, audit: Audit, p: Annotated[Principal, Depends(QUALITY.for_pages)],
                   period: str = "week") -> HTMLResponse:
    if period not in ("day", "week", "month"):
        period = "week"
    data = usecases.read_agreement(s, audit, None, period)
    return render(request, "agreement.html", p, data=data, period=period)
