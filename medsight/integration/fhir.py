"""FHIR R4 result: a transaction Bundle with one DiagnosticReport, one Observation per finding and the Device.

Built with ``fhir.resources`` models (R4B, the technical correction of R4
whose DiagnosticReport/Observation/Device are the R4 ones), so constructing
the objects validates types, cardinalities and required elements.

Privacy: the payload names no patient. It carries no name, patient ID or
birth date and no ``subject``; the receiving system links the report to its
patient through the imaging study (Study Instance UID) and the order's
accession number, which it already holds.

Findings: ``conclusionCode`` and an Observation's ``interpretation`` carry
``Prediction.reported_finding`` only. A referred image's Observations are
interpreted "IND" (indeterminate, the v3 ObservationInterpretation code for a
result that can be neither called nor ruled out) and say they are the model's
uncertain output, and the conclusion carries the referral statement and what
the card says the model is for.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Sequence

from fhir.resources.R4B.bundle import Bundle
from fhir.resources.R4B.device import Device
from fhir.resources.R4B.diagnosticreport import DiagnosticReport
from fhir.resources.R4B.observation import Observation
from pydicom.dataset import Dataset

from medsight.integration.results import (
    CODING_SCHEME_URI,
    DISCLAIMER,
    MANUFACTURER,
    UNCERTAIN_OUTPUT,
    AnalysedImage,
    ReviewAttestation,
    check_one_study,
    label_code,
    model_context,
    model_name_version,
    not_analysed_statement,
    study_uid,
)
from medsight.errors import ResultExportError

UCUM = "http://unitsofmeasure.org"
DICOM_UID = "urn:dicom:uid"
OBS_CATEGORY = "http://terminology.hl7.org/CodeSystem/observation-category"
DIAG_SERVICE = "http://terminology.hl7.org/CodeSystem/v2-0074"
RESULT_ID_SYSTEM = "urn:medsight:result"  # our identifiers: stable across delivery retries of one bundle
ACCESSION_TYPE = {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "ACSN"}]}
INDETERMINATE = {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation",
                             "code": "IND", "display": "Indeterminate"}]}


def _urn() -> str:
    return f"urn:uuid:{uuid.uuid4()}"


def _create(resource_type: str, url: str, resource) -> dict:  # noqa: ANN001 - a fhir.resources model
    """A transaction entry that creates ``resource`` only if no resource with its MedSight identifier exists.

    Delivery is at-least-once (a retry after a lost reply re-POSTs the bundle);
    FHIR conditional create (``ifNoneExist``) makes the re-POST a no-op on the server.
    """
    ident = next(i for i in resource.identifier if i.system == RESULT_ID_SYSTEM)
    return {"fullUrl": url, "resource": resource,
            "request": {"method": "POST", "url": resource_type, "ifNoneExist": f"identifier={RESULT_ID_SYSTEM}|{ident.value}"}}


def _identifier(bundle_id: str, part: str) -> dict:
    return {"system": RESULT_ID_SYSTEM, "value": f"{bundle_id}-{part}"}


def _finding(label: str) -> dict:
    return {"coding": [{"system": CODING_SCHEME_URI, "code": label_code(label), "display": label}], "text": label}


def build_fhir_bundle(images: Sequence[AnalysedImage], issued: dt.datetime | None = None) -> Bundle:
    """Transaction Bundle: Device, Observations (probability of each label per image), DiagnosticReport."""
    uid = check_one_study(images)
    issued = issued or dt.datetime.now(dt.timezone.utc)
    name, version = model_name_version(images[0].prediction)
    bundle_id = str(uuid.uuid4())
    study_ref = _study_ref(uid)
    device_url = _urn()
    device = Device.model_validate({
        "resourceType": "Device", "manufacturer": MANUFACTURER,
        "identifier": [_identifier(bundle_id, "device")],
        "deviceName": [{"name": f"{MANUFACTURER} {name}", "type": "model-name"}],
        "version": [{"value": version}],
        "note": [{"text": DISCLAIMER}],
    })
    entries: list[dict] = [_create("Device", device_url, device)]
    observation_urls = []
    for k, analysed in enumerate(images):
        p = analysed.prediction
        finding = p.reported_finding
        instance = str(analysed.source.get("SOPInstanceUID", ""))
        where = f"SOP Instance {instance}" + (f" frame {analysed.frame_number}" if analysed.frame_number else "")
        for j, (label, prob) in enumerate(p.probabilities.items()):
            obs = Observation.model_validate({
                "resourceType": "Observation", "status": "preliminary",
                "identifier": [_identifier(bundle_id, f"obs-{k}-{j}")],
                "category": [{"coding": [{"system": OBS_CATEGORY, "code": "imaging", "display": "Imaging"}]}],
                "code": {"coding": [{"system": CODING_SCHEME_URI, "code": f"P-{label_code(label)}", "display": f"Probability of {label}"}],
                         "text": f"Probability of {label}"},
                "valueQuantity": {"value": round(float(prob), 6), "unit": "1", "system": UCUM, "code": "1"},
                "interpretation": [_finding(label)] if label == finding else [INDETERMINATE] if p.refer else None,
                "issued": issued.isoformat(),
                "device": {"reference": device_url},
                "derivedFrom": [{**study_ref, "display": where}],
                "note": [{"text": " ".join([p.statement, *([UNCERTAIN_OUTPUT] if p.refer else []), f"{DISCLAIMER}."])}]
                if label == p.label or p.refer else None,
            })
            url = _urn()
            observation_urls.append(url)
            entries.append(_create("Observation", url, obs))
    findings = [f for f in dict.fromkeys(a.prediction.reported_finding for a in images) if f is not None]
    statements = [*dict.fromkeys(a.prediction.statement for a in images), *model_context(images[0].card)]
    report = _report(bundle_id, uid, images[0].source, "preliminary", f"AI image analysis ({name} {version})",
                     label_code(name), f"{MANUFACTURER} {name} {version}", issued, " ".join(statements) + f" {DISCLAIMER}.")
    report.update({"result": [{"reference": u} for u in observation_urls],
                   "conclusionCode": [_finding(f) for f in findings] or None})
    entries.append(_create("DiagnosticReport", _urn(), DiagnosticReport.model_validate(report)))
    return Bundle.model_validate({"resourceType": "Bundle", "type": "transaction", "entry": entries})


def build_not_analysed_fhir_bundle(sources: Sequence[Dataset], reason: str, issued: dt.datetime | None = None) -> Bundle:
    """The notice for a study no model was run on (``reason``: routing's "not analysed: ..." message).

    A DiagnosticReport with status ``cancelled`` ("unavailable because the measurement was not started",
    FHIR R4) and the reason as its conclusion: no Observation, no conclusionCode, nothing a receiver could
    take for a finding. ``sources``: the study's image headers (pydicom Datasets).
    """
    if not sources:
        raise ResultExportError("no source images: nothing to report")
    report = _report(str(uuid.uuid4()), study_uid(sources), sources[0], "cancelled", "AI image analysis: not analysed",
                     "NOT-ANALYSED", f"{MANUFACTURER} AI image analysis", issued or dt.datetime.now(dt.timezone.utc),
                     not_analysed_statement(reason))
    entries = [_create("DiagnosticReport", _urn(), DiagnosticReport.model_validate(report))]
    return Bundle.model_validate({"resourceType": "Bundle", "type": "transaction", "entry": entries})


def _study_ref(uid: str) -> dict:
    return {"type": "ImagingStudy", "identifier": {"system": DICOM_UID, "value": f"urn:oid:{uid}"}}


def _report(bundle_id: str, uid: str, source: Dataset, status: str, text: str, code: str, display: str,
            issued: dt.datetime, conclusion: str) -> dict:
    """A DiagnosticReport (as a dict) about study ``uid``, identified by ours and by the source's accession number."""
    report: dict = {
        "resourceType": "DiagnosticReport", "status": status,
        "identifier": [_identifier(bundle_id, "report")],
        "category": [{"coding": [{"system": DIAG_SERVICE, "code": "RAD", "display": "Radiology"}]}],
        "code": {"coding": [{"system": CODING_SCHEME_URI, "code": code, "display": display}], "text": text},
        "issued": issued.isoformat(),
        "imagingStudy": [_study_ref(uid)],
        "conclusion": conclusion,
    }
    accession = str(source.get("AccessionNumber", "") or "").strip()
    if accession:
        report["identifier"].append({"type": ACCESSION_TYPE, "value": accession})
    return report


def build_reviewed_fhir_bundle(images: Sequence[AnalysedImage], review: ReviewAttestation,
                               preliminary: dict | None = None, issued: dt.datetime | None = None) -> Bundle:
    """The reader-verified DiagnosticReport: status ``final``, the reader as results interpreter.

    With ``preliminary`` (the transaction Bundle sent after analysis, as JSON) the report is a
    conditional update of that very report (``PUT DiagnosticReport?identifier=...``), so the
    receiving system replaces the machine's preliminary report instead of holding two; its
    ``result`` points at the preliminary Observations by their identifiers (conditional
    references, resolved by the server). ``preliminary`` may also be an earlier review's
    bundle: a second review updates the same report again. Without it, a new report is created.
    """
    check_one_study(images)
    reviewed = next((a for a in images if str(a.source.get("SOPInstanceUID", "")) == review.sop_instance_uid), images[0])
    issued = issued or dt.datetime.now(dt.timezone.utc)
    if preliminary is None:
        fresh = build_fhir_bundle(images, issued)
        entries = [e.model_dump(exclude_none=True) for e in fresh.entry]
        report = next(e["resource"] for e in entries if e["resource"]["resourceType"] == "DiagnosticReport")
        target = next(e for e in entries if e["resource"] is report)
    else:
        entries = []
        old = [e for e in preliminary.get("entry", []) if e.get("resource", {}).get("resourceType") == "DiagnosticReport"]
        if len(old) != 1:
            raise ResultExportError("the preliminary FHIR bundle holds no single DiagnosticReport to update")
        report = {k: v for k, v in old[0]["resource"].items() if k not in ("id", "meta")}
        obs_ids = [_result_identifier(e["resource"]) for e in preliminary["entry"]
                   if e.get("resource", {}).get("resourceType") == "Observation"]
        if obs_ids:  # else ``preliminary`` is an earlier review's update, whose references are already conditional
            report["result"] = [{"reference": f"Observation?identifier={RESULT_ID_SYSTEM}|{v}"} for v in obs_ids]
        target = {"fullUrl": _urn(), "resource": report}
        entries.append(target)
    ident = _result_identifier(report)
    report.update({
        "status": "final", "issued": issued.isoformat(),
        "resultsInterpreter": [{"display": review.reviewer_name.replace("^", " ").strip()}],
        "conclusion": f"{review.statement(reviewed.prediction.reported_finding)} Model: {reviewed.prediction.statement}",
        "conclusionCode": [_finding(review.label)],
    })
    target["resource"] = DiagnosticReport.model_validate(report)
    target["request"] = {"method": "PUT", "url": f"DiagnosticReport?identifier={RESULT_ID_SYSTEM}|{ident}"}
    return Bundle.model_validate({"resourceType": "Bundle", "type": "transaction", "entry": entries})


def _result_identifier(resource: dict) -> str:
    try:
        return next(i["value"] for i in resource.get("identifier", []) if i.get("system") == RESULT_ID_SYSTEM)
    except StopIteration:
        raise ResultExportError(f"a {resource.get('resourceType')} without a MedSight identifier cannot be updated") from None


class FhirPostError(ResultExportError):
    """The FHIR server did not take the bundle; ``permanent`` when resending it cannot help (4xx but 408/429)."""

    def __init__(self, message: str, permanent: bool = False):
        super().__init__(message)
        self.permanent = permanent


def bundle_json(bundle: Bundle) -> str:
    return bundle.model_dump_json(exclude_none=True)


def post_bundle(bundle: Bundle | str | bytes, endpoint: str, timeout: float = 30.0, session=None) -> dict:
    """POST the transaction to a FHIR server base URL; returns the server's response Bundle as a dict.

    ``bundle`` may be the model or its JSON (as stored by the service between delivery attempts).
    """
    import requests

    data = bundle_json(bundle) if isinstance(bundle, Bundle) else bundle
    http = session or requests
    try:
        r = http.post(endpoint.rstrip("/"), data=data,
                      headers={"Content-Type": "application/fhir+json", "Accept": "application/fhir+json"}, timeout=timeout)
    except requests.RequestException as exc:
        raise FhirPostError(f"FHIR endpoint {endpoint} unreachable: {exc}") from exc
    if r.status_code >= 300:
        permanent = 400 <= r.status_code < 500 and r.status_code not in (408, 429)
        raise FhirPostError(f"FHIR endpoint {endpoint} answered {r.status_code}: {r.text[:300]}", permanent=permanent)
    try:
        return r.json() if r.content else {}
    except ValueError:
        return {}


__all__ = ["build_fhir_bundle", "build_not_analysed_fhir_bundle", "build_reviewed_fhir_bundle", "post_bundle", "bundle_json", "FhirPostError", "RESULT_ID_SYSTEM"]
