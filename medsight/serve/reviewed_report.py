"""A reader's review goes back to the PACS as the verified version of the AI report.

The SR sent after analysis is preliminary and unverified. When a radiologist
confirms or corrects the model in MedSight, the PACS should not keep showing
only the machine's opinion: :func:`submit_review` stores the review and, in the
same transaction, queues a ``deliver`` job with a verified Comprehensive SR
(:func:`medsight.dicom.sr.build_sr` with a :class:`~medsight.dicom.results.ReviewAttestation`)
that names the reader as Verifying Observer and lists the SR it supersedes in
its Predecessor Documents Sequence. The job has the same retry rules as every
other delivery. Both the REST API and the web page submit reviews through here.

Only DICOM studies with a configured DICOM destination get one (a PNG upload
has no study in the PACS to file it in). Building the SR can fail (a source
file gone from storage); the review stands regardless, and the failure is
audited as ``deliver.build_failed``.
"""

from __future__ import annotations

import io
import logging

import pydicom
from sqlalchemy import select
from sqlalchemy.orm import Session

from medsight.serve.audit import Actor, record
from medsight.serve.context import ServiceContext
from medsight.serve.db import Instance, Job, Result, Review, Study, User
from medsight.serve.reviews import create_review

log = logging.getLogger("medsight.serve.reviewed_report")


def submit_review(ctx: ServiceContext, session: Session, study_id: int, reviewer: Actor, label: str | None = None,
                  findings: dict[str, bool] | None = None, note: str = "", result_id: int | None = None) -> Review:
    """Record a review and queue the verified SR for the PACS (when the study came from one)."""
    review = create_review(session, study_id, reviewer, label, findings, note, result_id)
    queue_reviewed_report(ctx, session, review, reviewer)
    return review


def queue_reviewed_report(ctx: ServiceContext, session: Session, review: Review, reviewer: Actor) -> Job | None:
    """Queue the verified SR of ``review``; the delivery job, or None when nothing is to be sent."""
    outputs = ctx.settings.outputs
    study = session.get(Study, review.study_id)
    if study is None or study.source_format != "dicom" or not outputs.destination("dicom"):
        return None
    try:
        blob = _build(ctx, session, study, review)
    except Exception as e:  # noqa: BLE001 - any builder failure is reported; the review itself stands
        log.exception("study %s: the reviewed SR could not be built", study.id)
        record(session, reviewer, "deliver.build_failed", "study", study.id, review=review.id,
               error=f"{type(e).__name__}: {e}"[:500])
        return None
    return ctx.queue.enqueue(session, "deliver", study.id, {"channel": "dicom", "blobs": [blob], "review": review.id},
                             priority=60, max_attempts=outputs.max_attempts)


def _build(ctx: ServiceContext, session: Session, study: Study, review: Review) -> str:
    from medsight.dicom.files import encode_part10
    from medsight.dicom.results import AnalysedImage, ReviewAttestation
    from medsight.dicom.sr import build_sr
    from medsight.predict.result import Prediction

    reviewed = session.get(Result, review.result_id)
    rows = session.execute(select(Result, Instance).join(Instance, Result.instance_id == Instance.id)
                           .where(Result.job_id == reviewed.job_id).order_by(Result.id)).all()
    images = []
    for result, instance in rows:
        header = pydicom.dcmread(ctx.store.path_for(instance.file_sha256), stop_before_pixels=True)
        prediction = Prediction(source=None, model=result.model, label=result.label, probabilities=dict(result.probabilities),
                                confidence=result.confidence, refer=result.refer, statement=result.statement,
                                heatmap_label=result.heatmap_label)
        images.append(AnalysedImage(prediction, header))
    reviewed_uid = next(str(a.source.SOPInstanceUID) for (r, _), a in zip(rows, images) if r.id == reviewed.id)
    user = session.get(User, review.reviewer_id)
    attestation = ReviewAttestation(
        sop_instance_uid=reviewed_uid, label=review.label, action=review.action,
        reviewer_name=(user.full_name or user.username)[:64], organization=ctx.settings.outputs.organization, note=review.note)
    sr = build_sr(images, review=attestation, predecessor=_latest_sr(ctx, session, study.id))
    return ctx.store.put_bytes(encode_part10(sr))


def _latest_sr(ctx: ServiceContext, session: Session, study_id: int):  # noqa: ANN202 - pydicom Dataset or None
    """The most recent SR MedSight built for this study (preliminary or an earlier review): the one superseded."""
    jobs = session.execute(select(Job).where(Job.study_id == study_id, Job.kind == "deliver").order_by(Job.id.desc())).scalars()
    for job in jobs:
        if job.payload.get("channel") != "dicom" or not job.payload.get("blobs"):
            continue
        try:
            ds = pydicom.dcmread(io.BytesIO(ctx.store.read_bytes(job.payload["blobs"][0])))
        except Exception:  # noqa: BLE001 - a missing or unreadable blob: look further back
            continue
        if ds.get("Modality") == "SR":
            return ds
    return None


__all__ = ["submit_review", "queue_reviewed_report"]
