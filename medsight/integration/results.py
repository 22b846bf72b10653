"""What every result writer (SR, Secondary Capture, FHIR, HL7) shares: the analysed images and local codes.

A study result is a list of :class:`AnalysedImage`: the one
:class:`~medsight.predict.result.Prediction` the Predictor made for an image,
paired with that image's DICOM header, so every output can reference the
exact source instance (and frame) it is about.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from pydicom.dataset import Dataset

from medsight.errors import ResultExportError
from medsight.predict.result import Prediction

DISCLAIMER = "AI result - not for primary diagnosis"
MANUFACTURER = "MedSight"
# Private coding scheme for model labels: card labels are free text
# ("pneumonia", "benign"), and PS3.16 reserves "99" designators for local codes.
CODING_SCHEME = "99MEDSIGHT"
CODING_SCHEME_URI = "urn:medsight:finding"


@dataclass
class AnalysedImage:
    prediction: Prediction
    source: Dataset  # the image's data set (header suffices for SR/FHIR/HL7)

    @property
    def frame_number(self) -> int | None:
        """1-based frame number for multi-frame sources (DICOM numbers frames from 1)."""
        image = self.prediction.image
        n = int(self.source.get("NumberOfFrames", 1) or 1)
        if n <= 1 or image is None or image.meta.get("frame_index") is None:
            return None
        return int(image.meta["frame_index"]) + 1


@dataclass(frozen=True)
class ReviewAttestation:
    """A human reader's verdict on one analysed image, for the verified version of a result.

    ``sop_instance_uid``: the reviewed source image; ``label``: the reader's finding (one of
    the model's labels); ``action``: "confirm" or "correct"; ``reviewer_name`` in DICOM PN
    form ("Family^Given").
    """

    sop_instance_uid: str
    label: str
    action: str
    reviewer_name: str
    organization: str
    note: str = ""

    def statement(self, model_label: str) -> str:
        verdict = (f"confirmed the model's finding '{model_label}'" if self.action == "confirm"
                   else f"corrected the model's finding '{model_label}' to '{self.label}'")
        text = f"Reviewed by {self.reviewer_name.replace('^', ' ').strip()}: {verdict}."
        return f"{text} Note: {self.note}" if self.note else text


def model_name_version(prediction: Prediction) -> tuple[str, str]:
    name, _, version = prediction.model.partition("@")
    return name, version or "unknown"


def label_code(label: str) -> str:
    """A code value (SH, 16 chars) for a model label: stable, readable, VR-conformant."""
    code = re.sub(r"[^A-Za-z0-9]+", "-", label).strip("-").upper()
    return (code or "UNLABELLED")[:16]


def check_one_study(images: Sequence[AnalysedImage]) -> str:
    """Every writer puts its result into the source study; mixing studies is a caller error."""
    if not images:
        raise ResultExportError("no analysed images: nothing to report")
    uids = {str(a.source.get("StudyInstanceUID", "")) for a in images}
    if len(uids) != 1 or "" in uids:
        raise ResultExportError(f"analysed images must come from exactly one study with a Study Instance UID, got {sorted(uids)}")
    models = {a.prediction.model for a in images}
    if len(models) != 1:
        raise ResultExportError(f"one result object per model, got {sorted(models)}")
    return uids.pop()


def next_series_number(images: Sequence[AnalysedImage], offset: int) -> int:
    """A series number above the source series (viewers sort by it; collisions confuse readers)."""
    numbers = [int(a.source.get("SeriesNumber") or 0) for a in images if str(a.source.get("SeriesNumber") or "").strip().lstrip("-").isdigit()]
    return max(numbers, default=0) + offset


def carry_deidentification(result, source) -> None:
    """A result inherits Patient Identity Removed from its source; the Patient Module then
    requires De-identification Method (Type 1C). Copy the source's, or say where it came from."""
    if str(result.get("PatientIdentityRemoved", "")).upper() != "YES":
        return
    for kw in ("DeidentificationMethod", "DeidentificationMethodCodeSequence"):
        if kw in source and kw not in result:
            result[kw] = source[kw]
    if "DeidentificationMethod" not in result and "DeidentificationMethodCodeSequence" not in result:
        result.DeidentificationMethod = "De-identified before MedSight received the source images"
