"""OOD detector: fitted numbers against reference implementations, storage integrity, and the Predictor hook."""

import json
import shutil

import numpy as np
import pytest
from scipy.spatial.distance import mahalanobis
from sklearn.covariance import LedoitWolf
from sklearn.metrics import roc_auc_score

import medsight
from medsight.errors import ModelIntegrityError
from medsight.io.datasets import load_npz
from medsight.models.package import sha256_of
from medsight.predict.ood import OOD_FILE, OODDetector, dataset_features, fit_mahalanobis, fit_ood, threshold_for_flag_rate

NAMES = ["bar", "disc"]


@pytest.fixture(scope="module")
def ood_package(tiny_package, tiny_npz, tmp_path_factory):
    d = tmp_path_factory.mktemp("oodpkg") / "tiny"
    shutil.copytree(tiny_package, d)
    fit_ood(d, load_npz(tiny_npz, "train", NAMES), load_npz(tiny_npz, "val", NAMES))
    return d


def noise_images(n, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (28, 28)).astype(np.uint8) for _ in range(n)]


def test_score_is_squared_mahalanobis_to_nearest_class_mean():
    rng = np.random.default_rng(1)
    feats = rng.normal(size=(200, 5)) + np.repeat([[0.0] * 5, [3.0] * 5], 100, axis=0)
    y = np.repeat([0, 1], 100)
    means, precision = fit_mahalanobis(feats, y)
    np.testing.assert_allclose(means, [feats[:100].mean(0), feats[100:].mean(0)])
    centred = np.vstack([feats[:100] - means[0], feats[100:] - means[1]])
    np.testing.assert_allclose(precision, LedoitWolf(assume_centered=True).fit(centred).precision_)
    det = OODDetector(means, precision, threshold=10.0)
    x = rng.normal(size=(7, 5)) * 3
    ref = [min(mahalanobis(v, m, precision) ** 2 for m in means) for v in x]
    np.testing.assert_allclose(det.score_features(x), ref, rtol=1e-10)
    assert list(det.flags(det.score_features(x))) == [r > 10.0 for r in ref]


def test_threshold_flags_at_most_the_requested_share():
    scores = np.arange(1, 101, dtype=float)  # 1..100
    assert threshold_for_flag_rate(scores, 0.02) == 98.0  # 99 and 100 flagged: exactly 2%
    assert threshold_for_flag_rate(scores, 0.0) == 100.0  # nothing flagged
    assert threshold_for_flag_rate(np.array([5.0, 1.0, 3.0]), 0.02) == 5.0  # floor(0.06) = 0 may be flagged
    rng = np.random.default_rng(0)
    s = rng.normal(size=333)
    for rate in (0.01, 0.02, 0.1):
        assert np.mean(s > threshold_for_flag_rate(s, rate)) <= rate


def test_fit_ood_writes_file_and_card_without_touching_weights(ood_package, tiny_package, tiny_npz):
    card = json.loads((ood_package / "card.json").read_text())
    original = json.loads((tiny_package / "card.json").read_text())
    ood = card.pop("ood")
    assert original.pop("ood") is None and card == original  # only the ood field changed
    assert ood["method"] == "mahalanobis" and ood["sha256"] == sha256_of(ood_package / OOD_FILE)
    assert ood["n_fit"] == 100 and ood["n_threshold_set"] == 50 and ood["fitted_on"] == "shapes:train"
    # the stored threshold flags at most the target share of the validation images it was chosen on
    m = medsight.load_model(ood_package)
    val = load_npz(tiny_npz, "val", NAMES)
    feats, _ = dataset_features(m.package, val)
    rate = float(np.mean(m.ood.flags(m.ood.score_features(feats))))
    assert rate == pytest.approx(ood["flag_rate_on_threshold_set"]) and rate <= ood["target_flag_rate"]


def test_predictor_refers_noise_and_keeps_in_distribution_images(ood_package, tiny_npz):
    m = medsight.load_model(ood_package)
    test = load_npz(tiny_npz, "test", NAMES)
    ind = [m.predict(test.images[i], explain=False) for i in range(len(test))]
    out = [m.predict(x, explain=False) for x in noise_images(20)]
    assert all(p.ood_score is not None for p in ind + out)
    s_in, s_out = np.array([p.ood_score for p in ind]), np.array([p.ood_score for p in out])
    assert roc_auc_score(np.r_[np.zeros(len(s_in)), np.ones(len(s_out))], np.r_[s_in, s_out]) >= 0.99
    flagged_in = [p for p in ind if "unlike the model's training data" in p.statement]
    assert len(flagged_in) / len(ind) <= 0.06  # 1% target on val; 50 test images allow some noise
    for p in out:
        assert p.refer and p.statement.startswith("Refer to a human: the image looks unlike the model's training data")
        assert p.to_dict()["ood_score"] == pytest.approx(p.ood_score)


def test_ood_score_matches_batch_and_single_paths(ood_package, tiny_npz):
    m = medsight.load_model(ood_package)
    test = load_npz(tiny_npz, "test", NAMES)
    feats, _ = dataset_features(m.package, test)
    batch = m.predict_batch([test.images[i] for i in range(5)], explain=False)
    np.testing.assert_allclose([p.ood_score for p in batch], m.ood.score_features(feats[:5]), rtol=1e-6)


def test_package_without_detector_has_no_score(tiny_package, tiny_npz):
    m = medsight.load_model(tiny_package)
    assert m.ood is None
    assert m.predict(noise_images(1)[0], explain=False).ood_score is None


def test_tampered_or_missing_ood_file_is_refused(ood_package, tmp_path):
    d = tmp_path / "pkg"
    shutil.copytree(ood_package, d)
    raw = bytearray((d / OOD_FILE).read_bytes())
    raw[-1] ^= 0xFF
    (d / OOD_FILE).write_bytes(bytes(raw))
    with pytest.raises(ModelIntegrityError, match="does not match the card"):
        medsight.load_model(d)
    (d / OOD_FILE).unlink()
    with pytest.raises(ModelIntegrityError, match="missing"):
        medsight.load_model(d)


def test_fit_without_val_holds_out_part_of_train(tiny_package, tiny_npz, tmp_path):
    d = tmp_path / "pkg"
    shutil.copytree(tiny_package, d)
    info = fit_ood(d, load_npz(tiny_npz, "train", NAMES), val_flag_rate=0.02)
    assert info["n_fit"] == 80 and info["n_threshold_set"] == 20 and "held out" in info["threshold_set"]
    assert info["flag_rate_on_threshold_set"] <= 0.02
