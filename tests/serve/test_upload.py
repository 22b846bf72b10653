"""Upload API: every accepted form, every refusal with its specific status and reason, nothing stored on refusal."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid
from sqlalchemy import func, select

from medsight.serve.db import Instance, Job, Study


def dicom_bytes(name: str, **changes: str) -> bytes:
    ds = pydicom.dcmread(get_testdata_file(name))
    for k, v in changes.items():
        setattr(ds, k, v)
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def counts(svc) -> tuple[int, int, int, int]:  # noqa: ANN001
    with svc.ctx.db.session() as s:
        n = tuple(s.execute(select(func.count(m.id))).scalar_one() for m in (Study, Instance, Job))
    blobs = [p for p in svc.ctx.settings.files_dir.rglob("*") if p.is_file()]
    return (*n, len(blobs))


def test_single_dicom_is_accepted_queued_and_analysed(svc) -> None:  # noqa: ANN001
    r = svc.upload([("ct.dcm", dicom_bytes("CT_small.dcm"))], priority="STAT")
    assert r.status_code == 202, r.text
    body = r.json()
    assert r.headers["location"] == f"/api/studies/{body['id']}"
    assert body["modality"] == "CT" and body["model"] == "tiny-xr" and body["requested_priority"] == "stat"
    assert body["status"] == "queued" and body["job"]["status"] == "queued"
    assert body["instances"][0]["rows"] == 128 and body["instances"][0]["sop_instance_uid"]
    assert svc.work() == 1
    d = svc.client.get(f"/api/studies/{body['id']}", headers=svc.headers["radiologist"]).json()
    assert d["status"] == "analysed" and len(d["results"]) == 1
    res = d["results"][0]
    assert set(res["probabilities"]) == {"bar", "disc"}
    assert abs(sum(res["probabilities"].values()) - 1) < 1e-5
    assert res["critical_probability"] == pytest.approx(res["probabilities"]["disc"])
    img = svc.client.get(res["overlay_url"], headers=svc.headers["radiologist"])
    assert img.status_code == 200 and img.content[:8] == b"\x89PNG\r\n\x1a\n"
    from PIL import Image

    assert Image.open(io.BytesIO(img.content)).size == (128, 128)  # heat map at the image's own resolution


def test_multi_file_study_and_zip(svc) -> None:  # noqa: ANN001
    uid = generate_uid()
    a = dicom_bytes("CT_small.dcm", StudyInstanceUID=uid, SOPInstanceUID=generate_uid())
    b = dicom_bytes("CT_small.dcm", StudyInstanceUID=uid, SOPInstanceUID=generate_uid(), InstanceNumber="2")
    r = svc.upload([("a.dcm", a), ("b.dcm", b)])
    assert r.status_code == 202, r.text
    assert len(r.json()["instances"]) == 2
    uid2 = generate_uid()
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("series1/IM0001", dicom_bytes("CT_small.dcm", StudyInstanceUID=uid2, SOPInstanceUID=generate_uid()))
        zf.writestr("series1/IM0002", dicom_bytes("CT_small.dcm", StudyInstanceUID=uid2, SOPInstanceUID=generate_uid()))
        zf.writestr("__MACOSX/._IM0001", b"junk")
        zf.writestr("DICOMDIR", b"index")
    r = svc.upload([("study.zip", buf.getvalue())])
    assert r.status_code == 202, r.text
    assert r.json()["study_uid"] == uid2 and len(r.json()["instances"]) == 2
    assert svc.work() == 2
    d = svc.client.get(f"/api/studies/{r.json()['id']}", headers=svc.headers["radiologist"]).json()
    assert len(d["results"]) == 2


def test_png_needs_a_declared_modality_and_a_model_for_it(svc, shape_pngs) -> None:  # noqa: ANN001
    before = counts(svc)
    r = svc.upload([("a.png", shape_pngs["disc"][0])])
    assert r.status_code == 422 and "declare" in r.json()["detail"]
    r = svc.upload([("a.png", shape_pngs["disc"][0])], modality="CR", model="no-such-model")
    assert r.status_code == 404 and r.json()["available"] == ["tiny-xr"]
    assert counts(svc) == before
    r = svc.upload([("a.png", shape_pngs["disc"][0])], modality="cr")
    assert r.status_code == 202 and r.json()["modality"] == "CR" and r.json()["instances"][0]["format"] == "png"
    # No model reads US. This was a 422 refusal; a study no model applies to is now stored, on the worklist as
    # "not analysed" with the reason, audited, and given no analysis job (issue 18: nothing dropped at the door).
    r = svc.upload([("b.png", shape_pngs["disc"][1])], modality="US")
    assert r.status_code == 202, r.text
    body = r.json()
    assert body["status"] == "not_analysed" and body["finding"] is None and body["job"] is None
    assert body["not_analysed_reason"].startswith("not analysed: no model applies") and "US" in body["not_analysed_reason"]


@pytest.mark.parametrize("case", ["corrupt", "no_pixels", "truncated_zip", "mixed_studies", "text_as_png", "empty"])
def test_bad_input_is_refused_and_nothing_is_stored(svc, case: str) -> None:  # noqa: ANN001
    before = counts(svc)
    if case == "corrupt":
        r = svc.upload([("x.dcm", b"DICM" + bytes(range(256)) * 8)])
        expect = (422, "not a recognised image")
    elif case == "no_pixels":
        r = svc.upload([("plan.dcm", Path(get_testdata_file("rtplan.dcm")).read_bytes())])
        expect = (422, "no pixel data")
    elif case == "truncated_zip":
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w") as zf:
            zf.writestr("a.dcm", dicom_bytes("CT_small.dcm"))
        r = svc.upload([("s.zip", buf.getvalue()[:200])])
        expect = (422, "zip")
    elif case == "mixed_studies":
        r = svc.upload([("a.dcm", dicom_bytes("CT_small.dcm", StudyInstanceUID=generate_uid())),
                        ("b.dcm", dicom_bytes("CT_small.dcm", StudyInstanceUID=generate_uid()))])
        expect = (422, "different studies")
    elif case == "text_as_png":
        r = svc.upload([("scan.png", b"this is not an image at all")], modality="CR")
        expect = (422, "not a recognised image")
    else:
        r = svc.upload([("e.dcm", b"")])
        expect = (422, "empty")
    assert r.status_code == expect[0], r.text
    assert expect[1] in r.json()["detail"]
    assert "/tmp" not in r.json()["detail"]  # reports the uploaded name, not server paths
    assert counts(svc) == before
    assert list((svc.ctx.settings.files_dir / ".tmp").iterdir()) == []


def test_duplicate_study_is_409(svc) -> None:  # noqa: ANN001
    data = dicom_bytes("CT_small.dcm")
    first = svc.upload([("ct.dcm", data)])
    assert first.status_code == 202
    r = svc.upload([("ct.dcm", data)])
    assert r.status_code == 409 and r.json()["study_id"] == first.json()["id"]


def test_oversize_upload_is_413_and_not_stored(tmp_path: Path, models_dir: Path, shape_pngs) -> None:  # noqa: ANN001
    from tests.serve.conftest import make_service

    svc = make_service(tmp_path, f"sqlite:///{tmp_path / 'db.sqlite'}", models_dir, max_upload_bytes=4096)
    try:
        big = dicom_bytes("CT_small.dcm")  # ~39 kB
        r = svc.upload([("ct.dcm", big * 3)])
        assert r.status_code == 413, r.text
        # A zip that is small on the wire but expands past the limit is refused too.
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
            zf.writestr("a.dcm", b"\0" * 200_000)
        assert len(buf.getvalue()) < 4096
        r = svc.upload([("bomb.zip", buf.getvalue())])
        assert r.status_code == 413 and "expands" in r.json()["detail"]
        assert counts(svc) == (0, 0, 0, 0)
    finally:
        svc.client.close()
        svc.ctx.close()


def test_deidentification_on_arrival_stores_only_the_deidentified_copy(tmp_path: Path, models_dir: Path) -> None:
    from medsight.integration.deid import new_key_file
    from tests.serve.conftest import make_service

    key_file = new_key_file(tmp_path / "site.key")
    svc = make_service(tmp_path, f"sqlite:///{tmp_path / 'db.sqlite'}", models_dir, deid_key_file=key_file)
    try:
        original = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
        r = svc.upload([("SMITH_JOHN_ct.dcm", dicom_bytes("CT_small.dcm"))])
        assert r.status_code == 202, r.text
        with svc.ctx.db.session() as s:
            study = s.execute(select(Study)).scalar_one()
            inst = s.execute(select(Instance)).scalar_one()
        stored = pydicom.dcmread(svc.ctx.store.path_for(inst.file_sha256))
        assert stored.PatientIdentityRemoved == "YES"
        assert stored.PatientName != original.PatientName and stored.PatientID != original.PatientID
        assert study.study_uid == stored.StudyInstanceUID != original.StudyInstanceUID
        assert "SMITH" not in inst.original_name
        assert stored.PixelData == original.PixelData
        # burned-in annotation: refused whole, nothing stored
        before = counts(svc)
        r = svc.upload([("b.dcm", dicom_bytes("CT_small.dcm", BurnedInAnnotation="YES", StudyInstanceUID=generate_uid()))])
        assert r.status_code == 422 and "Burned In Annotation is YES" in r.json()["detail"], r.text
        assert counts(svc) == before
    finally:
        svc.client.close()
        svc.ctx.close()
