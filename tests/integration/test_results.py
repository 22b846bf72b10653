"""Result objects: SR and Secondary Capture checked by dcmtk/dicom3tools and re-read; FHIR and HL7 parsed back.

Expected values come from the Prediction objects the Predictor returned and
from the source DICOM headers, read independently of the writers.
"""

from __future__ import annotations

import copy
import dataclasses
import http.server
import json
import re
import subprocess
import threading
from pathlib import Path

import highdicom as hd
import numpy as np
import pytest
from PIL import Image
from pydicom.uid import ComprehensiveSRStorage, SecondaryCaptureImageStorage, generate_uid

from medsight.integration.fhir import build_fhir_bundle, build_not_analysed_fhir_bundle, post_bundle
from medsight.integration.hl7 import build_oru_r01, to_er7
from medsight.integration.results import CODING_SCHEME_URI, DISCLAIMER, UNCERTAIN_OUTPUT, AnalysedImage, ReviewAttestation
from medsight.integration.secondary_capture import (
    build_overlay_sc,
    build_overlay_series,
    caption_lines,
    caption_prose,
    render_overlay,
)
from medsight.integration.sr import build_not_analysed_sr, build_sr
from medsight.errors import ResultExportError
from medsight.explain.overlay import overlay_rgb
from medsight.models import policy
from medsight.models.card import AgeRange, Applicability, NeverGiven

from .conftest import DATA, read, tool

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _identified(analysed: AnalysedImage) -> AnalysedImage:
    """The same image with distinctive patient identifiers, to prove payloads leave them out."""
    src = copy.deepcopy(analysed.source)
    src.PatientName, src.PatientID, src.PatientBirthDate = "Doeverylong^Janexample", "PID-7734521", "19800417"
    src.AccessionNumber = "ACC20240001"
    return AnalysedImage(analysed.prediction, src)


def _ocr_words(pixels: np.ndarray, tmp_path: Path) -> str:
    Image.fromarray(pixels).save(tmp_path / "band.png")
    out = subprocess.run([tool("tesseract"), str(tmp_path / "band.png"), "-", "--psm", "6"], capture_output=True,
                         text=True, timeout=60)
    return out.stdout.lower()


INTENDED_USE = "Research on head CT slices; a second reader, never a sole diagnostic tool."
NOT_ANALYSED = ("not analysed: no model applies (SHOULDER MR): brain-tumor-mri: reads BRAIN/HEAD, not SHOULDER "
                "(BodyPartExamined 'SHOULDER')")


@pytest.fixture(scope="module")
def referred_study(ct_study, predictor) -> list[AnalysedImage]:
    """The CT study as the policy refers it: image 1 below a raised confidence floor, image 2 out of distribution.

    The card also states an intended use and an age range, which every referred result must carry.
    """
    card = predictor.card.model_copy(deep=True, update={
        "intended_use": INTENDED_USE, "ood": {"threshold": -1.0},
        "confidence": predictor.card.confidence.model_copy(update={"refer_below": 0.99})})
    card.applicability = Applicability(modalities=["CT"], body_parts=["HEAD"], age_years=AgeRange(min_years=18),
                                       never=NeverGiven(text="children"))
    out = []
    for analysed, ood in zip(ct_study, (None, 3.5)):
        p = analysed.prediction
        refer, statement = policy.referral(card, p.label, p.confidence, ood)
        assert refer and p.confidence < 0.99
        out.append(AnalysedImage(dataclasses.replace(p, refer=True, statement=statement, ood_score=ood), analysed.source, card))
    return out


def _labels(images: list[AnalysedImage]) -> set[str]:
    return {label for a in images for label in a.prediction.probabilities}


# --------------------------------------------------------------------------- SR


@pytest.fixture(scope="module")
def sr_file(ct_study, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("sr") / "sr.dcm"
    build_sr(ct_study).save_as(path)
    return path


def test_sr_is_in_the_source_study_and_holds_every_probability(sr_file: Path, ct_study) -> None:
    ds = read(sr_file)
    assert ds.SOPClassUID == ComprehensiveSRStorage
    assert ds.StudyInstanceUID == ct_study[0].source.StudyInstanceUID
    assert ds.SeriesInstanceUID != ct_study[0].source.SeriesInstanceUID
    assert ds.PatientID == ct_study[0].source.PatientID  # same patient as the images it reports on
    assert ds.CompletionFlag == "COMPLETE" and ds.VerificationFlag == "UNVERIFIED"
    sr = hd.sr.ComprehensiveSR.from_dataset(ds)
    groups = sr.content.get_image_measurement_groups()
    assert len(groups) == len(ct_study)
    for group, analysed in zip(groups, ct_study):
        p = analysed.prediction
        assert group.finding_type.meaning == p.label
        values = {m.name.meaning: m.value for m in group.get_measurements()}
        for label, prob in p.probabilities.items():
            assert values[f"Probability of {label}"] == pytest.approx(prob, abs=1e-9)
        assert values["Calibrated confidence of reported finding"] == pytest.approx(p.confidence, abs=1e-9)
        texts_by_name = {item.ConceptNameCodeSequence[0].CodeMeaning: item.TextValue
                         for item in group[0].ContentSequence if item.ValueType == "TEXT"}
        assert texts_by_name["Algorithm Name"] == p.model.split("@")[0]
        assert texts_by_name["Algorithm Version"] == p.model.split("@")[1]
        refs = group.source_images
        assert [r.referenced_sop_instance_uid for r in refs] == [analysed.source.SOPInstanceUID]
        texts = [item.TextValue for item in group[0].ContentSequence if item.ValueType == "TEXT"]
        assert p.statement in texts and DISCLAIMER in texts
    # the evidence sequence lists exactly the analysed instances
    evidence = {i.ReferencedSOPInstanceUID for s in ds.CurrentRequestedProcedureEvidenceSequence
                for se in s.ReferencedSeriesSequence for i in se.ReferencedSOPSequence}
    assert evidence == {a.source.SOPInstanceUID for a in ct_study}


def test_dsrdump_parses_the_sr(sr_file: Path, ct_study) -> None:
    out = subprocess.run([tool("dsrdump"), "+Pl", str(sr_file)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "Comprehensive SR Document" in out.stdout and "Imaging Measurement Report" in out.stdout
    p = ct_study[0].prediction
    assert f'"Probability of {p.label}"' in out.stdout
    assert p.statement in out.stdout and DISCLAIMER in out.stdout
    assert f'"Algorithm Version")="{p.model.split("@")[1]}"' in out.stdout
    assert "error" not in out.stderr.lower()


def test_dciodvfy_finds_no_error_in_sr(sr_file: Path) -> None:
    out = subprocess.run([tool("dciodvfy"), str(sr_file)], capture_output=True, text=True, timeout=60)
    errors = [line for line in (out.stdout + out.stderr).splitlines() if line.startswith("Error")]
    assert not errors, errors


def test_reviewed_sr_is_verified_by_the_reader_and_supersedes_the_preliminary_one(ct_study, tmp_path: Path) -> None:
    preliminary = build_sr(ct_study)
    reviewed_image = ct_study[1]
    model_label = reviewed_image.prediction.label
    other = next(lab for lab in reviewed_image.prediction.probabilities if lab != model_label)
    review = ReviewAttestation(str(reviewed_image.source.SOPInstanceUID), other, "correct", "Reader^Ruth", "General Hospital",
                               note="artefact, not a finding")
    ds = build_sr(ct_study, review=review, predecessor=preliminary)
    path = tmp_path / "reviewed.dcm"
    ds.save_as(path)
    ds = read(path)
    assert (ds.CompletionFlag, ds.VerificationFlag, ds.PreliminaryFlag) == ("COMPLETE", "VERIFIED", "FINAL")
    observer = ds.VerifyingObserverSequence[0]
    assert (str(observer.VerifyingObserverName), observer.VerifyingOrganization) == ("Reader^Ruth", "General Hospital")
    assert ds.StudyInstanceUID == preliminary.StudyInstanceUID and ds.SOPInstanceUID != preliminary.SOPInstanceUID
    pred_refs = [i.ReferencedSOPInstanceUID for s in ds.PredecessorDocumentsSequence
                 for se in s.ReferencedSeriesSequence for i in se.ReferencedSOPSequence]
    assert pred_refs == [preliminary.SOPInstanceUID]
    groups = hd.sr.ComprehensiveSR.from_dataset(ds).content.get_image_measurement_groups()
    for group, analysed in zip(groups, ct_study):
        evaluations = {e.name.meaning: e.value.meaning for e in group.get_qualitative_evaluations()}
        texts = [item.TextValue for item in group[0].ContentSequence if item.ValueType == "TEXT"]
        if analysed is reviewed_image:  # the reader's finding and statement sit with the image they reviewed
            assert evaluations["Finding of the human reader"] == other
            assert f"Reviewed by Reader Ruth: corrected the model's finding '{model_label}' to '{other}'. Note: artefact, not a finding" in texts
        else:
            assert "Finding of the human reader" not in evaluations and not any(t.startswith("Reviewed by") for t in texts)
        assert group.finding_type.meaning == analysed.prediction.label  # the model's own finding is kept as it was
    out = subprocess.run([tool("dsrdump"), str(path)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "VERIFIED" in out.stdout and "Finding of the human reader" in out.stdout
    checked = subprocess.run([tool("dciodvfy"), str(path)], capture_output=True, text=True, timeout=60)
    assert not [line for line in (checked.stdout + checked.stderr).splitlines() if line.startswith("Error")]
    with pytest.raises(ResultExportError, match="not among the analysed images"):
        build_sr(ct_study, review=ReviewAttestation("1.2.3.4", other, "correct", "Reader^Ruth", "GH"))


def _items(item):
    """Every content item below ``item`` (depth first)."""
    for child in getattr(item, "ContentSequence", []):
        yield child
        yield from _items(child)


def test_a_referred_image_reaches_the_sr_without_a_finding(referred_study, tmp_path: Path) -> None:
    path = tmp_path / "referred.dcm"
    build_sr(referred_study).save_as(path)
    ds = read(path)
    items = list(_items(ds))
    # no finding content item, and no model label as the value of any coded item
    assert not [i for i in items if i.ConceptNameCodeSequence[0].CodeMeaning == "Finding"]
    codes = {i.ConceptCodeSequence[0].CodeValue for i in items if i.ValueType == "CODE"}
    assert not codes & {label.upper() for label in _labels(referred_study)}
    sr = hd.sr.ComprehensiveSR.from_dataset(ds)
    groups = sr.content.get_image_measurement_groups()
    assert len(groups) == 2
    for group, analysed in zip(groups, referred_study):
        p = analysed.prediction
        assert group.finding_type is None
        assert {e.name.meaning: e.value.meaning for e in group.get_qualitative_evaluations()} == {"Refer to human reader": "Yes"}
        values = {m.name.meaning: m.value for m in group.get_measurements()}  # kept, and said to be uncertain
        assert all(values[f"Probability of {label}"] == pytest.approx(prob) for label, prob in p.probabilities.items())
        texts = [item.TextValue for item in group[0].ContentSequence if item.ValueType == "TEXT"]
        assert p.statement in texts and UNCERTAIN_OUTPUT in texts and DISCLAIMER in texts
        assert p.statement.startswith("Refer to a human: ") and "no finding is reported" in p.statement
    assert "below the 0.99 referral floor" in referred_study[0].prediction.statement
    assert "unlike the model's training data" in referred_study[1].prediction.statement
    # what the model is for, once, in the report-level Qualitative Evaluations container (TID 1500)
    (evaluations,) = [i for i in ds.ContentSequence if i.ValueType == "CONTAINER"
                      and i.ConceptNameCodeSequence[0].CodeMeaning == "Qualitative Evaluations"]
    assert [i.TextValue for i in evaluations.ContentSequence] == [f"Intended use: {INTENDED_USE}",
                                                                   "Applicable patient ages: 18 years and older."]
    out = subprocess.run([tool("dsrdump"), "+Pl", str(path)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and '"Finding")' not in out.stdout and referred_study[0].prediction.statement in out.stdout
    assert "Applicable patient ages: 18 years and older." in out.stdout
    checked = subprocess.run([tool("dciodvfy"), str(path)], capture_output=True, text=True, timeout=60)
    assert not [line for line in (checked.stdout + checked.stderr).splitlines() if line.startswith("Error")]
    # a confident result keeps its coded finding, as before
    confident = AnalysedImage(dataclasses.replace(referred_study[0].prediction, refer=False), referred_study[0].source)
    group = hd.sr.ComprehensiveSR.from_dataset(build_sr([confident])).content.get_image_measurement_groups()[0]
    assert group.finding_type.meaning == referred_study[0].prediction.label


def test_a_readers_finding_on_a_referred_image_is_not_called_a_correction_of_the_model(referred_study) -> None:
    analysed = referred_study[0]
    review = ReviewAttestation(str(analysed.source.SOPInstanceUID), analysed.prediction.label, "confirm", "Reader^Ruth", "GH")
    group = hd.sr.ComprehensiveSR.from_dataset(build_sr(referred_study, review=review)).content.get_image_measurement_groups()[0]
    assert group.finding_type is None  # the model's own (absent) finding is kept as it was
    assert {e.name.meaning: e.value.meaning for e in group.get_qualitative_evaluations()}[
        "Finding of the human reader"] == analysed.prediction.label
    texts = [item.TextValue for item in group[0].ContentSequence if item.ValueType == "TEXT"]
    assert f"Reviewed by Reader Ruth: found '{analysed.prediction.label}' where the model reported no finding." in texts


def test_a_no_finding_decision_states_no_finding_in_any_output(ct_study) -> None:
    analysed = ct_study[0]
    p = dataclasses.replace(analysed.prediction, label=policy.NO_FINDING,
                            statement=f"Model finding: '{policy.NO_FINDING}' with calibrated probability 0.91; confirm clinically.")
    images = [AnalysedImage(p, analysed.source)]
    assert p.reported_finding is None and not p.refer
    group = hd.sr.ComprehensiveSR.from_dataset(build_sr(images)).content.get_image_measurement_groups()[0]
    assert group.finding_type is None
    report = next(e.resource for e in build_fhir_bundle(images).entry if e.resource.__resource_type__ == "DiagnosticReport")
    assert report.conclusionCode is None
    er7 = to_er7(build_oru_r01(images))
    assert "FINDING^" not in er7
    assert caption_lines(images[0])[1].startswith("No finding reported |") and caption_prose(images[0]) == p.statement


def test_a_not_analysed_study_gets_a_notice_without_any_finding(ct_study, tmp_path: Path) -> None:
    sources = [a.source for a in ct_study]
    path = tmp_path / "not-analysed.dcm"
    build_not_analysed_sr(sources, NOT_ANALYSED).save_as(path)
    ds = read(path)
    assert ds.StudyInstanceUID == sources[0].StudyInstanceUID and ds.VerificationFlag == "UNVERIFIED"
    items = list(_items(ds))
    assert not [i for i in items if i.ValueType in ("NUM", "CODE") and i.ConceptNameCodeSequence[0].CodeMeaning
                in ("Finding", "Algorithm Name")] and not [i for i in items if i.ValueType == "NUM"]
    (group,) = hd.sr.ComprehensiveSR.from_dataset(ds).content.get_image_measurement_groups()
    assert group.finding_type is None and not group.get_measurements()
    assert [r.referenced_sop_instance_uid for r in group.source_images] == [s.SOPInstanceUID for s in sources]
    texts = [i.TextValue for i in group[0].ContentSequence
             if i.ValueType == "TEXT" and i.ConceptNameCodeSequence[0].CodeMeaning == "Comment"]
    assert texts == [f"N{NOT_ANALYSED[1:]}. No AI result will follow for this study."]
    checked = subprocess.run([tool("dciodvfy"), str(path)], capture_output=True, text=True, timeout=60)
    assert not [line for line in (checked.stdout + checked.stderr).splitlines() if line.startswith("Error")]
    bundle = build_not_analysed_fhir_bundle(sources, NOT_ANALYSED)
    (entry,) = bundle.entry
    report = entry.resource
    assert report.__resource_type__ == "DiagnosticReport" and report.status == "cancelled"
    assert report.conclusion == texts[0] and report.conclusionCode is None and report.result is None
    assert report.imagingStudy[0].identifier.value == "urn:oid:" + sources[0].StudyInstanceUID
    with pytest.raises(ResultExportError, match="nothing to report"):
        build_not_analysed_sr([], NOT_ANALYSED)


def test_sr_references_the_analysed_frame_of_a_multiframe_image(predictor) -> None:
    src = DATA / "emri_small.dcm"  # 10 frames: the reader analyses the middle one (index 5 -> frame 6)
    analysed = AnalysedImage(predictor.predict(str(src)), read(src))
    assert analysed.frame_number == 6
    group = hd.sr.ComprehensiveSR.from_dataset(build_sr([analysed])).content.get_image_measurement_groups()[0]
    assert int(group.source_images[0].ReferencedSOPSequence[0].ReferencedFrameNumber) == 6


def test_sr_refuses_mixed_studies(ct_study, predictor) -> None:
    other = AnalysedImage(predictor.predict(str(DATA / "US1_UNCR.dcm")), read(DATA / "US1_UNCR.dcm"))
    with pytest.raises(ResultExportError, match="exactly one study"):
        build_sr([ct_study[0], other])
    with pytest.raises(ResultExportError, match="nothing to report"):
        build_sr([])


# --------------------------------------------------------------------------- Secondary Capture


def test_secondary_capture_has_the_overlay_and_a_readable_caption(ct_study, tmp_path: Path) -> None:
    analysed = ct_study[0]
    sc = build_overlay_sc(analysed)
    path = tmp_path / "sc.dcm"
    sc.save_as(path)
    ds = read(path)
    assert ds.SOPClassUID == SecondaryCaptureImageStorage
    assert ds.StudyInstanceUID == analysed.source.StudyInstanceUID and ds.SeriesInstanceUID != analysed.source.SeriesInstanceUID
    assert ds.PhotometricInterpretation == "RGB" and ds.BitsAllocated == 8 and ds.SamplesPerPixel == 3
    assert ds.SourceImageSequence[0].ReferencedSOPInstanceUID == analysed.source.SOPInstanceUID
    pixels = ds.pixel_array
    p = analysed.prediction
    # 512-pixel source: no resize, so the top of the picture is exactly the overlay the explain module draws
    expected = overlay_rgb(p.image, p.heatmap)
    assert pixels.shape[1] == expected.shape[1] == 512
    np.testing.assert_array_equal(pixels[: expected.shape[0]], expected)
    band = pixels[expected.shape[0]:]
    assert band.shape[0] >= 30
    assert ((band == [255, 255, 0]).all(-1)).sum() > 200  # the yellow disclaimer line is drawn
    assert DISCLAIMER in ds.ImageComments and p.statement in ds.ImageComments


def test_caption_is_legible_to_ocr(ct_study, tmp_path: Path) -> None:
    tesseract = tool("tesseract")
    pixels = render_overlay(ct_study[0])
    band = pixels[overlay_rgb(ct_study[0].prediction.image, ct_study[0].prediction.heatmap).shape[0]:]
    Image.fromarray(band).save(tmp_path / "band.png")
    out = subprocess.run([tesseract, str(tmp_path / "band.png"), "-", "--psm", "6"], capture_output=True, text=True, timeout=60)
    words = re.sub(r"[^a-z]", "", out.stdout.lower())
    assert "resultnotforprimarydiagnosis" in words, out.stdout


def test_a_referred_overlay_burns_in_the_referral_and_no_label(referred_study, tmp_path: Path) -> None:
    for analysed in referred_study:
        p = analysed.prediction
        burned = " ".join([*caption_lines(analysed), caption_prose(analysed)])
        assert "REFER TO HUMAN READER - no finding reported" in burned and p.statement in burned
        assert "heat map" not in burned and not [w for w in re.findall(r"[a-z_]+", burned.lower()) if w in _labels([analysed])]
        sc = build_overlay_sc(analysed)
        assert not [w for w in re.findall(r"[a-z_]+", sc.ImageComments.lower()) if w in _labels([analysed])]
        pixels = render_overlay(analysed)
        band = pixels[overlay_rgb(p.image, p.heatmap).shape[0]:]
        words = _ocr_words(band, tmp_path)
        letters = re.sub(r"[^a-z]", "", words)
        assert "refertohumanreader" in letters and "nofindingreported" in letters and "refertoahuman" in letters, words
        assert not set(re.findall(r"[a-z]+", words)) & _labels([analysed]), words
    # the same image, confident: its caption still names the finding and the heat map's class
    confident = AnalysedImage(dataclasses.replace(referred_study[0].prediction, refer=False), referred_study[0].source)
    label = confident.prediction.label
    assert caption_lines(confident)[1].startswith(f"{label} (p={confident.prediction.confidence:.2f}) | heat map: {label}")
    assert caption_prose(confident) == ""


def test_small_images_are_enlarged_for_a_legible_caption(predictor) -> None:
    src = DATA / "emri_small.dcm"  # 64 x 64
    sc = build_overlay_sc(AnalysedImage(predictor.predict(str(src)), read(src)))
    assert sc.Columns == 512 and sc.Rows > 512
    assert sc.SourceImageSequence[0].ReferencedFrameNumber == 6


def test_dciodvfy_finds_no_error_in_sc(ct_study, tmp_path: Path) -> None:
    path = tmp_path / "sc.dcm"
    build_overlay_sc(ct_study[0]).save_as(path)
    out = subprocess.run([tool("dciodvfy"), str(path)], capture_output=True, text=True, timeout=60)
    errors = [line for line in (out.stdout + out.stderr).splitlines() if line.startswith("Error")]
    assert not errors, errors


def test_overlay_series_numbers_instances_in_one_series(ct_study) -> None:
    series = build_overlay_series(ct_study)
    assert len({s.SeriesInstanceUID for s in series}) == 1
    assert [int(s.InstanceNumber) for s in series] == [1, 2]
    assert len({s.SOPInstanceUID for s in series}) == 2


# --------------------------------------------------------------------------- FHIR


def test_fhir_bundle_round_trips_and_reports_each_finding(ct_study) -> None:
    from fhir.resources.R4B.bundle import Bundle

    bundle = build_fhir_bundle(ct_study)
    parsed = Bundle.model_validate_json(bundle.model_dump_json(exclude_none=True))  # validates again from JSON
    resources = [e.resource for e in parsed.entry]
    observations = [r for r in resources if r.__resource_type__ == "Observation"]
    report = next(r for r in resources if r.__resource_type__ == "DiagnosticReport")
    labels = list(ct_study[0].prediction.probabilities)
    assert len(observations) == len(ct_study) * len(labels)
    expected = [round(prob, 6) for a in ct_study for prob in a.prediction.probabilities.values()]
    assert [float(o.valueQuantity.value) for o in observations] == pytest.approx(expected, abs=1e-9)
    assert all(o.valueQuantity.system == "http://unitsofmeasure.org" and o.status == "preliminary" for o in observations)
    urls = {e.fullUrl for e in parsed.entry if e.resource.__resource_type__ == "Observation"}
    assert {r.reference for r in report.result} == urls
    assert report.imagingStudy[0].identifier.value == "urn:oid:" + ct_study[0].source.StudyInstanceUID
    assert DISCLAIMER in report.conclusion and ct_study[0].prediction.statement in report.conclusion
    assert report.subject is None


def test_fhir_report_of_a_referred_study_has_no_conclusion_code(referred_study) -> None:
    bundle = build_fhir_bundle(referred_study)
    resources = [e.resource for e in bundle.entry]
    report = next(r for r in resources if r.__resource_type__ == "DiagnosticReport")
    assert report.conclusionCode is None
    for a in referred_study:
        assert a.prediction.statement in report.conclusion
    assert f"Intended use: {INTENDED_USE}" in report.conclusion and "Applicable patient ages: 18 years and older." in report.conclusion
    observations = [r for r in resources if r.__resource_type__ == "Observation"]
    assert len(observations) == 2 * len(_labels(referred_study))
    for o in observations:  # each probability: indeterminate, and said to be the model's uncertain output
        assert [c.code for i in o.interpretation for c in i.coding] == ["IND"]
        assert UNCERTAIN_OUTPUT in o.note[0].text
    finding_codes = [c["code"] for e in json.loads(bundle.model_dump_json(exclude_none=True))["entry"]
                     for c in _codings(e["resource"]) if c.get("system") == CODING_SCHEME_URI]
    assert finding_codes and all(c.startswith("P-") or c == "TINY" for c in finding_codes), finding_codes


def _codings(node):
    if isinstance(node, dict):
        if "coding" in node:
            yield from node["coding"]
        for v in node.values():
            yield from _codings(v)
    elif isinstance(node, list):
        for v in node:
            yield from _codings(v)


def test_reviewed_fhir_report_without_a_preliminary_one_is_created_final(ct_study) -> None:
    from medsight.integration.fhir import build_reviewed_fhir_bundle

    analysed = ct_study[0]
    review = ReviewAttestation(str(analysed.source.SOPInstanceUID), analysed.prediction.label, "confirm", "Reader^Ruth", "GH")
    bundle = build_reviewed_fhir_bundle(ct_study, review)
    kinds = [(e.resource.__resource_type__, e.request.method) for e in bundle.entry]
    n_obs = sum(len(a.prediction.probabilities) for a in ct_study)
    assert kinds == [("Device", "POST")] + [("Observation", "POST")] * n_obs + [("DiagnosticReport", "PUT")]
    report = bundle.entry[-1].resource
    assert report.status == "final" and report.resultsInterpreter[0].display == "Reader Ruth"
    assert report.conclusion.startswith(f"Reviewed by Reader Ruth: confirmed the model's finding '{analysed.prediction.label}'.")
    assert len(report.result) == n_obs  # the new Observations of this very bundle
    with pytest.raises(ResultExportError, match="no single DiagnosticReport"):
        build_reviewed_fhir_bundle(ct_study, review, preliminary={"resourceType": "Bundle", "entry": []})


def test_fhir_and_hl7_payloads_name_no_patient(ct_study) -> None:
    images = [_identified(a) for a in ct_study]
    fhir_json = build_fhir_bundle(images).model_dump_json(exclude_none=True)
    er7 = to_er7(build_oru_r01(images))
    for payload in (fhir_json, er7):
        for secret in ("Doeverylong", "Janexample", "PID-7734521", "19800417", "1980-04-17"):
            assert secret not in payload
    assert "ACC20240001" in fhir_json and "ACC20240001" in er7  # the order number the RIS matches on stays
    assert "\rPID|" not in er7 and not er7.startswith("PID")


def test_fhir_bundle_is_posted_to_the_endpoint(ct_study) -> None:
    received = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802
            body = self.rfile.read(int(self.headers["Content-Length"]))
            received.append((self.path, self.headers["Content-Type"], json.loads(body)))
            reply = json.dumps({"resourceType": "Bundle", "type": "transaction-response"}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/fhir+json")
            self.send_header("Content-Length", str(len(reply)))
            self.end_headers()
            self.wfile.write(reply)

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        reply = post_bundle(build_fhir_bundle(ct_study), f"http://127.0.0.1:{server.server_port}/fhir")
    finally:
        server.shutdown()
    assert reply["type"] == "transaction-response"
    path, ctype, body = received[0]
    assert path == "/fhir" and ctype == "application/fhir+json" and body["type"] == "transaction"
    with pytest.raises(ResultExportError, match="unreachable"):
        post_bundle(build_fhir_bundle(ct_study), f"http://127.0.0.1:{server.server_port}/fhir", timeout=2)


# --------------------------------------------------------------------------- HL7 v2


def test_oru_r01_parses_back_with_every_probability(ct_study) -> None:
    from hl7apy.parser import parse_message

    er7 = to_er7(build_oru_r01([_identified(a) for a in ct_study], control_id="CTRL1"))
    msg = parse_message(er7, find_groups=True)
    assert msg.validate()
    assert msg.msh.msh_9.to_er7() == "ORU^R01^ORU_R01" and msg.msh.msh_10.to_er7() == "CTRL1"
    order = msg.ORU_R01_PATIENT_RESULT.ORU_R01_ORDER_OBSERVATION
    assert order.obr.obr_25.to_er7() == "P" and order.obr.obr_3.to_er7() == "ACC20240001"
    obx = {o.obx.obx_3.obx_3_1.to_er7() + "#" + o.obx.obx_3.obx_3_2.to_er7(): o.obx for o in order.ORU_R01_OBSERVATION}
    assert obx["STUDY-UID#Study Instance UID"].obx_5.to_er7() == ct_study[0].source.StudyInstanceUID
    for i, a in enumerate(ct_study, start=1):
        for label, prob in a.prediction.probabilities.items():
            seg = obx[f"P-{label.upper()}#Image {i} probability of {label}"]
            assert seg.obx_2.to_er7() == "NM" and float(seg.obx_5.to_er7()) == pytest.approx(prob, abs=1e-6)
        assert obx[f"FINDING#Image {i} finding"].obx_5.obx_5_2.to_er7() == a.prediction.label
    assert order.nte.nte_3.to_er7() == DISCLAIMER


def test_oru_r01_of_a_referred_study_has_no_finding_obx(referred_study) -> None:
    from hl7apy.parser import parse_message

    msg = parse_message(to_er7(build_oru_r01(referred_study)), find_groups=True)
    assert msg.validate()
    rows = [(o.obx.obx_3.obx_3_1.to_er7(), o.obx.obx_3.obx_3_2.to_er7(), o.obx.obx_5.to_er7())
            for o in msg.ORU_R01_PATIENT_RESULT.ORU_R01_ORDER_OBSERVATION.ORU_R01_OBSERVATION]
    assert not [r for r in rows if r[0] == "FINDING"]
    labels = _labels(referred_study)
    naming = [r for r in rows if any(label in f"{r[1]} {r[2]}".lower() for label in labels)]
    assert len(naming) == 2 * len(labels)  # only the probabilities name a label, each said to be no finding
    assert all(code.startswith("P-") and text.endswith("(uncertain model output, not a finding)") for code, text, _ in naming)
    assert [v for c, _, v in rows if c == "REFER"] == ["Y", "Y"]
    assert [v for c, _, v in rows if c == "STATEMENT"] == [a.prediction.statement for a in referred_study]


def test_hl7_free_text_cannot_break_the_message(ct_study) -> None:
    from hl7apy.parser import parse_message

    a = ct_study[0]
    tricky = copy.copy(a.prediction)
    tricky.statement = "probability 0.9 | see ^report~ & notes \\ end\nline two"
    er7 = to_er7(build_oru_r01([AnalysedImage(tricky, a.source)]))
    msg = parse_message(er7, find_groups=True)
    statement = [o.obx for o in msg.ORU_R01_PATIENT_RESULT.ORU_R01_ORDER_OBSERVATION.ORU_R01_OBSERVATION
                 if o.obx.obx_3.obx_3_1.to_er7() == "STATEMENT"][0]
    assert statement.obx_11.to_er7() == "P"  # fields after the text are still in place
    assert statement.obx_5.to_er7() == r"probability 0.9 \F\ see \S\report\R\ \T\ notes \E\ end line two"


def test_unique_uids_per_call(ct_study) -> None:
    a, b = build_sr(ct_study), build_sr(ct_study)
    assert a.SOPInstanceUID != b.SOPInstanceUID and a.SeriesInstanceUID != b.SeriesInstanceUID
    given = generate_uid()
    assert build_sr(ct_study, series_instance_uid=given).SeriesInstanceUID == given
