"""Human review, agreement statistics, and the loop upload -> worker -> review -> export -> fine-tune."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sqlalchemy import select
from typer.testing import CliRunner

from medsight.serve.db import Instance, Job, Result, Review, Study


def _result(svc, label: str, n: int) -> tuple[int, int]:  # noqa: ANN001
    """A study with one analysed result whose model label is ``label`` (bypassing the model, for exact counts)."""
    with svc.ctx.db.session() as s:
        st = Study(study_uid=f"9.9.{n}", modality="CR", model="tiny-xr", requested_priority="routine", source_format="png",
                   status="analysed", received_epoch=0.0)
        s.add(st)
        s.flush()
        inst = Instance(study_id=st.id, file_sha256="0" * 64, file_size=1, original_name="x.png", format="png", rows=28, columns=28)
        job = Job(kind="analyse", study_id=st.id, status="done")
        s.add_all([inst, job])
        s.flush()
        p = 0.8 if label == "disc" else 0.2
        res = Result(study_id=st.id, instance_id=inst.id, job_id=job.id, model="tiny-xr@1.0.0", label=label,
                     labels=["bar", "disc"], task="binary", findings=["disc"], probabilities={"bar": 1 - p, "disc": p},
                     confidence=max(p, 1 - p), refer=False, statement="", critical_probability=p, critical=label == "disc",
                     display_sha256="0" * 64, created_by="test")
        s.add(res)
        s.flush()
        return st.id, res.id


def _wilson(k: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return centre - half, centre + half


def test_second_review_never_overwrites_and_agreement_uses_the_latest(svc) -> None:  # noqa: ANN001
    model_calls = ["disc", "disc", "bar", "bar", "disc"]
    reviewer = ["disc", "disc", "disc", "bar", "disc"]  # study 2 is first confirmed, then corrected below
    ids = [_result(svc, lab, i) for i, lab in enumerate(model_calls)]
    h = svc.headers["radiologist"]
    for (sid, _), lab in zip(ids, reviewer):
        r = svc.client.post(f"/api/studies/{sid}/reviews", headers=h, json={"label": lab, "note": f"read as {lab}"})
        assert r.status_code == 201, r.text
    first = svc.client.get(f"/api/studies/{ids[1][0]}/reviews", headers=h).json()
    assert len(first) == 1 and first[0]["action"] == "confirm" and first[0]["reviewer"] == "radiologist1"
    r = svc.client.post(f"/api/studies/{ids[1][0]}/reviews", headers=h, json={"findings": {"disc": False}, "note": "on second look: artefact"})
    assert r.status_code == 201 and r.json()["label"] == "bar" and r.json()["action"] == "correct"
    both = svc.client.get(f"/api/studies/{ids[1][0]}/reviews", headers=h).json()
    assert [x["label"] for x in both] == ["disc", "bar"] and both[0] == first[0]  # the first is untouched
    assert both[1]["findings"] == [{"finding": "disc", "model_present": True, "reviewer_present": False, "action": "correct"}]
    # Latest reviews: TP (0), FP (1, corrected), FN (2), TN (3), TP (4).
    ag = svc.client.get("/api/agreement", headers=svc.headers["auditor"]).json()
    d = ag["models"]["tiny-xr"]["disc"]["overall"]
    assert (d["tp"], d["fp"], d["fn"], d["tn"]) == (2, 1, 1, 1)
    assert d["sensitivity"]["value"] == pytest.approx(2 / 3) and d["specificity"]["value"] == pytest.approx(1 / 2)
    assert d["sensitivity"]["ci"] == pytest.approx(_wilson(2, 3), abs=1e-9)
    assert d["specificity"]["ci"] == pytest.approx(_wilson(1, 2), abs=1e-9)
    assert len(ag["models"]["tiny-xr"]["disc"]["over_time"]) == 1
    # The database refuses to rewrite a review.
    with pytest.raises(Exception, match="append-only"), svc.ctx.db.engine.begin() as conn:
        conn.exec_driver_sql("UPDATE reviews SET label = 'disc'")
    page = svc.client.get("/agreement", headers=svc.headers["auditor"])
    assert page.status_code == 200 and "67%" in page.text and "50%" in page.text


def test_review_validation(svc) -> None:  # noqa: ANN001
    sid, _ = _result(svc, "disc", 1)
    h = svc.headers["radiologist"]
    r = svc.client.post(f"/api/studies/{sid}/reviews", headers=h, json={"label": "tumour"})
    assert r.status_code == 422 and "not one of the model's labels" in r.json()["detail"]
    r = svc.client.post("/api/studies/999/reviews", headers=h, json={"label": "disc"})
    assert r.status_code == 404
    assert svc.client.post(f"/api/studies/{sid}/reviews", headers=svc.headers["admin"], json={"label": "disc"}).status_code == 403


def test_upload_review_export_finetune_end_to_end(svc_sqlite, shape_pngs, tmp_path: Path) -> None:  # noqa: ANN001
    """The storage and API it uses are covered on both databases elsewhere; training does not touch the database."""
    svc = svc_sqlite
    from medsight import load_model
    from medsight.cli import app
    from medsight.io.datasets import load_dataset

    truth = {}
    for lab in ("disc", "bar"):
        for k, data in enumerate(shape_pngs[lab][:7]):
            r = svc.upload([(f"{lab}{k}.png", data)], modality="CR", accession_number=f"{lab}-{k}")
            assert r.status_code == 202
            truth[r.json()["id"]] = lab
    assert svc.work() == 14
    h = svc.headers["radiologist"]
    for sid, lab in truth.items():
        assert svc.client.post(f"/api/studies/{sid}/reviews", headers=h, json={"label": lab}).status_code == 201
    with svc.ctx.db.session() as s:
        assert {st.status for st in s.execute(select(Study)).scalars()} == {"reviewed"}
        assert len(s.execute(select(Review)).scalars().all()) == 14

    settings = svc.ctx.settings.model_copy(update={"database_url": svc.ctx.settings.db_url}).write_json(tmp_path / "s.json")
    out = tmp_path / "export"
    runner = CliRunner()
    r = runner.invoke(app, ["export-reviews", "--out", str(out), "--settings", str(settings)])
    assert r.exit_code == 0, r.output
    summary = json.loads(r.output)
    assert summary["cases"] == 14 and summary["labels"] == {"disc": 7, "bar": 7}
    rows = list(csv.DictReader(open(out / "manifest.csv")))
    assert list(rows[0])[:2] == ["path", "label"]
    for row in rows:
        img = Image.open(out / row["path"])
        assert img.format == "PNG" and img.mode.startswith("I;16") and img.size == (28, 28)
    # Pixels survive exactly (8-bit source -> 16-bit PNG = value * 257).
    ds = load_dataset(out / "manifest.csv")
    assert sorted(ds.label_names) == ["bar", "disc"] and len(ds) == 14
    assert all(int(v) % 257 == 0 for v in np.unique(np.asarray(Image.open(out / rows[0]["path"]))))

    base = svc.ctx.catalog.card("tiny-xr")
    newpkg = tmp_path / "tiny-xr-site"
    r = runner.invoke(app, ["train", "--data", str(out / "manifest.csv"), "--base", str(models_dir_of(svc) / "tiny-xr"),
                            "--out", str(newpkg), "--epochs", "2", "--batch-size", "8"])
    assert r.exit_code == 0, r.output
    info = json.loads(r.output[r.output.index("{"):])
    assert info["labels"] == ["bar", "disc"] and info["version"] == "1.1.0" != base.version
    model = load_model(newpkg)
    assert model.card.training["base"] == "tiny-xr@1.0.0"
    assert model.card.training["dataset"].endswith("manifest.csv")
    pred = model.predict(out / rows[0]["path"])
    assert set(pred.probabilities) == {"bar", "disc"}


def models_dir_of(svc) -> Path:  # noqa: ANN001
    return svc.ctx.settings.model_paths[0]
