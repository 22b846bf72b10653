"""User accounts (administrators only)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends

from medsight.serve import schemas, usecases
from medsight.serve.auth import Principal
from medsight.serve.deps import ADMIN, Audit, DbSession, GatedRoute, Id
from medsight.serve.schemas import REFUSALS
from medsight.serve.views import user_dict

router = APIRouter(prefix="/api/users", tags=["users"], route_class=GatedRoute)


@router.get("", response_model=list[schemas.User])
def list_users(s: DbSession, _p: Annotated[Principal, Depends(ADMIN)]) -> list[dict[str, Any]]:
    return [user_dict(u) for u in usecases.list_users(s)]


@router.post("", status_code=201, response_model=schemas.User)
def add_user(body: schemas.UserBody, s: DbSession, audit: Audit, _p: Annotated[Principal, Depends(ADMIN)]) -> dict[str, Any]:
    return user_dict(usecases.add_user(s, audit, body.username, body.password, body.role, body.full_name))


@router.patch("/{user_id}", response_model=schemas.User, responses={409: REFUSALS[409]})
def patch_user(user_id: Id, body: schemas.UserPatch, s: DbSession, audit: Audit,
               p: Annotated[Principal, Depends(ADMIN)]) -> dict[str, Any]:
    return user_dict(usecases.update_user(s, audit, p.user_id, user_id, body.active, body.role))


@router.post("/{user_id}/unlock", response_model=schemas.User)
def unlock_user(user_id: Id, s: DbSession, audit: Audit, _p: Annotated[Principal, Depends(ADMIN)]) -> dict[str, Any]:
    """Lift a login lock (after repeated wrong passwords) now."""
    return user_dict(usecases.unlock_user(s, audit, user_id))


@router.post("/{user_id}/password", response_model=schemas.User)
def reset_password(user_id: Id, body: schemas.PasswordReset, s: DbSession, audit: Audit,
                   _p: Annotated[Principal, Depends(ADMIN)]) -> dict[str, Any]:
    """Set a user's password (they forgot it): their sessions end and a login lock is lifted."""
    return user_dict(usecases.reset_password(s, audit, user_id, body.password))
