"""``medsight predict`` routes DICOM files like the service, and marks a chosen model's out-of-scope results."""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image
from pydicom.data import get_testdata_file
from typer.testing import CliRunner

from medsight.cli import app

runner = CliRunner()
SHOULDER_MR, TIBIA_CR, ADULT_CXR = (get_testdata_file(n) for n in ("MR2_UNCR.dcm", "RG3_UNCR.dcm", "RG1_UNCR.dcm"))


def _rows(output: str) -> dict[str, dict]:
    rows = [json.loads(line) for line in output.splitlines() if line.startswith("{")]
    return {Path(r["path"]).name: r for r in rows}


def test_without_model_each_dicom_goes_to_the_model_it_fits_or_to_none(tmp_path: Path) -> None:
    png = tmp_path / "photo.png"
    Image.new("L", (32, 32), 128).save(png)
    r = runner.invoke(app, ["predict", SHOULDER_MR, TIBIA_CR, ADULT_CXR, str(png), "--json", "--no-heatmap",
                            "--out", str(tmp_path)])
    assert r.exit_code == 1, r.output  # three inputs were not analysed
    rows = _rows(r.stdout)
    assert rows["MR2_UNCR.dcm"]["error_type"] == "not_analysed"
    assert "no model applies (SHOULDER MR)" in rows["MR2_UNCR.dcm"]["error"]
    assert rows["RG3_UNCR.dcm"]["error_type"] == "not_analysed" and "reads CHEST" in rows["RG3_UNCR.dcm"]["error"]
    assert rows["photo.png"]["error_type"] == "not_analysed" and "--model" in rows["photo.png"]["error"]
    assert rows["RG1_UNCR.dcm"]["model"].startswith("covid-cxr@") and "label" in rows["RG1_UNCR.dcm"]
    assert "applicability" not in rows["RG1_UNCR.dcm"]


def test_a_chosen_model_outside_its_declared_use_runs_but_says_so(tmp_path: Path) -> None:
    r = runner.invoke(app, ["predict", SHOULDER_MR, "--model", "pneumonia-cxr", "--json", "--no-heatmap",
                            "--out", str(tmp_path)])
    assert r.exit_code == 0, r.output
    row = _rows(r.stdout)["MR2_UNCR.dcm"]
    assert "label" in row and row["applicability"].startswith("outside declared use: pneumonia-cxr reads CR/DX, not MR")
    assert "warning" in r.stderr and "outside declared use" in r.stderr
