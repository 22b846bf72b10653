"""Routing: a study goes to the model whose card's applicability everything in its header fits, or to none.

Real headers from pydicom-data: the shoulder MR (MR2) that went to the brain tumour model, the
distal tibia CR (RG3) and the adult chest CR (RG1) that went to the paediatric pneumonia model.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest
from pydantic import ValidationError

from medsight.errors import ModelCardError, UnknownModelError, UnsupportedModalityError
from medsight.models.applicability import RoutingRule, StudyAttributes, body_parts, check, route
from medsight.models.card import ANY_BODY_PART
from medsight.models.package import read_card
from medsight.models.registry import ZOO_DIR, list_cards

ROOT = Path(__file__).resolve().parents[2]
ZOO = list_cards([ZOO_DIR])
PREFERRED = {"CR": "pneumonia-cxr", "DX": "pneumonia-cxr", "US": "breast-us-busi", "MR": "brain-tumor-mri"}


def pydicom_data(name: str) -> StudyAttributes:
    import data_store

    return StudyAttributes.from_header(pydicom.dcmread(Path(data_store.__file__).parent / "data" / name,
                                                       stop_before_pixels=True))


def fit_of(decision, model: str):  # noqa: ANN001, ANN201
    return next(f for f in decision.fits if f.model == model)


# -- the cards ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("card", ZOO, ids=lambda c: c.name)
def test_every_zoo_card_says_where_it_applies(card):
    app = card.applicability
    assert app is not None, f"{card.name}: no applicability section"
    assert app.body_parts != [ANY_BODY_PART] and app.never.text and app.basis
    head = card.modality.split(" ", 1)[0].split("/")
    assert set(app.modalities) <= set(head), "the card's page and its routing must name the same modalities"
    assert card.body_part in app.body_parts


def test_the_paediatric_model_is_for_ages_1_to_5_frontal_views():
    app = next(c for c in ZOO if c.name == "pneumonia-cxr").applicability
    assert (app.age_years.min_years, app.age_years.max_years) == (1, 5)
    assert app.view_positions == ["PA", "AP"] and "LL" in app.never.view_positions


@pytest.mark.parametrize("bad, message", [
    ({"modalities": [], "body_parts": ["CHEST"]}, "modalities"),
    ({"modalities": ["CR"], "body_parts": ["chest!"]}, "not a DICOM code string"),
    ({"modalities": ["CR"], "body_parts": ["CHEST"], "age_years": {"min_years": 6, "max_years": 1}}, "above max_years"),
    ({"modalities": ["CR"], "body_parts": ["CHEST", "ANY"]}, "stands alone"),
    ({"modalities": ["CR"], "body_parts": ["CHEST"], "photometric": ["GREY"]}, "photometric"),
    ({"modalities": ["CR"], "body_parts": ["CHEST"], "never": {"text": "x", "body_parts": ["CHEST"]}}, "both accepted"),
    ({"modalities": ["CR"], "body_parts": ["CHEST"], "bodypart": "CHEST"}, "bodypart"),
])
def test_a_malformed_applicability_section_is_refused_when_the_card_loads(tmp_path, bad, message):
    d = Path(shutil.copytree(ZOO_DIR / "pneumonia-cxr", tmp_path / "p", ignore=shutil.ignore_patterns("*.safetensors")))
    data = json.loads((d / "card.json").read_text())
    data["applicability"] = {"never": {"text": "never a test"}} | bad
    (d / "card.json").write_text(json.dumps(data))
    with pytest.raises(ModelCardError, match="applicability") as e:
        read_card(d)
    assert message in str(e.value)


# -- the studies of the issue ------------------------------------------------------------------------------
def test_the_shoulder_mr_goes_to_no_model():
    d = route(pydicom_data("MR2_UNCR.dcm"), ZOO, preferred=PREFERRED)
    assert d.model is None and d.study == "SHOULDER MR"
    assert d.message.startswith("not analysed: no model applies (SHOULDER MR): brain-tumor-mri: reads BRAIN/HEAD, not SHOULDER")


def test_the_distal_tibia_cr_goes_to_no_model():
    d = route(pydicom_data("RG3_UNCR.dcm"), ZOO, preferred=PREFERRED)
    assert d.model is None and d.message.startswith("not analysed: no model applies (EXTREMITY/LEG CR)")
    assert "not EXTREMITY" in " ".join(fit_of(d, "pneumonia-cxr").reasons)


def test_an_adult_chest_cr_is_not_given_to_the_paediatric_model():
    d = route(pydicom_data("RG1_UNCR.dcm"), ZOO, preferred=PREFERRED)
    assert d.model != "pneumonia-cxr"
    assert fit_of(d, "pneumonia-cxr").reasons == ("is for patients aged 1-5 years, not 64",)
    assert d.model == "covid-cxr"  # it does fit the adult chest model's card (ages 12-94, PA/AP)


def test_a_brain_mr_still_goes_to_the_brain_model():
    assert route(pydicom_data("emri_small.dcm"), ZOO, preferred=PREFERRED).model == "brain-tumor-mri"


def test_a_localizer_of_a_brain_study_is_refused_by_words_the_card_names():
    brain_scout = StudyAttributes(modality="MR", body_part_examined="HEAD", photometric="MONOCHROME2",
                                  descriptions=(("SeriesDescription", "FAST LOCALIZER"),))
    fit = check(next(c for c in ZOO if c.name == "brain-tumor-mri"), brain_scout)
    assert not fit.applies and "must never be given LOCALIZER" in fit.reasons[0]


# -- what the header must say ---------------------------------------------------------------------------------
CHILD_PA = {"Modality": "CR", "BodyPartExamined": "CHEST", "ViewPosition": "PA", "PatientAge": "003Y",
            "PhotometricInterpretation": "MONOCHROME2"}


def test_a_child_frontal_chest_film_goes_to_the_paediatric_model():
    assert route(StudyAttributes.from_header(CHILD_PA), ZOO, preferred=PREFERRED).model == "pneumonia-cxr"


@pytest.mark.parametrize("drop, missing", [("BodyPartExamined", "BodyPartExamined"), ("ViewPosition", "ViewPosition"),
                                           ("PatientAge", "PatientAge"), ("PhotometricInterpretation", "PhotometricInterpretation")])
def test_an_attribute_the_card_needs_that_the_header_lacks_means_not_analysed(drop, missing):
    header = {k: v for k, v in CHILD_PA.items() if k != drop}
    d = route(StudyAttributes.from_header(header), ZOO, preferred=PREFERRED)
    assert d.model is None and d.message.startswith("not analysed: no model applies")
    assert missing in fit_of(d, "pneumonia-cxr").missing


def test_the_age_comes_from_the_birth_date_and_a_placeholder_birth_date_is_no_age():
    born = {"Modality": "CR", "PatientBirthDate": "20000301", "StudyDate": "20040229"}
    assert StudyAttributes.from_header(born).age_years == 3  # the fourth birthday is a day later
    assert StudyAttributes.from_header(born | {"PatientAge": "010Y"}).age_years == 10  # PatientAge wins
    assert StudyAttributes.from_header({"PatientBirthDate": "11111111", "StudyDate": "20051130"}).age_years is None
    assert StudyAttributes.from_header({"PatientAge": "018M"}).age_years == 1


def test_descriptions_name_body_parts_by_whole_words_in_any_case():
    def parts(text: str) -> set[str]:
        return set(body_parts(StudyAttributes(descriptions=(("StudyDescription", text),))))

    assert parts("Non-ossifying fibroma of distal tibia") == {"LEG"}
    assert parts("xr thorax pa") == {"CHEST"} and parts("LEFT LEG^AP") == {"LEG"}
    assert parts("LEGACY PROTOCOL") == set() and parts("HEADER TEST") == set()


def test_a_lateral_view_in_a_chest_study_keeps_the_study_from_a_frontal_only_model():
    frontal = StudyAttributes.from_header(CHILD_PA)
    lateral = StudyAttributes.from_header(CHILD_PA | {"ViewPosition": "LL"})
    d = route([frontal, lateral], ZOO, preferred=PREFERRED)
    assert d.model is None and "must never be given a LL view" in " ".join(fit_of(d, "pneumonia-cxr").reasons)


def test_a_requested_model_is_checked_like_any_other():
    d = route(pydicom_data("MR2_UNCR.dcm"), ZOO, requested="brain-tumor-mri")
    assert d.model is None and d.message.startswith("not analysed: model 'brain-tumor-mri' does not apply (SHOULDER MR)")


# -- a site's rules ---------------------------------------------------------------------------------------------
NEURO = {"Modality": "MR", "ProtocolName": "NEURO ROUTINE 3T", "PhotometricInterpretation": "MONOCHROME2"}


def test_a_site_rule_maps_its_protocol_name_to_a_body_part():
    attrs = StudyAttributes.from_header(NEURO)
    assert route(attrs, ZOO).model is None  # the header names no body part
    rule = RoutingRule(keyword="neuro routine", body_part="head", fields=["ProtocolName"])
    assert rule.body_part == "HEAD"
    assert route(attrs, ZOO, [rule]).model == "brain-tumor-mri"
    assert route(attrs, ZOO, [rule.model_copy(update={"modality": "CT"})]).model is None  # for CT only


def test_a_site_rule_cannot_hide_what_the_header_says():
    rule = RoutingRule(keyword="T1W/SE/1024", body_part="HEAD", fields=["ProtocolName"])
    d = route(pydicom_data("MR2_UNCR.dcm"), ZOO, [rule])
    assert d.model is None and "not SHOULDER" in d.message


@pytest.mark.parametrize("rule, message", [
    ({"keyword": "  ", "body_part": "HEAD"}, "blank"),
    ({"keyword": "NEURO", "body_part": "brain & spine"}, "not a DICOM code string"),
    ({"keyword": "NEURO", "body_part": "HEAD", "fields": ["PatientName"]}, "fields"),
    ({"keyword": "NEURO", "body_part": "HEAD", "field": "ProtocolName"}, "field"),
])
def test_bad_site_rules_stop_the_service_at_start_up(tmp_path, rule, message):
    from medsight.serve.config import ServiceSettings

    (tmp_path / "settings.json").write_text(json.dumps({"routing_rules": [rule]}))
    with pytest.raises(ValidationError, match="routing_rules") as e:
        ServiceSettings.from_env(tmp_path / "settings.json", data_dir=tmp_path)
    assert message in str(e.value)


# -- the service's choice --------------------------------------------------------------------------------------
def test_the_service_refuses_what_no_model_applies_to_and_an_operator_can_override():
    from medsight.serve.catalog import ModelCatalog

    catalog = ModelCatalog(default_models=PREFERRED)
    shoulder = [pydicom_data("MR2_UNCR.dcm")]
    with pytest.raises(UnsupportedModalityError, match=r"^not analysed: no model applies \(SHOULDER MR\)") as e:
        catalog.choose("MR", attributes=shoulder)
    assert e.value.decision.model is None and e.value.decision.fits
    with pytest.raises(UnsupportedModalityError, match="does not apply"):
        catalog.choose("MR", "brain-tumor-mri", shoulder)
    assert catalog.choose("MR", "brain-tumor-mri", shoulder, override=True).name == "brain-tumor-mri"
    with pytest.raises(UnsupportedModalityError):
        catalog.choose("MR", attributes=shoulder, override=True)  # an override needs a requested model
    with pytest.raises(UnknownModelError):
        catalog.choose("MR", "no-such-model", shoulder)
    with pytest.raises(UnsupportedModalityError):
        catalog.choose("MR")  # the modality alone fits no zoo model
    assert catalog.choose("MR", attributes=[pydicom_data("emri_small.dcm")]).name == "brain-tumor-mri"


def test_the_routing_table_script_runs(tmp_path):
    docs = tmp_path / "routing.md"
    docs.write_text((ROOT / "docs" / "routing.md").read_text())
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "routing" / "run.py"), "--out", str(tmp_path),
                    "--docs", str(docs)], check=True, cwd=ROOT, capture_output=True, timeout=300)
    rows = {r["file"]: r for r in json.loads((tmp_path / "results.json").read_text())["rows"]}
    assert rows["MR2_UNCR.dcm"]["model"] is None and rows["RG3_UNCR.dcm"]["model"] is None
    assert rows["RG1_UNCR.dcm"]["model"] != "pneumonia-cxr"
    assert docs.read_text() == (ROOT / "docs" / "routing.md").read_text(), "docs/routing.md is out of date: re-run the script"
