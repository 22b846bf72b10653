"""The DICOM gateway's study-complete step: a received study becomes a queued study of the service.

The listener only receives and groups instances. When a study is complete it
is handed to the service exactly as a web upload is (:func:`medsight.serve.ingest.ingest_files`):
the same validation, the same durable ``analyse`` job, the same workers, the
same one inference path (:class:`~medsight.predict.predictor.Predictor`). The
worker that analyses the study also builds the SR, the overlay Secondary
Captures, the FHIR and HL7 messages the site configured, and queues their
delivery as ``deliver`` jobs with retry (:mod:`medsight.integration.delivery`).

A study no installed model applies to is stored all the same, "not analysed" with the reason (the
service's worklist shows it; no analysis job). An instance that arrives after its study was handed over (the sender was slower
than the idle timeout) is not dropped: it joins the service's study and the study
is analysed again (:func:`medsight.serve.ingest.add_instances`).
"""

from __future__ import annotations

import logging
from pathlib import Path

import pydicom

from medsight.gateway.listener import ReceivedStudy, StudyOutcome
from medsight.integration.results import MANUFACTURER

log = logging.getLogger("medsight.gateway.pipeline")

# (0040,1003) Requested Procedure Priority / (0040,0003)-style free text -> the worklist's priorities
_DICOM_PRIORITY = {"STAT": "stat", "HIGH": "urgent", "URGENT": "urgent", "ASAP": "urgent"}


def is_own_output(ds: pydicom.Dataset) -> bool:
    """Our SR/SC sent back to a PACS may be routed to us again; never analyse them (loops)."""
    return str(ds.get("Manufacturer", "")) == MANUFACTURER


def requested_priority(ds: pydicom.Dataset) -> str:
    """The order's priority when the modality recorded one (Requested Procedure Priority), else routine."""
    value = str(ds.get("RequestedProcedurePriority", "") or "").strip().upper()
    return _DICOM_PRIORITY.get(value, "routine")


def analysable_instances(files: list[Path]) -> tuple[list[Path], list[pydicom.Dataset], list[str]]:
    """Instances worth analysing (images that are not our own output), their headers, and why others were skipped."""
    keep, headers, skipped = [], [], []
    for f in files:
        ds = pydicom.dcmread(f, defer_size=1024, force=True)  # large values (pixels) are not loaded
        uid = str(ds.get("SOPInstanceUID", f.name))
        if is_own_output(ds):
            skipped.append(f"{uid}: MedSight output")
        elif "PixelData" not in ds and "FloatPixelData" not in ds:
            skipped.append(f"{uid}: no pixel data")
        else:
            keep.append(f)
            headers.append(ds)
    return keep, headers, skipped


class ServiceStudyCallback:
    """Queue each complete study in the service (``ctx``: a :class:`~medsight.serve.context.ServiceContext`)."""

    def __init__(self, ctx, model: str | None = None):  # noqa: ANN001 - avoids importing the service at module load
        self.ctx = ctx
        self.model = model

    def __call__(self, study: ReceivedStudy) -> StudyOutcome:
        from medsight.errors import DuplicateStudyError, MedSightError
        from medsight.serve.audit import Actor
        from medsight.serve.ingest import ingest_files

        files, headers, skipped = analysable_instances(study.files)
        for reason in skipped:
            log.info("study %s: skipped %s", study.study_instance_uid, reason)
        if not files:
            return StudyOutcome(f"nothing to analyse ({len(skipped)} instances skipped)")
        priority = max((requested_priority(h) for h in headers), key=("routine", "urgent", "stat").index)
        actor = Actor(f"dicom:{','.join(sorted(study.calling_aets)) or 'unknown'}", "system")
        try:
            queued = ingest_files(self.ctx, files, actor=actor, model=self.model, priority=priority)
        except DuplicateStudyError as e:
            return self._late(study, files, actor, e)
        except MedSightError as e:  # unreadable image, no model for the modality, ...: refused, listener keeps serving
            log.warning("study %s refused by the service: %s", study.study_instance_uid, e)
            return StudyOutcome(f"refused: {e}")
        if queued.status == "not_analysed":  # stored and on the worklist, with the reason; no analysis job
            log.info("study %s stored as service study %s, %s", study.study_instance_uid, queued.id,
                     queued.not_analysed_reason)
            return StudyOutcome(f"stored as study {queued.id}, {queued.not_analysed_reason}", handed_off=True)
        log.info("study %s queued as service study %s (%s, %d instances)", study.study_instance_uid, queued.id,
                 queued.model, len(files))
        # ingest_files stored its own copies in the same transaction as the job: the inbox copy may go
        return StudyOutcome(f"queued as study {queued.id} ({queued.model}, priority {priority})", handed_off=True)

    def _late(self, study: ReceivedStudy, files: list[Path], actor, duplicate: Exception) -> StudyOutcome:  # noqa: ANN001
        """Instances of a study the service already holds: they join it and it is analysed again."""
        from medsight.errors import MedSightError
        from medsight.serve.ingest import add_instances

        try:
            joined, added = add_instances(self.ctx, files, actor=actor)
        except MedSightError as e:
            log.warning("study %s: late instances refused by the service: %s", study.study_instance_uid, e)
            return StudyOutcome(f"late instances refused: {e}")
        if not added:
            log.info("study %s was already received: nothing new in it", study.study_instance_uid)
            return StudyOutcome(f"already in the service: {duplicate}")
        log.info("study %s: %d late instance(s) joined service study %s, analysed again", study.study_instance_uid, added,
                 joined.id)
        return StudyOutcome(f"{added} late instance(s) joined study {joined.id}; analysed again", handed_off=True)


__all__ = ["ServiceStudyCallback", "analysable_instances", "is_own_output", "requested_priority"]
