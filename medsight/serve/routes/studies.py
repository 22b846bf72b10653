"""Upload a study, the triage worklist, one study in full."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, File, Form, Query, Response, UploadFile

from medsight.serve import schemas, usecases
from medsight.serve.auth import Principal
from medsight.serve.deps import MAX_PAGE, STAFF, UPLOADER, Audit, Ctx, DbSession, GatedRoute, Id, Repeats
from medsight.serve.schemas import REFUSALS
from medsight.serve.views import study_detail

router = APIRouter(prefix="/api", tags=["studies"], route_class=GatedRoute)


@router.post("/studies", status_code=202, response_model=schemas.StudyDetail, response_model_exclude_unset=True,
             responses={c: REFUSALS[c] for c in (404, 409, 413)})
def upload(ctx: Ctx, p: Annotated[Principal, Depends(UPLOADER)], response: Response,
           files: Annotated[list[UploadFile], File(description="DICOM file(s) of one study, a zip of them, or PNG/JPEG")],
           modality: Annotated[str | None, Form(description="required for PNG/JPEG: DICOM modality code, e.g. CR")] = None,
           model: Annotated[str | None, Form(description="model name; default: chosen by modality")] = None,
           priority: Annotated[str, Form(description="routine | urgent | stat")] = "routine",
           accession_number: Annotated[str | None, Form()] = None,
           description: Annotated[str | None, Form()] = None) -> dict[str, Any]:
    """Accept one study. 202: stored and queued for analysis (never lost from here on)."""
    study_id = usecases.upload_study(ctx, p.actor, [(f.filename, f.file) for f in files], modality, model, priority,
                                     accession_number, description)
    response.headers["Location"] = f"/api/studies/{study_id}"
    with ctx.db.session() as s:  # not the request's transaction: ingest committed its own
        return study_detail(s, usecases.get_study(s, study_id), ctx.settings.triage, include_reviews=False)


@router.get("/worklist", response_model=schemas.Worklist)
def worklist(ctx: Ctx, s: DbSession, audit: Audit, repeats: Repeats, p: Annotated[Principal, Depends(STAFF)],
             modality: str | None = None,
             status: Annotated[str | None, Query(description="open | all | comma list of statuses")] = "open",
             page: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 1,
             page_size: Annotated[int, Query(ge=1, le=500)] = 50) -> dict[str, Any]:
    """Studies ordered by triage priority (most urgent first)."""
    return usecases.read_worklist(s, audit, ctx.settings.triage, modality, status, page, page_size, repeats, p.csrf)


@router.get("/studies/{study_id}", response_model=schemas.StudyDetail, response_model_exclude_unset=True)
def study(study_id: Id, ctx: Ctx, s: DbSession, audit: Audit, p: Annotated[Principal, Depends(STAFF)]) -> dict[str, Any]:
    return usecases.read_study(s, audit, ctx.settings.triage, study_id, include_reviews=p.role != "technologist")
