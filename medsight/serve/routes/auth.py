"""Log in for a bearer token, log out, who am I, change my password."""

from __future__ import annotations

import math
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response

from medsight.serve import schemas, usecases
from medsight.serve.auth import Principal
from medsight.serve.deps import ANYONE, Audit, Ctx, DbSession, GatedRoute, Guard, client_ip
from medsight.serve.schemas import REFUSALS
from medsight.serve.views import user_dict

router = APIRouter(prefix="/api/auth", tags=["auth"], route_class=GatedRoute)


def refusal(got: usecases.LoginRefused) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if got.status == 401 else {"Retry-After": str(max(1, math.ceil(got.retry_after_s)))}
    return JSONResponse({"detail": got.detail}, status_code=got.status, headers=headers)


@router.post("/login", response_model=schemas.Login,
             responses={c: REFUSALS[c] | ({"description": "wrong username or password"} if c == 401 else {})
                        for c in (401, 429, 503)})
def login(body: schemas.LoginBody, request: Request, ctx: Ctx, s: DbSession, audit: Audit,
          guard: Guard) -> dict[str, Any] | Response:
    """Exchange username and password for a bearer token. 429 with Retry-After while the client or the
    account is throttled (a right password too), 503 with Retry-After when password checks are saturated."""
    got = usecases.login(s, audit, guard, client_ip(request), body.username, body.password, ctx.settings.token_hours)
    if isinstance(got, usecases.LoginRefused):  # returned, not raised: raising would roll back the audit and the count
        return refusal(got)
    raw, user = got
    return {"token": raw, "token_type": "bearer", "expires_in_s": int(ctx.settings.token_hours * 3600),
            "user": user_dict(user)}


@router.post("/password", response_model=schemas.Status)
def change_password(body: schemas.PasswordChange, s: DbSession, audit: Audit,
                    p: Annotated[Principal, Depends(ANYONE)]) -> dict[str, str]:
    """Change your own password (the current one is required); your other sessions end."""
    usecases.change_own_password(s, audit, p.user_id, p.token, body.old_password, body.new_password)
    return {"status": "password changed"}


@router.post("/logout", response_model=schemas.Status)
def logout(s: DbSession, audit: Audit, p: Annotated[Principal, Depends(ANYONE)]) -> dict[str, str]:
    usecases.logout(s, audit, p.token, p.user_id)
    return {"status": "logged out"}


@router.get("/me", response_model=schemas.Me)
def me(p: Annotated[Principal, Depends(ANYONE)]) -> dict[str, Any]:
    return {"id": p.user_id, "username": p.username, "role": p.role}
