"""The images as displayed, and the heat maps: PNGs rendered once by the worker and served from the file store."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Response
from sqlalchemy import select

from medsight.serve.analysis import display_png
from medsight.serve.auth import Principal
from medsight.serve.db import Instance, Result
from medsight.serve.deps import CLINICAL, STAFF, Audit, Ctx, DbSession, GatedRoute, Id
from medsight.serve.schemas import PNG

router = APIRouter(prefix="/api", tags=["images"], responses=PNG, route_class=GatedRoute)


def png(data: bytes) -> Response:
    return Response(data, media_type="image/png", headers={"Cache-Control": "no-store"})


@router.get("/instances/{instance_id}/image.png", response_class=Response)
def instance_image(instance_id: Id, ctx: Ctx, s: DbSession, audit: Audit,
                   _p: Annotated[Principal, Depends(STAFF)]) -> Response:
    """The image as displayed (rendered from the stored file with the core reader)."""
    from medsight.io.readers import read_image

    inst = s.get(Instance, instance_id)
    if inst is None:
        raise LookupError(f"instance {instance_id} not found")
    rendered = s.execute(select(Result.display_sha256).where(Result.instance_id == instance_id)
                         .order_by(Result.id.desc()).limit(1)).scalar_one_or_none()
    audit("image.read", "study", inst.study_id, instance=instance_id)
    sha = inst.file_sha256
    s.commit()  # reading and decoding files must not hold the database's write lock
    if rendered:  # the worker already rendered it: no second decode of a large DICOM
        return png(ctx.store.read_bytes(rendered))
    return png(display_png(read_image(ctx.store.path_for(sha))))


def _result_png(result_id: int, ctx: Ctx, s: DbSession, audit: Audit, which: str) -> Response:
    res = s.get(Result, result_id)
    if res is None:
        raise LookupError(f"result {result_id} not found")
    sha = {"image": res.display_sha256, "overlay": res.overlay_sha256, "heatmap": res.heatmap_sha256}[which]
    if sha is None:
        raise LookupError(f"result {result_id} has no {which}")
    audit(f"result.{which}.read", "result", result_id, study=res.study_id)
    s.commit()  # reading the file must not hold the database's write lock
    return png(ctx.store.read_bytes(sha))


@router.get("/results/{result_id}/image.png", response_class=Response)
def result_image(result_id: Id, ctx: Ctx, s: DbSession, audit: Audit,
                 _p: Annotated[Principal, Depends(STAFF)]) -> Response:
    return _result_png(result_id, ctx, s, audit, "image")


@router.get("/results/{result_id}/overlay.png", response_class=Response)
def result_overlay(result_id: Id, ctx: Ctx, s: DbSession, audit: Audit,
                   _p: Annotated[Principal, Depends(CLINICAL)]) -> Response:
    """Grad-CAM heat map blended over the image (full strength: pages set the opacity)."""
    return _result_png(result_id, ctx, s, audit, "overlay")


@router.get("/results/{result_id}/heatmap.png", response_class=Response)
def result_heatmap(result_id: Id, ctx: Ctx, s: DbSession, audit: Audit,
                   _p: Annotated[Principal, Depends(CLINICAL)]) -> Response:
    """The bare heat map, 8-bit gray, at the image's resolution."""
    return _result_png(result_id, ctx, s, audit, "heatmap")
