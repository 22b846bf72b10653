"""Log in for a bearer token, log out, who am I."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response

from medsight.serve import schemas, usecases
from medsight.serve.auth import Principal
from medsight.serve.deps import ANYONE, Audit, Ctx, DbSession, GatedRoute, client_ip
from medsight.serve.views import user_dict

router = APIRouter(prefix="/api/auth", tags=["auth"], route_class=GatedRoute)


@router.post("/login", response_model=schemas.Login, responses={401: {"description": "wrong username or password"}})
def login(body: schemas.LoginBody, request: Request, ctx: Ctx, s: DbSession, audit: Audit) -> dict[str, Any] | Response:
    """Exchange username and password for a bearer token."""
    got = usecases.login(s, audit, client_ip(request), body.username, body.password, ctx.settings.token_hours)
    if got is None:  # returned, not raised: raising would roll back the login.failed event
        return JSONResponse({"detail": "wrong username or password"}, status_code=401,
                            headers={"WWW-Authenticate": "Bearer"})
    raw, user = got
    return {"token": raw, "token_type": "bearer", "expires_in_s": int(ctx.settings.token_hours * 3600),
            "user": user_dict(user)}


@router.post("/logout", response_model=schemas.Status)
def logout(s: DbSession, audit: Audit, p: Annotated[Principal, Depends(ANYONE)]) -> dict[str, str]:
    usecases.logout(s, audit, p.token, p.user_id)
    return {"status": "logged out"}


@router.get("/me", response_model=schemas.Me)
def me(p: Annotated[Principal, Depends(ANYONE)]) -> dict[str, Any]:
    return {"id": p.user_id, "username": p.username, "role": p.role}
