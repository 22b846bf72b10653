"""HL7 v2.5 ORU^R01 result message (hl7apy) for RIS/HIS without FHIR.

Layout: MSH; one ORDER_OBSERVATION group with OBR (filler order number =
accession number, universal service ID = the model, result status P =
preliminary); OBX per label (NM, probability, UCUM unit "1"), an OBX (CWE)
with the reported finding, one (ST) with the Study Instance UID so the RIS
can link the result to the images, one (TX) with the confidence statement;
NTE (after OBR) with the disclaimer.

An image without a reported finding (``Prediction.reported_finding`` is None:
referred, or nothing found) has no finding OBX; a referred image's probability
OBXs are named as the model's uncertain output, because a RIS lists OBX rows
as result lines and "probability of <label> 0.97" alone reads as a finding.

A study no model applies to gets no message: an ORU^R01 on the order's
accession number is a result for the radiologist's own order, and a RIS may
file or close that order on it; the order simply stays open for its reader.

After a radiologist's review the same order is sent again with result status
F (confirmed) or C (corrected) in OBR-25 and every OBX-11, plus, for the
reviewed image, the reader's finding (CWE) and the review statement (TX):
a RIS replaces the preliminary result of that filler order number.

Privacy: no PID segment (it is optional in ORU^R01), so no patient name, ID
or birth date; the receiver matches on the accession number it issued.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Sequence

from hl7apy.core import Message

from medsight.integration.results import (
    CODING_SCHEME,
    DISCLAIMER,
    MANUFACTURER,
    AnalysedImage,
    ReviewAttestation,
    check_one_study,
    label_code,
    model_name_version,
)

HL7_VERSION = "2.5"


def _escape(text: str) -> str:
    """HL7 escape sequences for the delimiters, so free text cannot break the message structure."""
    return (text.replace("\\", "\\E\\").replace("|", "\\F\\").replace("^", "\\S\\").replace("&", "\\T\\")
            .replace("~", "\\R\\").replace("\r", " ").replace("\n", " "))


def build_oru_r01(images: Sequence[AnalysedImage], sending_facility: str = "HOSPITAL", receiving_application: str = "RIS",
                  receiving_facility: str = "HOSPITAL", control_id: str | None = None,
                  now: dt.datetime | None = None, review: ReviewAttestation | None = None) -> Message:
    study_uid = check_one_study(images)
    status = "P" if review is None else ("C" if review.action == "correct" else "F")  # HL7 table 0123 / 0085
    now = now or dt.datetime.now(dt.timezone.utc)
    ts = now.strftime("%Y%m%d%H%M%S")
    name, version = model_name_version(images[0].prediction)
    msg = Message("ORU_R01", version=HL7_VERSION)
    msg.msh.msh_3 = MANUFACTURER.upper()
    msg.msh.msh_4 = _escape(sending_facility)
    msg.msh.msh_5 = _escape(receiving_application)
    msg.msh.msh_6 = _escape(receiving_facility)
    msg.msh.msh_7 = ts
    msg.msh.msh_9 = "ORU^R01^ORU_R01"
    msg.msh.msh_10 = control_id or uuid.uuid4().hex[:20]
    msg.msh.msh_11 = "P"
    msg.msh.msh_12 = HL7_VERSION

    order = msg.add_group("ORU_R01_PATIENT_RESULT").add_group("ORU_R01_ORDER_OBSERVATION")
    obr = order.add_segment("OBR")
    obr.obr_1 = "1"
    accession = str(images[0].source.get("AccessionNumber", "") or "").strip()
    if accession:
        obr.obr_3 = _escape(accession)
    obr.obr_4 = f"{label_code(name)}^{_escape(f'{MANUFACTURER} {name} {version}')}^{CODING_SCHEME}"
    obr.obr_7 = ts
    obr.obr_22 = ts
    obr.obr_25 = status
    nte = order.add_segment("NTE")  # notes on the order follow OBR directly (before the observations)
    nte.nte_1 = "1"
    nte.nte_3 = DISCLAIMER

    set_id = 0

    def obx(value_type: str, code: str, text: str, value: str, units: str = "") -> None:
        nonlocal set_id
        set_id += 1
        seg = order.add_group("ORU_R01_OBSERVATION").add_segment("OBX")
        seg.obx_1 = str(set_id)
        seg.obx_2 = value_type
        seg.obx_3 = f"{code}^{_escape(text)}^{CODING_SCHEME}"
        seg.obx_5 = value
        if units:
            seg.obx_6 = units
        seg.obx_11 = status
        seg.obx_14 = ts

    obx("ST", "STUDY-UID", "Study Instance UID", study_uid)
    for i, analysed in enumerate(images, start=1):
        p = analysed.prediction
        obx("ST", "SOP-UID", f"Image {i} SOP Instance UID", str(analysed.source.get("SOPInstanceUID", "")))
        finding = p.reported_finding
        if finding is not None:
            obx("CWE", "FINDING", f"Image {i} finding", f"{label_code(finding)}^{_escape(finding)}^{CODING_SCHEME}")
        uncertain = " (uncertain model output, not a finding)" if p.refer else ""
        for label, prob in p.probabilities.items():
            obx("NM", f"P-{label_code(label)}"[:16], f"Image {i} probability of {label}{uncertain}", f"{float(prob):.6f}",
                "1^no units^UCUM")
        obx("NM", "CONFIDENCE", f"Image {i} calibrated confidence", f"{float(p.confidence):.6f}", "1^no units^UCUM")
        obx("ST", "REFER", f"Image {i} refer to human reader", "Y" if p.refer else "N")
        obx("TX", "STATEMENT", f"Image {i} confidence statement", _escape(p.statement))
        if review is not None and str(analysed.source.get("SOPInstanceUID", "")) == review.sop_instance_uid:
            obx("CWE", "READER-FINDING", f"Image {i} finding of the human reader",
                f"{label_code(review.label)}^{_escape(review.label)}^{CODING_SCHEME}")
            obx("TX", "REVIEW", f"Image {i} review", _escape(review.statement(finding)))
    return msg


def to_er7(msg: Message) -> str:
    """The wire form; segments end with CR as HL7 requires (MLLP framing is the transport's job)."""
    return msg.to_er7()


__all__ = ["build_oru_r01", "to_er7", "HL7_VERSION"]
