"""The audit trail and its hash-chain verification (auditors only)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query

from medsight.serve import schemas, usecases
from medsight.serve.auth import Principal
from medsight.serve.deps import AUDITOR, MAX_PAGE, Audit, DbSession, GatedRoute

router = APIRouter(prefix="/api/audit", tags=["audit"], route_class=GatedRoute)


@router.get("", response_model=schemas.AuditPage)
def audit_events(s: DbSession, audit: Audit, _p: Annotated[Principal, Depends(AUDITOR)], actor: str | None = None,
                 object_type: str | None = None, object_id: str | None = None,
                 page: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 1,
                 page_size: Annotated[int, Query(ge=1, le=500)] = 100) -> dict[str, Any]:
    """The audit trail, newest first."""
    return usecases.read_audit(s, audit, page, page_size, actor=actor, object_type=object_type, object_id=object_id)


@router.get("/verify", response_model=schemas.AuditVerify)
def audit_verify(s: DbSession, audit: Audit, _p: Annotated[Principal, Depends(AUDITOR)]) -> dict[str, Any]:
    """Recompute the hash chain: any edited or deleted event is reported."""
    return usecases.verify_audit(s, audit)
