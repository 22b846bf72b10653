"""The installed models: which modalities each reads, its labels and critical findings."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends

from medsight.serve import schemas
from medsight.serve.auth import Principal
from medsight.serve.catalog import card_modalities, finding_labels
from medsight.serve.deps import ANYONE, Ctx, GatedRoute

router = APIRouter(prefix="/api/models", tags=["models"], route_class=GatedRoute)


@router.get("", response_model=list[schemas.ModelInfo])
def models(ctx: Ctx, _p: Annotated[Principal, Depends(ANYONE)]) -> list[dict[str, Any]]:
    """Installed models: which modalities each reads, its labels and critical findings."""
    return [{"name": c.name, "version": c.version, "modality": c.modality, "modalities": sorted(card_modalities(c)),
             "task": c.task, "labels": c.labels, "findings": finding_labels(c),
             "critical_findings": c.critical_findings, "body_part": c.body_part} for c in ctx.catalog.cards()]
