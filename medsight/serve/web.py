"""Server-rendered pages (Jinja2) for radiologists, technologists, admins and auditors.

Pages use the same session token as the API (HttpOnly cookie) and call the same
functions as the JSON endpoints; forms that change anything carry a CSRF token.
A little plain JavaScript refreshes the worklist and drives the heat-map toggle
and opacity slider; everything works without a build step.
"""

from __future__ import annotations

import hmac
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import quote

from fastapi import APIRouter, Depends, File, Form, HTTPException, Request, UploadFile
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates
from sqlalchemy import func, select

from medsight.errors import MedSightError
from medsight.serve import audit as audit_log
from medsight.serve.auth import COOKIE, Principal, Require, UserError, create_user, revoke_token
from medsight.serve.config import KNOWN_MODALITIES, PRIORITIES
from medsight.serve.db import ROLES, STUDY_STATUSES, AuditEvent, User
from medsight.serve.reviewed_report import submit_review
from medsight.serve.reviews import ReviewError, agreement
from medsight.serve.views import study_detail

HERE = Path(__file__).resolve().parent
STATIC_DIR = HERE / "static"
templates = Jinja2Templates(directory=str(HERE / "templates"))

P_STAFF = Require("radiologist", "technologist", "admin", page=True)
P_RADIOLOGIST = Require("radiologist", page=True)
P_UPLOADER = Require("technologist", "radiologist", "admin", page=True)
P_ADMIN = Require("admin", page=True)
P_AUDITOR = Require("auditor", page=True)
P_QUALITY = Require("radiologist", "admin", "auditor", page=True)
P_ANY = Require(*ROLES, page=True)


def home_for(role: str) -> str:
    return {"auditor": "/audit"}.get(role, "/worklist")


def render(request: Request, name: str, p: Principal | None, status_code: int = 200, **ctx: Any) -> HTMLResponse:
    return templates.TemplateResponse(request, name, {"me": p, "csrf": p.csrf if p else "", **ctx},
                                      status_code=status_code)


def check_csrf(p: Principal, token: str) -> None:
    if not hmac.compare_digest(token or "", p.csrf):
        raise HTTPException(403, "invalid CSRF token: reload the page and try again")


def _safe_next(url: str | None) -> str | None:
    return url if url and url.startswith("/") and not url.startswith("//") else None


def web_router() -> APIRouter:
    from medsight.serve.api import do_upload, get_study, login
    from medsight.serve.worklist import worklist

    r = APIRouter(include_in_schema=False)

    @r.get("/login", response_class=HTMLResponse)
    def login_page(request: Request, next: str | None = None) -> HTMLResponse:
        return render(request, "login.html", None, next=_safe_next(next) or "")

    @r.post("/login")
    def login_post(request: Request, username: Annotated[str, Form()], password: Annotated[str, Form()],
                   next: Annotated[str, Form()] = "") -> Response:
        ctx = request.app.state.ctx
        got = login(ctx, request, username, password)
        if got is None:
            return render(request, "login.html", None, status_code=401, error="Wrong username or password.",
                          next=_safe_next(next) or "", username=username)
        raw, user = got
        resp = RedirectResponse(_safe_next(next) or home_for(user.role), status_code=303)
        resp.set_cookie(COOKIE, raw, max_age=int(ctx.settings.token_hours * 3600), httponly=True, samesite="strict",
                        secure=ctx.settings.cookie_secure, path="/")
        return resp

    @r.post("/logout")
    def logout(request: Request, p: Annotated[Principal, Depends(P_ANY)], csrf_token: Annotated[str, Form()] = "") -> Response:
        check_csrf(p, csrf_token)
        with request.app.state.ctx.db.session() as s:
            revoke_token(s, p.token)
            audit_log.record(s, p.actor, "logout", "user", p.user_id)
        resp = RedirectResponse("/login", status_code=303)
        resp.delete_cookie(COOKIE, path="/")
        return resp

    @r.get("/")
    def root(p: Annotated[Principal, Depends(P_ANY)]) -> Response:
        return RedirectResponse(home_for(p.role), status_code=303)

    def _worklist(request: Request, p: Principal, modality: str | None, status: str | None, page: int) -> dict[str, Any]:
        ctx = request.app.state.ctx
        try:
            with ctx.db.session() as s:
                out = worklist(s, ctx.settings.triage, modality or None, status or "open", max(page, 1), 25)
                audit_log.record(s, p.actor, "worklist.read", "study", None, modality=modality, status=status,
                                 page=page, studies=[i["id"] for i in out["items"]])
        except ValueError as e:
            raise HTTPException(422, str(e)) from None
        return out

    @r.get("/worklist", response_class=HTMLResponse)
    def worklist_page(request: Request, p: Annotated[Principal, Depends(P_STAFF)], modality: str = "",
                      status: str = "open", page: int = 1) -> HTMLResponse:
        wl = _worklist(request, p, modality, status, page)
        return render(request, "worklist.html", p, wl=wl, modality=modality, status=status,
                      statuses=("open", "all", *STUDY_STATUSES), modalities=KNOWN_MODALITIES)

    @r.get("/worklist/rows", response_class=HTMLResponse)
    def worklist_rows(request: Request, p: Annotated[Principal, Depends(P_STAFF)], modality: str = "",
                      status: str = "open", page: int = 1) -> HTMLResponse:
        """The table body alone: what the page's auto-refresh fetches."""
        return render(request, "_rows.html", p, wl=_worklist(request, p, modality, status, page))

    @r.get("/studies/{study_id}", response_class=HTMLResponse)
    def study_page(study_id: int, request: Request, p: Annotated[Principal, Depends(P_STAFF)],
                   result: int | None = None, saved: int | None = None) -> HTMLResponse:
        ctx = request.app.state.ctx
        with ctx.db.session() as s:
            st = study_detail(s, get_study(s, study_id), ctx.settings.triage, include_reviews=p.role != "technologist")
            audit_log.record(s, p.actor, "study.read", "study", study_id)
        shown = next((x for x in st["results"] if x["id"] == result), None) or next(
            (x for x in st["results"] if x["id"] == st["key_result_id"]), None)
        reviews = [rv for rv in st.get("reviews", []) if shown and rv["result_id"] == shown["id"]]
        return render(request, "study.html", p, st=st, res=shown, reviews=reviews, saved=saved,
                      can_review=p.role == "radiologist", can_see_overlay=p.role in ("radiologist", "admin"))

    @r.post("/studies/{study_id}/review")
    async def review_post(study_id: int, request: Request, p: Annotated[Principal, Depends(P_RADIOLOGIST)]) -> Response:
        form = await request.form()
        check_csrf(p, str(form.get("csrf_token", "")))
        result_id = int(str(form.get("result_id"))) if form.get("result_id") else None
        findings = {k[8:]: form.get(k) == "present" for k in form.keys() if k.startswith("finding:")}
        label = str(form.get("label")) if form.get("label") else None
        ctx = request.app.state.ctx
        try:
            with ctx.db.session() as s:
                submit_review(ctx, s, study_id, p.actor, label, findings if label is None else None,
                              str(form.get("note", "")), result_id)
        except ReviewError as e:
            raise HTTPException(422, str(e)) from None
        suffix = f"&result={result_id}" if result_id else ""
        return RedirectResponse(f"/studies/{study_id}?saved=1{suffix}", status_code=303)

    @r.get("/upload", response_class=HTMLResponse)
    def upload_page(request: Request, p: Annotated[Principal, Depends(P_UPLOADER)]) -> HTMLResponse:
        cards = request.app.state.ctx.catalog.cards()
        return render(request, "upload.html", p, cards=cards, modalities=KNOWN_MODALITIES, priorities=PRIORITIES)

    @r.post("/upload", response_class=HTMLResponse)
    def upload_post(request: Request, p: Annotated[Principal, Depends(P_UPLOADER)],
                    files: Annotated[list[UploadFile], File()], csrf_token: Annotated[str, Form()] = "",
                    modality: Annotated[str, Form()] = "", model: Annotated[str, Form()] = "",
                    priority: Annotated[str, Form()] = "routine", accession_number: Annotated[str, Form()] = "") -> Response:
        check_csrf(p, csrf_token)
        ctx = request.app.state.ctx
        try:
            st = do_upload(ctx, p, [f for f in files if f.filename], modality, model, priority, accession_number, None)
        except MedSightError as e:
            return render(request, "upload.html", p, status_code=422, error=str(e), cards=ctx.catalog.cards(),
                          modalities=KNOWN_MODALITIES, priorities=PRIORITIES)
        return RedirectResponse(f"/studies/{st.id}", status_code=303)

    @r.get("/users", response_class=HTMLResponse)
    def users_page(request: Request, p: Annotated[Principal, Depends(P_ADMIN)], error: str | None = None) -> HTMLResponse:
        with request.app.state.ctx.db.session() as s:
            users = s.execute(select(User).order_by(User.username)).scalars().all()
        return render(request, "users.html", p, users=users, roles=ROLES, error=error)

    @r.post("/users")
    def users_post(request: Request, p: Annotated[Principal, Depends(P_ADMIN)], username: Annotated[str, Form()],
                   password: Annotated[str, Form()], role: Annotated[str, Form()], full_name: Annotated[str, Form()] = "",
                   csrf_token: Annotated[str, Form()] = "") -> Response:
        check_csrf(p, csrf_token)
        try:
            with request.app.state.ctx.db.session() as s:
                u = create_user(s, username, password, role, full_name)
                audit_log.record(s, p.actor, "user.create", "user", u.id, username=u.username, role=u.role)
        except UserError as e:
            return RedirectResponse(f"/users?error={quote(str(e))}", status_code=303)
        return RedirectResponse("/users", status_code=303)

    @r.post("/users/{user_id}/active")
    def users_toggle(user_id: int, request: Request, p: Annotated[Principal, Depends(P_ADMIN)],
                     active: Annotated[str, Form()], csrf_token: Annotated[str, Form()] = "") -> Response:
        check_csrf(p, csrf_token)
        if user_id == p.user_id:
            return RedirectResponse(f"/users?error={quote('you cannot deactivate yourself')}", status_code=303)
        with request.app.state.ctx.db.session() as s:
            u = s.get(User, user_id)
            if u is None:
                raise LookupError(f"user {user_id} not found")
            u.active = active == "1"
            audit_log.record(s, p.actor, "user.update", "user", u.id, active=u.active)
        return RedirectResponse("/users", status_code=303)

    @r.get("/audit", response_class=HTMLResponse)
    def audit_page(request: Request, p: Annotated[Principal, Depends(P_AUDITOR)], page: int = 1,
                   verify: int = 0) -> HTMLResponse:
        from medsight.serve.api import audit_dict

        ctx = request.app.state.ctx
        page = max(page, 1)
        with ctx.db.session() as s:
            total = s.execute(select(func.count(AuditEvent.id))).scalar_one()
            rows = s.execute(select(AuditEvent).order_by(AuditEvent.id.desc()).limit(50).offset((page - 1) * 50)).scalars().all()
            items = [audit_dict(e) for e in rows]
            report = audit_log.verify(s).to_dict() if verify else None
            audit_log.record(s, p.actor, "audit.verify" if verify else "audit.read", "audit", None, page=page)
        return render(request, "audit.html", p, items=items, total=total, page=page, pages=max(1, -(-total // 50)),
                      report=report)

    @r.get("/agreement", response_class=HTMLResponse)
    def agreement_page(request: Request, p: Annotated[Principal, Depends(P_QUALITY)], period: str = "week") -> HTMLResponse:
        if period not in ("day", "week", "month"):
            period = "week"
        with request.app.state.ctx.db.session() as s:
            data = agreement(s, None, period)
            audit_log.record(s, p.actor, "agreement.read", "review", None)
        return render(request, "agreement.html", p, data=data, period=period)

    return r
