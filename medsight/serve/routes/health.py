"""``/health``: is the service doing its work (a worker beats, the queue moves), which database. No login."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from medsight._version import __version__
from medsight.serve import schemas
from medsight.serve.deps import Ctx, GatedRoute
from medsight.serve.health import service_health

router = APIRouter(tags=["service"], route_class=GatedRoute)


@router.get("/health", response_model=schemas.Health,
            responses={503: {"model": schemas.Health, "description": "degraded: the reasons say what is wrong"}})
def health(ctx: Ctx) -> dict[str, Any] | JSONResponse:
    """Readiness: 200 "ok", or 503 "degraded" with reasons (no worker beat lately, a due job waits too long).

    A load balancer or monitor polling this sees a dead worker pool, not just a live web process.
    """
    h = service_health(ctx)
    body = {**h.as_dict(), "version": __version__, "database": ctx.db.dialect}
    if not h.ok:
        return JSONResponse(schemas.Health.model_validate(body).model_dump(), status_code=503)
    return body
