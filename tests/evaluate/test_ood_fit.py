"""OOD fitting: fitted numbers against reference implementations, the threshold rules, and what fit_ood stores."""

import json
import shutil

import numpy as np
import pytest
from scipy.spatial.distance import mahalanobis
from sklearn.covariance import LedoitWolf

import medsight
from medsight.errors import DataSetError
from medsight.evaluate.ood_fit import (dataset_statistics, fit_detector, fit_ood, fit_scorer, fold_assignment, out_of_fold_raw,
                                       threshold_for_flag_rate)
from medsight.io.datasets import load_npz
from medsight.models.package import sha256_of
from medsight.predict.ood import LAYERS, OOD_FILE
from tests.predict.test_ood import NAMES, ood_package  # noqa: F401  (the fixture: a tiny package with a fitted detector)

def test_layer_scores_match_scipy_and_brute_force_neighbours():
    rng = np.random.default_rng(1)
    feats = rng.normal(size=(200, 5)) + np.repeat([[0.0] * 5, [3.0] * 5], 100, axis=0)
    y = np.repeat([0, 1], 100)
    ls = fit_scorer(feats, y, k=3, bank_size=150, rng=np.random.default_rng(0))
    np.testing.assert_allclose(ls.class_means, [feats[:100].mean(0), feats[100:].mean(0)])
    centred = np.vstack([feats[:100] - ls.class_means[0], feats[100:] - ls.class_means[1]])
    np.testing.assert_allclose(ls.precision, LedoitWolf(assume_centered=True).fit(centred).precision_)
    assert ls.bank.shape == (150, 5) and ls.bank.dtype == np.float32 and np.allclose(np.linalg.norm(ls.bank, axis=1), 1, atol=1e-6)
    x = rng.normal(size=(7, 5)) * 3
    ref = [min(mahalanobis(v, m, ls.precision) ** 2 for m in ls.class_means) for v in x]
    np.testing.assert_allclose(ls.mahalanobis(x), ref, rtol=1e-10)
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    cos_dist = np.sort(np.sqrt(np.maximum(2 - 2 * unit @ ls.bank.T, 0)), axis=1)[:, 2]  # 3rd nearest
    np.testing.assert_allclose(ls.knn(x), cos_dist, atol=1e-6)  # the bank is float32


def test_total_score_is_the_sum_of_standardised_components():
    rng = np.random.default_rng(2)
    train = {n: rng.normal(size=(120, 4)) for n in LAYERS}
    val = {n: rng.normal(size=(60, 4)) for n in LAYERS}
    det, val_scores = fit_detector(train, rng.integers(0, 2, 120), val, val_flag_rate=0.05, threshold_rule="val")
    raw = np.stack([det.layers[n].raw(val[n]) for n in LAYERS], axis=1)
    np.testing.assert_allclose(det.z_mean, raw.mean(0))
    np.testing.assert_allclose(det.components(val).mean(axis=0), 0, atol=1e-9)  # standardised on val
    np.testing.assert_allclose(val_scores, ((raw - raw.mean(0)) / raw.std(0)).sum(axis=(1, 2)))
    assert np.mean(val_scores > det.threshold) <= 0.05
    far = {n: v + 6.0 for n, v in val.items()}
    assert det.flags(det.score_statistics(far)).all()


def test_cross_fitted_threshold_set_is_out_of_fold_train_then_val():
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 120)
    train = {n: rng.normal(size=(120, 4)) + y[:, None] for n in LAYERS}
    val = {n: rng.normal(size=(30, 4)) for n in LAYERS}
    det, pool = fit_detector(train, y, val, val_flag_rate=0.05, folds=4, seed=7)
    assert pool.shape == (150,)
    # out-of-fold raw scores by hand: each fold scored by scorers fitted on the other folds only
    fold = fold_assignment(y, 4, seed=7)
    oof = np.empty((120, len(LAYERS), 2))
    for f in range(4):
        held = fold == f
        for j, n in enumerate(LAYERS):
            ls = fit_scorer(train[n][~held], y[~held], 10, 2000, np.random.default_rng(0))
            oof[held, j] = ls.raw(train[n][held])
    np.testing.assert_allclose(out_of_fold_raw(train, y, LAYERS, folds=4, seed=7), oof)
    # the stored scorers are fold 0's (fitted on the other folds, as many images as every out-of-fold scorer); val scored by them
    for n in LAYERS:
        ref = fit_scorer(train[n][fold != 0], y[fold != 0], 10, 2000, np.random.default_rng(0))
        np.testing.assert_allclose(det.layers[n].precision, ref.precision)
        np.testing.assert_allclose(det.layers[n].bank, ref.bank)
    raw = np.concatenate([oof, np.stack([det.layers[n].raw(val[n]) for n in LAYERS], axis=1)])
    np.testing.assert_allclose(det.z_mean, raw.mean(0))  # standardised on the pooled set
    np.testing.assert_allclose(det.z_std, raw.std(0))
    np.testing.assert_allclose(pool[120:], det.score_statistics(val))  # val part = the final detector's scores
    assert det.threshold == threshold_for_flag_rate(pool, 0.05) and np.mean(pool > det.threshold) <= 0.05
    # without val: the out-of-fold scores alone
    _, only_oof = fit_detector(train, y, None, folds=4, seed=7)
    assert only_oof.shape == (120,)


def test_folds_are_seeded_stratified_and_balanced():
    y = np.repeat([0, 1, 2], [50, 7, 3])
    f = fold_assignment(y, 5, seed=1)
    np.testing.assert_array_equal(f, fold_assignment(y, 5, seed=1))
    assert not np.array_equal(f, fold_assignment(y, 5, seed=2))
    assert sorted(np.bincount(f, minlength=5)) == [12] * 5
    assert np.bincount(f[y == 0], minlength=5).tolist() == [10] * 5  # each class spread over the folds
    assert set(np.bincount(f[y == 1], minlength=5)) <= {1, 2}


def test_out_of_fold_scores_never_see_their_own_image():
    rng = np.random.default_rng(4)
    x = rng.normal(size=(40, 3))
    train, y = {n: x for n in LAYERS}, np.zeros(40, int)
    det, _ = fit_detector(train, y, None, k=1, folds=4)
    fold0 = fold_assignment(y, 4) == 0
    d = det.layers["stem"].knn(x)
    assert np.allclose(d[~fold0], 0, atol=1e-6)  # the stored detector's bank: its images are their own nearest neighbour
    assert (d[fold0] > 1e-3).all()  # fold 0 was held out of the stored detector
    assert (out_of_fold_raw(train, y, LAYERS, folds=4, k=1)[:, 0, 1] > 1e-3).all()


def _gaussian(rng, n, d=4):
    return {name: rng.normal(size=(n, d)) for name in LAYERS}


@pytest.mark.parametrize("folds", [5, 10])
def test_cross_fitted_flag_rate_on_fresh_data_is_close_to_nominal_and_beats_a_tiny_val_set(folds):
    """Known distribution: in-distribution images are N(0, I) in every block. With 400 training and 20
    validation images, the val rule's threshold is the largest val score (floor(0.02 * 20) = 0), whose
    exceedance on fresh data is 1/21 in expectation and varies a lot; the cross-fitted pool has 420.
    Storing scorers fitted on all 400 images with that same threshold would flag far too few fresh
    images (they score lower than the out-of-fold images did): the stored detector must be a fold's."""
    nominal, dev_cf, dev_val, rates_cf, rates_all = 0.02, [], [], [], []
    for seed in range(12):
        rng = np.random.default_rng(100 + seed)
        train, val, fresh = _gaussian(rng, 400), _gaussian(rng, 20), _gaussian(rng, 4000)
        y = rng.integers(0, 2, 400)
        cf, _ = fit_detector(train, y, val, val_flag_rate=nominal, seed=seed, folds=folds)
        vr, _ = fit_detector(train, y, val, val_flag_rate=nominal, seed=seed, threshold_rule="val")
        r_cf, r_val = cf.flags(cf.score_statistics(fresh)).mean(), vr.flags(vr.score_statistics(fresh)).mean()
        rates_cf.append(r_cf)
        dev_cf.append(abs(r_cf - nominal))
        dev_val.append(abs(r_val - nominal))
        # the rejected design: scorers fitted on all of train, threshold from the same kind of pool
        raw = np.concatenate([out_of_fold_raw(train, y, LAYERS, folds, seed=seed),
                              np.stack([vr.layers[n].raw(val[n]) for n in LAYERS], axis=1)])
        z = ((raw - raw.mean(0)) / raw.std(0)).sum(axis=(1, 2))
        fresh_all = ((np.stack([vr.layers[n].raw(fresh[n]) for n in LAYERS], axis=1) - raw.mean(0)) / raw.std(0)).sum(axis=(1, 2))
        rates_all.append(np.mean(fresh_all > threshold_for_flag_rate(z, nominal)))
    assert 0.75 * nominal <= np.mean(rates_cf) <= 1.5 * nominal
    assert np.mean(dev_cf) < 0.01
    assert np.mean(dev_cf) < 0.5 * np.mean(dev_val)
    assert np.mean(rates_all) < 0.6 * nominal < np.mean(rates_cf)


def test_bad_threshold_sets_are_refused_clearly():
    rng = np.random.default_rng(5)
    train, val, y = _gaussian(rng, 30), _gaussian(rng, 10), np.zeros(30, int)
    with pytest.raises(DataSetError, match="needs at least 20 training images .*got 19"):
        fit_detector({n: v[:19] for n, v in train.items()}, y[:19], val)
    with pytest.raises(DataSetError, match="needs at least 10 training images"):
        fit_detector({n: v[:9] for n, v in train.items()}, y[:9], val, folds=5)
    with pytest.raises(DataSetError, match="validation set is empty"):
        fit_detector(train, y, {n: v[:0] for n, v in val.items()})
    with pytest.raises(DataSetError, match="at least two validation images"):
        fit_detector(train, y, None, threshold_rule="val")
    with pytest.raises(DataSetError, match="at least two training images"):
        fit_detector({n: v[:1] for n, v in train.items()}, y[:1], val)
    with pytest.raises(ValueError, match="at least 2 folds"):
        fit_detector(train, y, val, folds=1)
    with pytest.raises(ValueError, match="threshold rule must be one of"):
        fit_detector(train, y, val, threshold_rule="test")
    with pytest.raises(ValueError, match="one row per label"):
        fit_detector(train, y[:20], val)
    with pytest.raises(DataSetError, match="empty set"):
        threshold_for_flag_rate(np.array([]), 0.01)


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
    assert ood["method"] == "feature-statistics" and ood["sha256"] == sha256_of(ood_package / OOD_FILE)
    assert ood["n_fit"] == 90 and ood["fitted_on"] == "shapes:train"  # all folds but fold 0
    # the threshold set: the 100 training images' out-of-fold scores, then the 50 val images
    assert ood["threshold_rule"] == "cross-fit" and ood["folds"] == 10 and ood["n_threshold_set"] == 150
    assert ood["threshold_set"] == "shapes:train out-of-fold (10 class-stratified folds, seed 0) + shapes:val"
    parts = ood["threshold_set_parts"]
    assert [(p["name"], p["n"]) for p in parts] == [("shapes:train out-of-fold (10 class-stratified folds, seed 0)", 100), ("shapes:val", 50)]
    assert ood["flag_rate_on_threshold_set"] <= ood["target_flag_rate"]
    assert ood["flag_rate_on_threshold_set"] == pytest.approx((100 * parts[0]["flag_rate"] + 50 * parts[1]["flag_rate"]) / 150)
    # the stored detector gives the recorded flag rate on the val part of the threshold set
    m = medsight.load_model(ood_package)
    val = load_npz(tiny_npz, "val", NAMES)
    stats, _ = dataset_statistics(m.package, val)
    rate = float(np.mean(m.ood.flags(m.ood.score_statistics(stats))))
    assert rate == pytest.approx(parts[1]["flag_rate"])


def test_fit_without_val(tiny_package, tiny_npz, tmp_path):
    d = tmp_path / "pkg"
    shutil.copytree(tiny_package, d)
    train = load_npz(tiny_npz, "train", NAMES)
    # default: every training image is fitted on and thresholded on through its out-of-fold score
    info = fit_ood(d, train, val_flag_rate=0.02)
    assert info["n_fit"] == 90 and info["n_threshold_set"] == 100 and "out-of-fold" in info["threshold_set"]
    assert info["flag_rate_on_threshold_set"] <= 0.02 and len(info["threshold_set_parts"]) == 1
    # the val rule without val: a seeded 20% of train held out of the fit
    info = fit_ood(d, train, val_flag_rate=0.02, threshold_rule="val")
    assert info["n_fit"] == 80 and info["n_threshold_set"] == 20 and "held out" in info["threshold_set"]
    assert info["flag_rate_on_threshold_set"] <= 0.02 and info["threshold_rule"] == "val" and "folds" not in info
    assert medsight.load_model(d).ood.threshold == info["threshold"]


def test_val_rule_keeps_the_earlier_behaviour(tiny_package, tiny_npz, tmp_path):
    d = tmp_path / "pkg"
    shutil.copytree(tiny_package, d)
    info = fit_ood(d, load_npz(tiny_npz, "train", NAMES), load_npz(tiny_npz, "val", NAMES), threshold_rule="val")
    assert info["threshold_set"] == "shapes:val" and info["n_threshold_set"] == 50 and info["n_fit"] == 100
    assert info["threshold_set_parts"] == [{"name": "shapes:val", "n": 50, "flag_rate": info["flag_rate_on_threshold_set"]}]
    with pytest.raises(ValueError, match="threshold rule"):
        fit_ood(d, load_npz(tiny_npz, "train", NAMES), threshold_rule="test")
