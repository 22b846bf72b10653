"""Human review of a study's results, and the model's agreement with the reviewers."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query
from sqlalchemy import select

from medsight.serve import schemas, usecases
from medsight.serve.auth import Principal
from medsight.serve.db import Review
from medsight.serve.deps import (
    CLINICAL,
    QUALITY,
    RADIOLOGIST,
    Audit,
    Ctx,
    DbSession,
    GatedRoute,
    Id,
)
from medsight.serve.reviewed_report import submit_review
from medsight.serve.reviews import review_dict

router = APIRouter(prefix="/api", tags=["reviews"], route_class=GatedRoute)


@router.post("/studies/{study_id}/reviews", status_code=201, response_model=schemas.Review)
def post_review(study_id: Id, body: schemas.ReviewBody, ctx: Ctx, s: DbSession,
                p: Annotated[Principal, Depends(RADIOLOGIST)]) -> dict[str, Any]:
    """Confirm or correct the model's findings. A later review never replaces an earlier one."""
    rev = submit_review(ctx, s, study_id, p.actor, body.label, body.findings, body.note, body.result_id)
    return review_dict(rev)


@router.get("/studies/{study_id}/reviews", response_model=list[schemas.Review])
def get_reviews(study_id: Id, s: DbSession, audit: Audit, _p: Annotated[Principal, Depends(CLINICAL)]) -> list[dict[str, Any]]:
    usecases.get_study(s, study_id)
    rows = s.execute(select(Review).where(Review.study_id == study_id).order_by(Review.id)).scalars().all()
    audit("review.read", "study", study_id, reviews=[r.id for r in rows])
    return [review_dict(r) for r in rows]


@router.get("/agreement", response_model=schemas.Agreement)
def get_agreement(s: DbSession, audit: Audit, _p: Annotated[Principal, Depends(QUALITY)], model: str | None = None,
                  period: Annotated[str, Query(pattern="^(day|week|month)$")] = "week") -> dict[str, Any]:
    """Per model and finding: sensitivity and specificity of the model against reviewers, overall and over time."""
    return usecases.read_agreement(s, audit, model, period)
