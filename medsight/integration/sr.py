"""DICOM Structured Report (TID 1500 Measurement Report in a Comprehensive SR) of a study's AI result.

One measurement group (TID 1501) per analysed image holds:
the reported finding (coded; only where ``Prediction.reported_finding`` names
one), the calibrated probability of every label (numeric, unit "1"), the
calibrated confidence of the reported decision, whether the model refers the
case to a human, the confidence statement and the disclaimer (TEXT), the
algorithm name and version (TID 4019), and a reference to the exact source
instance (and frame). The report-level Qualitative Evaluations container holds
what the card says the model is for (intended use, applicable ages) as TEXT.
The SR goes into the source study (same Study Instance UID) as a new series.

A referred image's group has no finding: the referral is its coded evaluation
("Refer to human reader": Yes) and its statement says why. Its probabilities
stay as measurements, said in its text to be the model's uncertain output: a
reader who disagrees with the referral, an audit and post-market surveillance
need what the device computed, and a PACS shows measurements as numbers, not
as the finding a viewer lists for the group.
"""

from __future__ import annotations

from collections.abc import Sequence

import highdicom as hd
from highdicom.sr import CodedConcept
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

from medsight._version import __version__
from medsight.integration.results import (
    CODING_SCHEME,
    DISCLAIMER,
    MANUFACTURER,
    AnalysedImage,
    ReviewAttestation,
    UNCERTAIN_OUTPUT,
    carry_deidentification,
    check_one_study,
    label_code,
    model_context,
    model_name_version,
    next_series_number,
    not_analysed_statement,
    study_uid,
)
from medsight.errors import ResultExportError

# Codes from PS3.16 (DCM, SCT, UCUM) where one exists; local 99MEDSIGHT codes otherwise.
COMMENT = CodedConcept("121106", "DCM", "Comment")
QUALITATIVE_EVALUATIONS = CodedConcept("C0034375", "UMLS", "Qualitative Evaluations")  # TID 1500 row 10
IMAGING_PROCEDURE = CodedConcept("363679005", "SCT", "Imaging")
NO_UNITS = CodedConcept("1", "UCUM", "no units")
YES, NO = CodedConcept("373066001", "SCT", "Yes"), CodedConcept("373067005", "SCT", "No")
CONFIDENCE = CodedConcept("CONFIDENCE", CODING_SCHEME, "Calibrated confidence of reported finding")
REFER = CodedConcept("REFER", CODING_SCHEME, "Refer to human reader")
OOD = CodedConcept("OOD-SCORE", CODING_SCHEME, "Out-of-distribution score")
READER_FINDING = CodedConcept("READER-FINDING", CODING_SCHEME, "Finding of the human reader")
MODEL_USE = CodedConcept("MODEL-USE", CODING_SCHEME, "Intended use and limits of the model")
SR_SERIES_OFFSET = 900
REVIEWED_SR_SERIES_OFFSET = 910


def finding_concept(label: str) -> CodedConcept:
    return CodedConcept(label_code(label), CODING_SCHEME, label)


def probability_concept(label: str) -> CodedConcept:
    return CodedConcept(("P-" + label_code(label))[:16], CODING_SCHEME, f"Probability of {label}"[:64])


def build_sr(images: Sequence[AnalysedImage], series_instance_uid: str | None = None,
             sop_instance_uid: str | None = None, series_number: int | None = None,
             institution_name: str | None = None, review: ReviewAttestation | None = None,
             predecessor: Dataset | None = None) -> hd.sr.ComprehensiveSR:
    """The study's AI result as a Comprehensive SR with a TID 1500 Measurement Report.

    Without ``review`` the SR is the machine's preliminary, unverified result. With it, it is the
    verified version a reader signed off: Completion/Verification Flags COMPLETE/VERIFIED, the
    reader as Verifying Observer, Preliminary Flag FINAL, the reader's finding as a coded
    evaluation in the reviewed image's group, and ``predecessor`` (the preliminary SR) in the
    Predecessor Documents Sequence so a PACS viewer shows which report it supersedes.
    """
    check_one_study(images)
    if review is not None and review.sop_instance_uid not in {str(a.source.get("SOPInstanceUID", "")) for a in images}:
        raise ResultExportError(f"the reviewed image {review.sop_instance_uid} is not among the analysed images")
    name, version = model_name_version(images[0].prediction)
    groups = [_group(i, a, name, version, review) for i, a in enumerate(images, start=1)]
    verified = {"is_final": False, "is_verified": False} if review is None else {
        "is_final": True, "is_verified": True, "verifying_observer_name": review.reviewer_name,
        "verifying_organization": review.organization,
        "previous_versions": [predecessor] if predecessor is not None else None}
    sources = [a.source for a in images]
    return _document(
        sources, groups, model_context(images[0].card), f"{MANUFACTURER} {name}", f"{name} {version}",
        series_instance_uid=series_instance_uid or generate_uid(),
        series_number=series_number or next_series_number(
            sources, SR_SERIES_OFFSET if review is None else REVIEWED_SR_SERIES_OFFSET),
        sop_instance_uid=sop_instance_uid or generate_uid(), institution_name=institution_name,
        series_description=f"{DISCLAIMER} ({name})" if review is None else f"AI result reviewed by a reader ({name})",
        **verified)


def build_not_analysed_sr(sources: Sequence[Dataset], reason: str, series_instance_uid: str | None = None,
                          sop_instance_uid: str | None = None, institution_name: str | None = None) -> hd.sr.ComprehensiveSR:
    """The notice for a study no model was run on (``reason``: routing's "not analysed: ..." message).

    It has no finding, no probability and no algorithm: one group references the study's images and
    says why they were not analysed, so a reader who expects an AI result in the PACS learns that none
    will come rather than waiting for it. Whether a site wants the notice at all is the service's
    choice (docs/pacs-integration.md); a study without one is simply read without AI.
    """
    if not sources:
        raise ResultExportError("no source images: nothing to report")
    study_uid(sources)
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=hd.UID(), identifier="MedSight: not analysed"),
        source_images=[hd.sr.SourceImageForMeasurementGroup.from_source_image(ds) for ds in sources])
    group[0].ContentSequence.append(_text(not_analysed_statement(reason)))
    return _document(
        sources, [group], [], MANUFACTURER, f"medsight {__version__}",
        series_instance_uid=series_instance_uid or generate_uid(),
        series_number=next_series_number(sources, SR_SERIES_OFFSET), sop_instance_uid=sop_instance_uid or generate_uid(),
        institution_name=institution_name, series_description="AI: not analysed, no AI result for this study",
        is_final=False, is_verified=False)


def _document(sources: Sequence[Dataset], groups: list, notes: list[str], device_name: str, device_model: str,
              series_description: str, **attributes) -> hd.sr.ComprehensiveSR:
    """The Comprehensive SR around the measurement ``groups``; ``notes`` go into the report-level
    Qualitative Evaluations container (TID 1500), where text about the whole report belongs."""
    device = hd.sr.DeviceObserverIdentifyingAttributes(
        uid=hd.UID(), name=device_name[:64], manufacturer_name=MANUFACTURER, model_name=device_model[:64])
    context = hd.sr.ObservationContext(
        observer_device_context=hd.sr.ObserverContext(observer_type=codes.DCM.Device, observer_identifying_attributes=device))
    report = hd.sr.MeasurementReport(observation_context=context, procedure_reported=IMAGING_PROCEDURE,
                                     imaging_measurements=groups, title=codes.cid7021.ImagingMeasurementReport)
    if notes:
        evaluations = hd.sr.ContainerContentItem(name=QUALITATIVE_EVALUATIONS, relationship_type="CONTAINS")
        evaluations.ContentSequence = [_text(n, MODEL_USE) for n in notes]
        report[0].ContentSequence.append(evaluations)
    sr = hd.sr.ComprehensiveSR(
        evidence=list(sources), content=report[0], instance_number=1, manufacturer=MANUFACTURER, is_complete=True,
        series_description=series_description[:64], software_versions=f"medsight {__version__}", **attributes)
    sr.CodingSchemeIdentificationSequence = [local_coding_scheme()]
    carry_deidentification(sr, sources[0])
    return sr


def _text(value: str, name: CodedConcept = COMMENT) -> hd.sr.TextContentItem:
    return hd.sr.TextContentItem(name=name, value=value[:1024], relationship_type="CONTAINS")


def local_coding_scheme() -> Dataset:
    """Declares the private "99MEDSIGHT" designator, as PS3.3 C.12.1.1.4 asks for local schemes."""
    item = Dataset()
    item.CodingSchemeDesignator = CODING_SCHEME
    item.CodingSchemeName = "MedSight model labels and result concepts"
    item.CodingSchemeResponsibleOrganization = MANUFACTURER
    return item


def _group(index: int, analysed: AnalysedImage, name: str, version: str,
           review: ReviewAttestation | None = None) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    p = analysed.prediction
    finding = p.reported_finding
    reviewed = review is not None and review.sop_instance_uid == str(analysed.source.get("SOPInstanceUID", ""))
    algorithm = hd.sr.AlgorithmIdentification(name=name, version=version, manufacturer=MANUFACTURER)
    measurements = [
        hd.sr.Measurement(name=probability_concept(label), value=float(prob), unit=NO_UNITS)
        for label, prob in p.probabilities.items()
    ]
    measurements.append(hd.sr.Measurement(name=CONFIDENCE, value=float(p.confidence), unit=NO_UNITS))
    if p.ood_score is not None:
        measurements.append(hd.sr.Measurement(name=OOD, value=float(p.ood_score), unit=NO_UNITS))
    frame = analysed.frame_number
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=hd.UID(), identifier=f"MedSight result {index}"),
        finding_type=finding_concept(finding) if finding is not None else None,
        algorithm_id=algorithm,
        measurements=measurements,
        qualitative_evaluations=[hd.sr.QualitativeEvaluation(REFER, YES if p.refer else NO)]
        + ([hd.sr.QualitativeEvaluation(READER_FINDING, finding_concept(review.label))] if reviewed else []),
        source_images=[hd.sr.SourceImageForMeasurementGroup.from_source_image(
            analysed.source, referenced_frame_numbers=[frame] if frame else None)],
    )
    # TID 1501 has no free-text row; a TEXT "Comment" under the group container
    # is valid Comprehensive SR content and is where readers look for prose.
    texts = (p.statement, *((UNCERTAIN_OUTPUT,) if p.refer else ()), DISCLAIMER,
             *((review.statement(finding),) if reviewed else ()))
    group[0].ContentSequence.extend(_text(t) for t in texts)
    return group


__all__ = ["build_not_analysed_sr", "build_sr", "finding_concept", "probability_concept"]
