"""Local recalibration: better calibration measured, a new package version, the original untouched, refusals."""

import hashlib
import json
import shutil

import numpy as np
import pytest
from typer.testing import CliRunner

import medsight
from medsight.cli import app
from medsight.errors import DataSetError, ModelCardError, PackageOutputError, UnsupportedTaskError
from medsight.evaluate.calibration import fit_temperature, probabilities
from medsight.evaluate.recalibrate import bump_version, recalibrate, recalibrate_dataset, top_label_ece
from medsight.io.datasets import load_npz
from medsight.models.package import ModelPackage, read_card, write_card
from medsight.models.policy import decide
from medsight.models.preprocess import batch_to_tensor
from tests.conftest import make_images, tiny_card

NAMES = ["bar", "disc"]


def tree_digest(d):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.iterdir())}


@pytest.fixture
def overconfident(tiny_package, tmp_path):
    """The tiny model with a deliberately wrong temperature (0.25: far too confident)."""
    d = tmp_path / "src"
    shutil.copytree(tiny_package, d)
    card = read_card(d)
    card.calibration.temperature = 0.25
    write_card(card, d)
    return d


def test_recalibration_fixes_a_wrong_temperature_in_a_new_version(overconfident, tiny_npz, tmp_path):
    before = tree_digest(overconfident)
    out = tmp_path / "new"
    s = recalibrate(overconfident, tiny_npz, out, split="val", target_sensitivity=0.95, n_boot=50, method="temperature")
    assert tree_digest(overconfident) == before  # the original is untouched
    new = read_card(out)
    old = read_card(overconfident)
    assert new.version == "1.1.0" and new.name == old.name and new.weights_sha256 == old.weights_sha256
    # the stored temperature is the NLL fit on the same data, and calibration improved there
    m = medsight.load_model(out)
    val = load_npz(tiny_npz, "val", NAMES)
    logits = m.logits(batch_to_tensor([val.image(i) for i in range(len(val))], m.card.input))
    assert new.calibration.temperature == pytest.approx(fit_temperature(logits, val.y)[0])
    assert s["ece_after"] == pytest.approx(top_label_ece(probabilities(logits, new.calibration.temperature), val.y))
    assert s["ece_after"] < s["ece_before"] and new.calibration.nll_after <= new.calibration.nll_before
    # the threshold reaches the sensitivity target on the calibration data, with the Predictor's decision rule
    p, rows = m.dataset_probs(val)
    calls = [decide(m.card, row).label for row in p[val.y[rows] == 1]]
    assert np.mean([c == "disc" for c in calls]) >= 0.95
    # provenance and local results in the card
    rec = new.training["recalibration"]
    assert rec["base_model"] == "tiny@1.0.0" and rec["n"] == 50 and rec["temperature_before"] == 0.25
    assert new.validation_metrics["sensitivity"].value >= 0.95 and new.test_metrics == {}
    assert any("Recalibrated on local data" in x for x in new.limitations)


def test_refuses_to_overwrite_source_or_existing_package(overconfident, tiny_npz, tmp_path):
    before = tree_digest(overconfident)
    with pytest.raises(PackageOutputError, match="source package"):
        recalibrate(overconfident, tiny_npz, overconfident, n_boot=20)
    other = tmp_path / "taken"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    with pytest.raises(PackageOutputError, match="not empty"):
        recalibrate(overconfident, tiny_npz, other, n_boot=20)
    assert tree_digest(overconfident) == before and (other / "notes.txt").read_text() == "keep me"
    assert not list(tmp_path.glob(".*tmp-*"))  # no half-written package left behind


def test_new_version_keeps_the_int8_ranges_of_its_recorded_backend(overconfident, tiny_npz, tmp_path):
    """The new calibration is fitted on the recorded (auto) backend's outputs: the new version must be able
    to rebuild that backend, so the int8 calibration file named in card.runtime travels with the weights."""
    card = read_card(overconfident)
    (overconfident / "int8_calibration.json").write_text(json.dumps({"data": {"x": {"lowest": [0], "highest": [1]}}}))
    card.runtime = {"backend": "torch", "weights_sha256": card.weights_sha256,
                    "int8": {"calibration_file": "int8_calibration.json", "calibration_sha256": "0" * 64}}
    write_card(card, overconfident)
    out = tmp_path / "new"
    recalibrate(overconfident, tiny_npz, out, split="val", n_boot=20, method="temperature")
    assert (out / "int8_calibration.json").read_bytes() == (overconfident / "int8_calibration.json").read_bytes()
    assert read_card(out).runtime == card.runtime


def test_failure_midway_leaves_nothing(overconfident, tmp_path):
    imgs, labels = make_images(10, seed=3)
    np.savez(tmp_path / "one.npz", val_images=imgs[labels[:, 0] == 0], val_labels=labels[labels[:, 0] == 0])
    with pytest.raises(DataSetError, match="only one class"):
        recalibrate(overconfident, tmp_path / "one.npz", tmp_path / "new", split="val", n_boot=20)
    assert not (tmp_path / "new").exists() and not list(tmp_path.glob(".new.tmp-*"))


def test_multiclass_has_no_sensitivity_target(tmp_path):
    pkg = ModelPackage.new(tiny_card("tri", labels=("bar", "disc", "vbar"), task="multiclass")).save(tmp_path / "tri")
    imgs, labels = make_images(8, seed=1, classes=3)
    np.savez(tmp_path / "tri.npz", val_images=imgs, val_labels=labels)
    ds = load_npz(tmp_path / "tri.npz", "val", ["bar", "disc", "vbar"])
    with pytest.raises(UnsupportedTaskError, match="binary"):
        recalibrate_dataset(pkg, ds, tmp_path / "new", target_sensitivity=0.9, n_boot=20)
    s = recalibrate_dataset(pkg, ds, tmp_path / "new", n_boot=20)
    assert read_card(tmp_path / "new").thresholds == {} and s["threshold_rule"].startswith("argmax")


def test_bump_version():
    assert bump_version("1.0.0") == "1.1.0" and bump_version("2.7.3-rc1") == "2.8.0"
    with pytest.raises(ModelCardError):
        bump_version("latest")


def test_cli_calibrate_with_ood_fit_and_refusal(tiny_package, tiny_npz, tmp_path):
    r = CliRunner().invoke(app, ["calibrate", "-m", str(tiny_package), "-d", str(tiny_npz), "--out", str(tmp_path / "v2"),
                                 "--n-boot", "20", "--fit-ood", "--version", "1.0.1-site"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["base_model"] == "tiny@1.0.0"
    card = read_card(tmp_path / "v2")
    assert card.version == "1.0.1-site" and card.ood["fitted_on"] == "shapes:train"
    assert card.ood["threshold_rule"] == "cross-fit" and card.ood["threshold_set"].endswith(" + shapes:val")
    assert medsight.load_model(tmp_path / "v2").ood is not None
    r = CliRunner().invoke(app, ["calibrate", "-m", str(tiny_package), "-d", str(tiny_npz), "--out", str(tiny_package)])
    assert r.exit_code == 2 and "never overwrites the original" in r.output


def test_cli_ood_fit_in_place_and_refuses_names(tiny_package, tiny_npz, tmp_path):
    d = tmp_path / "pkg"
    shutil.copytree(tiny_package, d)
    r = CliRunner().invoke(app, ["ood", "fit", "-m", str(d), "-d", str(tiny_npz), "--flag-rate", "0.02"])
    assert r.exit_code == 0, r.output
    assert read_card(d).ood["target_flag_rate"] == 0.02 and (d / "ood.safetensors").is_file()
    assert read_card(d).ood["threshold_rule"] == "cross-fit" and read_card(d).ood["n_threshold_set"] == 150  # 100 out-of-fold + 50 val
    r = CliRunner().invoke(app, ["ood", "fit", "-m", str(d), "-d", str(tiny_npz), "--threshold-rule", "val"])
    assert r.exit_code == 0, r.output
    assert read_card(d).ood["threshold_set"] == "shapes:val" and read_card(d).ood["n_threshold_set"] == 50
    r = CliRunner().invoke(app, ["ood", "fit", "-m", str(d), "-d", str(tiny_npz), "--threshold-rule", "test"])
    assert r.exit_code == 2 and "threshold rule must be one of" in r.output
    r = CliRunner().invoke(app, ["ood", "fit", "-m", str(d), "-d", str(tiny_npz), "--folds", "60"])
    assert r.exit_code == 2 and "needs at least 120 training images" in r.output
    assert read_card(d).ood["layers"] == ["stem", "layer1", "layer2"]
    r = CliRunner().invoke(app, ["ood", "fit", "-m", str(d), "-d", str(tiny_npz), "--image-statistics"])
    assert r.exit_code == 0, r.output
    assert read_card(d).ood["layers"] == ["stem", "layer1", "layer2", "image"] and medsight.load_model(d).ood.uses_images
    r = CliRunner().invoke(app, ["ood", "fit", "-m", "pneumonia-cxr", "-d", str(tiny_npz)])
    assert r.exit_code == 2 and "not a package directory" in r.output


def test_auto_method_and_prior_adaptation_on_unlabelled_images(overconfident, tiny_npz, tmp_path):
    from PIL import Image

    from medsight.evaluate.calibration import calibrated_probabilities, select_calibration

    # unlabelled local images: only "disc" cases (a site with a very different case mix)
    test = load_npz(tiny_npz, "test", NAMES)
    folder = tmp_path / "unlabelled"
    folder.mkdir()
    for i in np.flatnonzero(test.y == 1):
        Image.fromarray(test.image(i).to_uint8()[..., 0]).save(folder / f"{i}.png")
    (folder / "broken.png").write_bytes(b"not an image")
    out = tmp_path / "adapted"
    r = CliRunner().invoke(app, ["calibrate", "--model", str(overconfident), "--data", str(tiny_npz), "--out", str(out),
                                 "--n-boot", "20", "--adapt-priors", str(folder)])
    assert r.exit_code == 0, r.output
    card = read_card(out)
    m = medsight.load_model(out)
    val = load_npz(tiny_npz, "val", NAMES)
    logits = m.logits(batch_to_tensor([val.image(i) for i in range(len(val))], m.card.input))
    cmap, info = select_calibration(logits, val.y)  # auto = the cross-validated choice on the calibration data
    assert card.calibration.method == info["chosen"] == cmap.method
    ps = card.calibration.prior_shift
    assert ps["n"] == int((test.y == 1).sum()) and ps["n_unreadable"] == 1
    assert ps["source_priors"] == pytest.approx(list(np.bincount(val.y, minlength=2) / len(val.y)))
    assert ps["target_priors"][1] > ps["source_priors"][1]  # more "disc" estimated at the site
    # the package's outputs are the map followed by the prior reweighting
    np.testing.assert_allclose(m.dataset_probs(val)[0], calibrated_probabilities(logits, card.calibration), atol=1e-6)


def test_unknown_method_and_missing_unlabelled_folder_are_clear_errors(overconfident, tiny_npz, tmp_path):
    r = CliRunner().invoke(app, ["calibrate", "--model", str(overconfident), "--data", str(tiny_npz), "--out",
                                 str(tmp_path / "a"), "--method", "platt"])
    assert r.exit_code == 2 and "unknown calibration method" in r.output
    r = CliRunner().invoke(app, ["calibrate", "--model", str(overconfident), "--data", str(tiny_npz), "--out",
                                 str(tmp_path / "b"), "--adapt-priors", str(tmp_path / "nowhere")])
    assert r.exit_code == 2 and "no such file or folder" in r.output
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
