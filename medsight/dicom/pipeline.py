"""The default study-complete callback: Predictor -> SR + overlay Secondary Captures -> outbox -> PACS.

Inference goes through :class:`~medsight.predict.predictor.Predictor` (the
one inference path); this module only chooses which received instances to
analyse and where the results go. The service (issue 5) can replace the
whole callback with one that enqueues a job and calls :func:`analyse_study`
from its worker.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import pydicom

from medsight.dicom.files import atomic_write_dataset
from medsight.dicom.listener import ReceivedStudy
from medsight.dicom.results import MANUFACTURER, AnalysedImage
from medsight.predict.result import PredictionError

log = logging.getLogger("medsight.dicom.pipeline")


@dataclass
class StudyResultFiles:
    study_instance_uid: str
    sr: Path | None = None
    secondary_captures: list[Path] = field(default_factory=list)
    analysed: int = 0
    skipped: list[str] = field(default_factory=list)  # "<SOP Instance UID>: reason" (no patient data)

    def __str__(self) -> str:
        return f"{self.analysed} analysed, SR {'written' if self.sr else 'not written'}, {len(self.secondary_captures)} overlays, {len(self.skipped)} skipped"


def is_own_output(ds: pydicom.Dataset) -> bool:
    """Our SR/SC sent back to a PACS may be routed to us again; never analyse them (loops)."""
    return str(ds.get("Manufacturer", "")) == MANUFACTURER


def analyse_study(files: list[Path], predictor, out_dir: Path) -> StudyResultFiles:
    """Analyse every image instance of one study and write the SR and overlay series under ``out_dir``."""
    from medsight.dicom.secondary_capture import build_overlay_series
    from medsight.dicom.sr import build_sr

    headers, inputs = [], []
    result = StudyResultFiles(study_instance_uid="")
    for f in files:
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        result.study_instance_uid = str(ds.StudyInstanceUID)
        if is_own_output(ds):
            result.skipped.append(f"{ds.SOPInstanceUID}: MedSight output")
            continue
        headers.append(ds)
        inputs.append(str(f))
    analysed = []
    for ds, pred in zip(headers, predictor.predict_many(inputs, explain=True)):
        if isinstance(pred, PredictionError):
            result.skipped.append(f"{ds.SOPInstanceUID}: {pred.kind}")
            log.warning("instance %s of study %s not analysed: %s", ds.SOPInstanceUID, ds.StudyInstanceUID, pred.kind)
            continue
        analysed.append(AnalysedImage(pred, ds))
    result.analysed = len(analysed)
    if not analysed:
        return result
    study_dir = out_dir / result.study_instance_uid
    sr = build_sr(analysed)
    result.sr = atomic_write_dataset(sr, study_dir / f"sr-{sr.SOPInstanceUID}.dcm")
    for sc in build_overlay_series(analysed):
        result.secondary_captures.append(atomic_write_dataset(sc, study_dir / f"sc-{sc.SOPInstanceUID}.dcm"))
    return result


class DefaultStudyCallback:
    """Load the model once; on each complete study analyse it and queue SR + SCs for the destination."""

    def __init__(self, data_dir: Path, model: str, dest: str | None = None, ae_title: str = "MEDSIGHT",
                 predictor=None, outbox=None):
        self.data_dir = Path(data_dir)
        self.model = model
        self._predictor = predictor
        self.outbox = outbox
        if outbox is None and dest:
            from medsight.dicom.sender import Outbox, parse_destination

            self.outbox = Outbox(self.data_dir / "outbox", parse_destination(dest), calling_aet=ae_title)

    @property
    def predictor(self):
        if self._predictor is None:
            from medsight import load_model

            self._predictor = load_model(self.model)
        return self._predictor

    def __call__(self, study: ReceivedStudy) -> StudyResultFiles:
        result = analyse_study(study.files, self.predictor, self.data_dir / "results")
        log.info("study %s: %s", study.study_instance_uid, result)
        if self.outbox is not None and result.sr is not None:
            for path in [result.sr, *result.secondary_captures]:
                self.outbox.put_file(path)
            report = self.outbox.flush()
            log.info("study %s: sent %d result objects, %d waiting for retry", study.study_instance_uid, report.sent, report.pending)
        return result


def build_default_callback(data_dir: Path, model: str, dest: str | None = None, ae_title: str = "MEDSIGHT") -> DefaultStudyCallback:
    return DefaultStudyCallback(data_dir, model, dest, ae_title)


__all__ = ["analyse_study", "DefaultStudyCallback", "build_default_callback", "StudyResultFiles", "is_own_output"]
