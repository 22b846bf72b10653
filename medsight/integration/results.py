"""What every result writer (SR, Secondary Capture, FHIR, HL7) shares: the analysed images and local codes.

A study result is a list of :class:`AnalysedImage`: the one
:class:`~medsight.predict.result.Prediction` the Predictor made for an image,
paired with that image's DICOM header, so every output can reference the
exact source instance (and frame) it is about, and with the model's card, so
every output can say what the model is for.

What a result headlines is ``Prediction.reported_finding`` and nothing else: a
referred image, or one with no finding, reaches a PACS or RIS with the referral
statement and no finding code (docs/pacs-integration.md).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from pydicom.dataset import Dataset

from medsight.errors import ResultExportError
from medsight.models.card import ModelCard
from medsight.predict.result import Prediction

DISCLAIMER = "AI result - not for primary diagnosis"
MANUFACTURER = "MedSight"
# Private coding scheme for model labels: card labels are free text
# ("pneumonia", "benign"), and PS3.16 reserves "99" designators for local codes.
CODING_SCHEME = "99MEDSIGHT"
CODING_SCHEME_URI = "urn:medsight:finding"
#: with the probabilities of an image without a reported finding: they stay in the record (a reader who
#: disagrees, an audit and post-market surveillance need what the model computed) but say what they are
UNCERTAIN_OUTPUT = "The probabilities are the model's uncertain output, not a finding."


@dataclass
class AnalysedImage:
    prediction: Prediction
    source: Dataset  # the image's data set (header suffices for SR/FHIR/HL7)
    card: ModelCard | None = None  # the model's card: its intended use and ages go into the SR and FHIR report

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

    def statement(self, model_finding: str | None) -> str:
        """What the reader did to the model's ``reported_finding`` (None: the model reported none)."""
        if model_finding is None:
            verdict = f"found '{self.label}' where the model reported no finding"
        else:
            verdict = (f"confirmed the model's finding '{model_finding}'" if self.action == "confirm"
                       else f"corrected the model's finding '{model_finding}' to '{self.label}'")
        text = f"Reviewed by {self.reviewer_name.replace('^', ' ').strip()}: {verdict}."
        return f"{text} Note: {self.note}" if self.note else text


def model_name_version(prediction: Prediction) -> tuple[str, str]:
    name, _, version = prediction.model.partition("@")
    return name, version or "unknown"


def model_context(card: ModelCard | None) -> list[str]:
    """What the card says a result is for, one sentence each: its intended use and the patient ages it
    applies to (its limitations where the card declares no applicability). A reader of any result,
    a referred one above all, needs to know where the model may be trusted."""
    if card is None:
        return []
    lines = [f"Intended use: {card.intended_use}"] if card.intended_use.strip() else []
    ages = card.applicability.age_years if card.applicability else None
    if ages is not None:
        lo, hi = ages.min_years, ages.max_years
        span = (f"{lo:g} to {hi:g} years" if lo is not None and hi is not None
                else f"{lo:g} years and older" if lo is not None else f"up to {hi:g} years")
        lines.append(f"Applicable patient ages: {span}.")
    if card.applicability is None and card.limitations:
        lines.append("Limitations: " + "; ".join(card.limitations))
    return lines


def not_analysed_statement(reason: str) -> str:
    """The sentence a not-analysed study's notice carries; ``reason`` is why, as routing says it
    ("not analysed: no model applies (SHOULDER MR): ...")."""
    text = " ".join(reason.split()).rstrip(".") or "no model applies"
    if not text.lower().startswith("not analysed"):
        text = f"not analysed: {text}"
    return f"{text[0].upper()}{text[1:]}. No AI result will follow for this study."


def label_code(label: str) -> str:
    """A code value (SH, 16 chars) for a model label: stable, readable, VR-conformant."""
    code = re.sub(r"[^A-Za-z0-9]+", "-", label).strip("-").upper()
    return (code or "UNLABELLED")[:16]


def check_one_study(images: Sequence[AnalysedImage]) -> str:
    """Every writer puts its result into the source study; mixing studies is a caller error."""
    if not images:
        raise ResultExportError("no analysed images: nothing to report")
    uid = study_uid([a.source for a in images])
    models = {a.prediction.model for a in images}
    if len(models) != 1:
        raise ResultExportError(f"one result object per model, got {sorted(models)}")
    return uid


def study_uid(sources: Sequence[Dataset]) -> str:
    """The one Study Instance UID of ``sources`` (the headers of a study's images)."""
    uids = {str(ds.get("StudyInstanceUID", "")) for ds in sources}
    if len(uids) != 1 or "" in uids:
        raise ResultExportError(f"the images must come from exactly one study with a Study Instance UID, got {sorted(uids)}")
    return uids.pop()


def next_series_number(sources: Sequence[Dataset], offset: int) -> int:
    """A series number above the source series (viewers sort by it; collisions confuse readers)."""
    numbers = [int(ds.get("SeriesNumber") or 0) for ds in sources if str(ds.get("SeriesNumber") or "").strip().lstrip("-").isdigit()]
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
