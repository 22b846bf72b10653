"""Issue 18 in the service: a study no model applies to is kept and said so; a referral never reads as a finding;
a reader may exclude an image; a study analysed again is shown by its latest analysis."""

from __future__ import annotations

import dataclasses
import io
import re
from pathlib import Path

import pydicom
from sqlalchemy import select

from medsight.serve.db import AuditEvent, Job, Result, Study
from medsight.serve.export import export_reviews
from medsight.serve.audit import Actor

from tests.serve.conftest import make_service
from tests.serve.test_upload import dicom_bytes


def test_a_study_no_model_applies_to_is_stored_on_the_worklist_audited_and_noticed(tmp_path: Path, models_dir: Path) -> None:
    svc = make_service(tmp_path, f"sqlite:///{tmp_path / 'svc.db'}", models_dir,
                       outputs={"dicom_destination": "PACS@127.0.0.1:1"})
    try:
        r = svc.upload([("nm.dcm", dicom_bytes("CT_small.dcm", Modality="NM"))])  # no installed model reads NM
        assert r.status_code == 202, r.text
        body = r.json()
        assert body["status"] == "not_analysed" and body["finding"] is None and body["job"] is None
        assert body["not_analysed_reason"].startswith("not analysed: no model applies") and "NM" in body["not_analysed_reason"]
        h = svc.headers["radiologist"]
        open_items = svc.client.get("/api/worklist", headers=h).json()["items"]  # the default filter: open
        assert [(i["id"], i["status"]) for i in open_items] == [(body["id"], "not_analysed")]
        only = svc.client.get("/api/worklist", params={"status": "not_analysed"}, headers=h).json()
        assert only["total"] == 1
        page = svc.client.get(f"/studies/{body['id']}", headers=h)
        assert page.status_code == 200 and "not analysed: no model applies" in page.text and 'id="finding"' not in page.text
        rows = svc.client.get("/worklist/rows", headers=h).text
        assert "not analysed: no model applies" in rows
        with svc.ctx.db.session() as s:
            jobs = list(s.execute(select(Job).where(Job.study_id == body["id"])).scalars())
            events = {e.action: e.detail for e in s.execute(select(AuditEvent)).scalars()}
        assert [j.kind for j in jobs] == ["deliver"] and jobs[0].payload["not_analysed"] is True  # no analyse job
        assert events["study.not_analysed"]["reason"] == body["not_analysed_reason"]
        blob = svc.ctx.store.read_bytes(jobs[0].payload["blobs"][0])
        assert pydicom.dcmread(io.BytesIO(blob)).Modality == "SR"
        assert b"121071" not in blob and b"No AI result will follow" in blob  # no Finding item, the reason
        assert svc.work() == 1  # the notice's delivery (it fails: nobody listens there), nothing is analysed
        with svc.ctx.db.session() as s:
            assert s.execute(select(Result)).first() is None
    finally:
        svc.client.close()
        svc.ctx.close()


def test_without_a_pacs_or_with_the_notice_off_no_notice_is_queued(tmp_path: Path, models_dir: Path) -> None:
    svc = make_service(tmp_path, f"sqlite:///{tmp_path / 'svc.db'}", models_dir,
                       outputs={"dicom_destination": "PACS@127.0.0.1:1"}, not_analysed_notice=False)
    try:
        nm = dicom_bytes("CT_small.dcm", Modality="NM")
        # an uploader who named the model gets the refusal, to choose another or override: nothing is stored
        r = svc.upload([("nm.dcm", nm)], model="tiny-xr")
        assert r.status_code == 422 and "model 'tiny-xr' does not apply" in r.json()["detail"]
        with svc.ctx.db.session() as s:
            assert s.execute(select(Study)).first() is None
        r = svc.upload([("nm.dcm", nm)])
        assert r.status_code == 202 and r.json()["status"] == "not_analysed"
        with svc.ctx.db.session() as s:
            assert s.execute(select(Job)).first() is None
    finally:
        svc.client.close()
        svc.ctx.close()


def _refer_everything(svc) -> None:  # noqa: ANN001
    """The tiny model, made to refer every image (as an uncertain or out-of-distribution model does)."""
    catalog = svc.ctx.catalog
    real = catalog.predictor

    def predictor(name: str):  # noqa: ANN202
        pred = real(name)

        class Referring:
            card = pred.card

            def stream(self, paths, **kw):  # noqa: ANN001, ANN202
                for p in pred.stream(paths, **kw):
                    yield dataclasses.replace(p, refer=True, statement="Refer to a human: the model is uncertain; "
                                                                       "no finding is reported.")

        return Referring()

    catalog.predictor = predictor


def test_a_referred_study_states_no_finding_and_is_not_flagged_critical(tmp_path: Path, models_dir: Path,
                                                                         shape_pngs) -> None:  # noqa: ANN001
    svc = make_service(tmp_path, f"sqlite:///{tmp_path / 'svc.db'}", models_dir, webhook={"url": "http://127.0.0.1:1/hook"})
    try:
        _refer_everything(svc)
        card_of = svc.ctx.catalog.card
        svc.ctx.catalog.card = lambda name: card_of(name).model_copy(update={"intended_use": "Sorting test phantoms."})
        r = svc.upload([("a.png", shape_pngs["disc"][0])], modality="CR")  # 'disc' is the tiny model's critical finding
        assert svc.work() == 1
        h = svc.headers["radiologist"]
        d = svc.client.get(f"/api/studies/{r.json()['id']}", headers=h).json()
        assert d["refer"] is True and d["finding"] is None and d["critical"] is False
        res = d["results"][0]
        assert res["reported_finding"] is None and res["label"] in res["labels"]  # the decided label stays on record
        page = svc.client.get(f"/studies/{d['id']}", headers=h).text
        headline = re.search(r'id="finding">([^<]*)<', page).group(1)
        assert headline == "Refer to a human reader"
        assert "Referral reason:" in page and "no finding is reported" in page
        assert f"evidence for {res['label']}" not in page  # the heat map is not said to explain a finding
        assert "not applicable" in page and "wrong body part" in page and "poor quality" in page
        assert "Intended use: Sorting test phantoms" in page  # the card's, on the study page as in the SR
        rows = svc.client.get("/worklist/rows", headers=h).text
        assert "no finding reported" in rows and "refer" in rows and res["label"] not in re.sub(r"<[^>]+>", " ", rows)
        with svc.ctx.db.session() as s:  # a referral announces no critical finding
            assert [j.kind for j in s.execute(select(Job)).scalars()] == ["analyse"]
            study = s.get(Study, d["id"])
            assert study.priority_base >= svc.ctx.settings.triage.refer  # still ranked for a human
    finally:
        svc.client.close()
        svc.ctx.close()


def test_an_excluded_image_is_never_training_data_nor_agreement(svc_sqlite, shape_pngs, tmp_path: Path) -> None:  # noqa: ANN001
    svc = svc_sqlite
    ids = [svc.upload([(f"{k}.png", png)], modality="CR").json()["id"] for k, png in enumerate(shape_pngs["disc"][:2])]
    assert svc.work() == 2
    h = svc.headers["radiologist"]
    excluded = svc.client.post(f"/api/studies/{ids[0]}/reviews", json={"label": "wrong body part"}, headers=h)
    assert excluded.status_code == 201, excluded.text
    assert excluded.json()["action"] == "exclude" and excluded.json()["findings"] == []
    kept = svc.client.post(f"/api/studies/{ids[1]}/reviews", json={"label": "disc"}, headers=h)
    assert kept.status_code == 201
    # the page's form posts an exclusion the same way
    form = svc.client.get(f"/studies/{ids[0]}", headers=h).text
    assert 'value="poor quality"' in form
    summary = export_reviews(svc.ctx, tmp_path / "export", Actor("test", "admin"))
    assert summary.cases == 1 and summary.labels == {"disc": 1}
    assert "wrong body part" not in (tmp_path / "export" / "manifest.csv").read_text()
    agreement = svc.client.get("/api/agreement", headers=svc.headers["admin"]).json()
    assert agreement["models"]["tiny-xr"]["disc"]["overall"]["n"] == 1


def test_a_study_analysed_again_shows_its_latest_analysis(svc, shape_pngs) -> None:  # noqa: ANN001
    study_id = svc.upload([("a.png", shape_pngs["bar"][0])], modality="CR").json()["id"]
    assert svc.work() == 1
    with svc.ctx.db.session() as s:  # analysed again (as after a late instance)
        svc.ctx.queue.enqueue(s, "analyse", study_id, {"reason": "late instances"}, max_attempts=1)
    assert svc.work() == 1
    d = svc.client.get(f"/api/studies/{study_id}", headers=svc.headers["radiologist"]).json()
    with svc.ctx.db.session() as s:
        jobs = sorted({r.job_id for r in s.execute(select(Result).where(Result.study_id == study_id)).scalars()})
    assert len(jobs) == 2
    assert len(d["results"]) == 1  # one image: the earlier analysis is superseded
    with svc.ctx.db.session() as s:
        latest = {r.id for r in s.execute(select(Result).where(Result.job_id == jobs[-1])).scalars()}
    assert {r["id"] for r in d["results"]} == latest and d["key_result_id"] in latest
