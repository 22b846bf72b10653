"""Backend choice and the Predictor's single code path on every backend."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

import medsight
from medsight.cli import app
from medsight.errors import BackendError
from medsight.evaluate.ood_fit import fit_ood
from medsight.io.datasets import load_npz
from medsight.models.package import load_package, read_card, write_card
from medsight.models.preprocess import batch_to_tensor
from medsight.predict.load import load_model
from medsight.predict.backends import OnnxBackend, TorchBackend, make_backend, recorded_choice

NAMES = ["bar", "disc"]


def test_unknown_backend_is_rejected(tiny_package, runtime_settings):
    with pytest.raises(BackendError, match="unknown backend 'tensorrt'"):
        make_backend(load_package(tiny_package), "tensorrt", runtime_settings)


def test_auto_follows_the_card_record_for_these_weights_only(package_copy, runtime_settings):
    pkg = load_package(package_copy)
    assert recorded_choice(pkg.card)[0] == "torch"  # nothing recorded yet
    assert isinstance(make_backend(pkg, "auto", runtime_settings), TorchBackend)
    card = read_card(package_copy)
    card.runtime = {"backend": "onnx", "weights_sha256": card.weights_sha256, "reason": "measured"}
    write_card(card, package_copy)
    pkg = load_package(package_copy)
    b = make_backend(pkg, "auto", runtime_settings)
    assert isinstance(b, OnnxBackend) and b.name == "onnx"
    pkg.card.runtime["weights_sha256"] = "0" * 64  # a record measured for other weights is ignored
    choice, reason = recorded_choice(pkg.card)
    assert choice == "torch" and "other weights" in reason


def test_int8_without_calibration_says_how_to_get_it(tiny_package, runtime_settings):
    with pytest.raises(BackendError, match="medsight runtime tune"):
        make_backend(load_package(tiny_package), "onnx-int8", runtime_settings)


def test_predictions_identical_in_all_but_the_forward_step(tiny_package, tiny_npz, sample_files, runtime_settings, tmp_path):
    """Same labels, referral, statements; probabilities and OOD scores equal to float precision."""
    import shutil

    d = shutil.copytree(tiny_package, tmp_path / "ood")
    fit_ood(d, load_npz(tiny_npz, "train", NAMES), load_npz(tiny_npz, "val", NAMES))
    pkg = load_package(d)
    ref = load_model(pkg, "torch", runtime_settings)
    fast = load_model(pkg, "onnx", runtime_settings)
    a, b = list(ref.stream(sample_files, explain=False)), list(fast.stream(sample_files, explain=False))
    for ra, rb in zip(a, b):
        assert (ra.label, ra.refer, ra.statement) == (rb.label, rb.refer, rb.statement)
        assert ra.probabilities == pytest.approx(rb.probabilities, abs=1e-5)
        assert rb.ood_score == pytest.approx(ra.ood_score, rel=1e-4)
    # OOD scores from the feature map equal the detector's own feature extraction
    x = batch_to_tensor([r.image for r in a], pkg.card.input)
    np.testing.assert_allclose([r.ood_score for r in a], ref.ood.score(pkg.network, x), rtol=1e-5)
    np.testing.assert_allclose(fast.logits(x), ref.network(x).detach().numpy(), atol=1e-4)


def test_load_model_takes_a_backend(tiny_package, sample_files, monkeypatch, tmp_path):
    monkeypatch.setenv("MEDSIGHT_CACHE_DIR", str(tmp_path))
    m = medsight.load_model(tiny_package, backend="onnx")
    assert m.backend.name == "onnx" and m.predict(sample_files[0]).heatmap is not None
    assert list((tmp_path / "onnx").glob("*.onnx"))  # built on first use, in the cache


def test_cli_backend_option(tiny_package, sample_files, monkeypatch, tmp_path):
    monkeypatch.setenv("MEDSIGHT_CACHE_DIR", str(tmp_path / "cache"))
    runner = CliRunner()
    rows = {}
    for backend in ("torch", "onnx"):
        r = runner.invoke(app, ["predict", *map(str, sample_files[:3]), "-m", str(tiny_package), "--json",
                                "--backend", backend, "-o", str(tmp_path / backend)])
        assert r.exit_code == 0, r.output
        rows[backend] = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    for a, b in zip(rows["torch"], rows["onnx"]):
        assert a["label"] == b["label"] and a["probabilities"] == pytest.approx(b["probabilities"], abs=1e-5)
    r = runner.invoke(app, ["predict", str(sample_files[0]), "-m", str(tiny_package), "--backend", "tensorrt"])
    assert r.exit_code == 2 and "unknown backend" in r.output


def test_load_model_defaults_to_the_recorded_backend(package_copy, sample_files, monkeypatch, tmp_path):
    """The library default is auto, so everything that loads through load_model (the CLI, the DICOM
    gateway) runs the card's recorded backend; torch stays available as the reference."""
    monkeypatch.setenv("MEDSIGHT_CACHE_DIR", str(tmp_path / "cache"))
    assert medsight.load_model(package_copy).backend.name == "torch"  # nothing recorded yet
    card = read_card(package_copy)
    card.runtime = {"backend": "onnx", "weights_sha256": card.weights_sha256, "reason": "measured"}
    write_card(card, package_copy)
    fast, ref = medsight.load_model(package_copy), medsight.load_model(package_copy, backend="torch")
    assert fast.backend.name == "onnx" and ref.backend.name == "torch"
    a, b = fast.predict(sample_files[0]), ref.predict(sample_files[0])
    assert a.label == b.label and a.probabilities == pytest.approx(b.probabilities, abs=1e-5)
