"""A reader's review goes back to the hospital's systems as the verified version of the AI report.

The results sent after analysis are preliminary: an UNVERIFIED SR for the PACS, a
``preliminary`` DiagnosticReport for the FHIR server. When a radiologist confirms
or corrects the model in MedSight, those systems should not keep showing only the
machine's opinion. :func:`submit_review` stores the review and, in the same
transaction, queues ``deliver`` jobs (same retry rules as every delivery) with

* DICOM: a verified Comprehensive SR naming the reader as Verifying Observer and
  listing the SR it supersedes in its Predecessor Documents Sequence
  (:func:`medsight.integration.sr.build_sr` with a :class:`~medsight.integration.results.ReviewAttestation`);
* FHIR: the preliminary DiagnosticReport updated in place to ``final``
  (conditional update on its identifier), with the reader as results interpreter
  (:func:`medsight.integration.fhir.build_reviewed_fhir_bundle`);
* HL7 v2: the ORU^R01 of the same order again, result status F (confirmed) or C
  (corrected), with the reader's finding (:func:`medsight.integration.hl7.build_oru_r01`).

Both the REST API and the web page submit reviews through here. A channel gets
a verified report only where it got the preliminary one's kind (DICOM needs a
DICOM study). Building can fail (a source file gone from storage); the review
stands regardless, and the failure is audited as ``deliver.build_failed``.
"""

from __future__ import annotations

import io
import json
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
    """Record a review and, in the same transaction, queue the verified report on every configured channel."""
    review = create_review(session, study_id, reviewer, label, findings, note, result_id)
    queue_reviewed_report(ctx, session, review, reviewer)
    return review


def queue_reviewed_report(ctx: ServiceContext, session: Session, review: Review, reviewer: Actor) -> list[Job]:
    """Queue the verified report of ``review`` on each configured channel (every channel has one); the delivery jobs."""
    outputs = ctx.settings.outputs
    study = session.get(Study, review.study_id)
    if review.action == "exclude":  # "not applicable / wrong body part / poor quality" is no verified finding to send
        return []
    channels = outputs.channels(study.source_format == "dicom") if study else []
    if not channels:
        return []
    try:
        images, reviewed_uid = _images(ctx, session, study, review)
        attestation = _attestation(ctx, session, review, reviewed_uid)
        blobs = {c: _build(ctx, session, c, study, images, attestation) for c in channels}
    except Exception as e:  # noqa: BLE001 - any builder failure is reported; the review itself stands
        log.exception("study %s: the reviewed report could not be built", study.id)
        record(session, reviewer, "deliver.build_failed", "study", study.id, review=review.id,
               error=f"{type(e).__name__}: {e}"[:500])
        return []
    return [ctx.queue.enqueue(session, "deliver", study.id, {"channel": c, "blobs": [blob], "review": review.id},
                              priority=60, max_attempts=outputs.max_attempts) for c, blob in blobs.items()]


def _images(ctx: ServiceContext, session: Session, study: Study, review: Review) -> tuple[list, str | None]:
    """The analysed images of the reviewed result's analysis, rebuilt from the stored results and sources."""
    from medsight.integration.results import AnalysedImage
    from medsight.predict.result import Prediction
    from medsight.serve.analysis import source_header, stand_in_header

    reviewed = session.get(Result, review.result_id)
    rows = session.execute(select(Result, Instance).join(Instance, Result.instance_id == Instance.id)
                           .where(Result.job_id == reviewed.job_id).order_by(Result.id)).all()
    facts = {"study_uid": study.study_uid, "modality": study.modality, "accession_number": study.accession_number}
    images, reviewed_uid = [], None
    for result, instance in rows:
        if study.source_format == "dicom":
            header = source_header(ctx.store.path_for(instance.file_sha256))
        else:  # PNG/JPEG: a stand-in header with the study's identity, one SOP Instance UID per image
            header = stand_in_header(facts)
            header.SOPInstanceUID = instance.sop_instance_uid or f"2.25.{instance.id}"
        prediction = Prediction(source=None, model=result.model, label=result.label, probabilities=dict(result.probabilities),
                                confidence=result.confidence, refer=result.refer, statement=result.statement,
                                heatmap_label=result.heatmap_label)
        images.append(AnalysedImage(prediction, header))
        if result.id == reviewed.id:
            reviewed_uid = str(header.SOPInstanceUID)
    return images, reviewed_uid


def _attestation(ctx: ServiceContext, session: Session, review: Review, reviewed_uid: str):  # noqa: ANN202
    from medsight.integration.results import ReviewAttestation

    user = session.get(User, review.reviewer_id)
    return ReviewAttestation(sop_instance_uid=reviewed_uid, label=review.label, action=review.action,
                             reviewer_name=(user.full_name or user.username)[:64],
                             organization=ctx.settings.outputs.organization, note=review.note)


def _build(ctx: ServiceContext, session: Session, channel: str, study: Study, images: list, attestation) -> str:  # noqa: ANN001
    if channel == "dicom":
        from medsight.integration.files import encode_part10
        from medsight.integration.sr import build_sr

        previous = _latest_blob(ctx, session, study.id, "dicom")
        predecessor = pydicom.dcmread(io.BytesIO(previous)) if previous is not None else None
        if predecessor is not None and predecessor.get("Modality") != "SR":
            predecessor = None
        return ctx.store.put_bytes(encode_part10(build_sr(images, review=attestation, predecessor=predecessor)))
    if channel == "hl7":
        from medsight.integration.hl7 import build_oru_r01, to_er7

        outputs = ctx.settings.outputs
        msg = build_oru_r01(images, sending_facility=outputs.hl7_sending_facility,
                            receiving_application=outputs.hl7_receiving_application, review=attestation)
        return ctx.store.put_bytes(to_er7(msg).encode("utf-8"))
    from medsight.integration.fhir import build_reviewed_fhir_bundle, bundle_json

    previous = _latest_blob(ctx, session, study.id, "fhir")
    preliminary = json.loads(previous) if previous is not None else None
    return ctx.store.put_bytes(bundle_json(build_reviewed_fhir_bundle(images, attestation, preliminary)).encode("utf-8"))


def _latest_blob(ctx: ServiceContext, session: Session, study_id: int, channel: str) -> bytes | None:
    """The first object of the most recent delivery on ``channel`` for this study (what a new version supersedes)."""
    jobs = session.execute(select(Job).where(Job.study_id == study_id, Job.kind == "deliver").order_by(Job.id.desc())).scalars()
    for job in jobs:
        if job.payload.get("channel") == channel and job.payload.get("blobs"):
            try:
                return ctx.store.read_bytes(job.payload["blobs"][0])
            except OSError:  # a missing blob: look further back
                continue
    return None


__all__ = ["submit_review", "queue_reviewed_report"]
