"""OOD detector: fitted numbers against reference implementations, storage integrity, and the Predictor hook."""

import json
import shutil

import numpy as np
import pytest
from scipy.spatial.distance import mahalanobis
from sklearn.covariance import LedoitWolf
from sklearn.metrics import roc_auc_score

import medsight
from medsight.errors import DataSetError, ModelIntegrityError
from medsight.io.datasets import load_npz
from medsight.models.package import sha256_of
from medsight.predict.ood import (LAYERS, OOD_FILE, LayerScorer, dataset_statistics, fit_detector, fit_ood, fold_assignment,
                                  out_of_fold_raw, threshold_for_flag_rate)

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


def gradient_images(n):
    """Smooth, natural-looking intensity ramps in every direction: no bar, no disc, no noise."""
    yy, xx = np.mgrid[:28, :28]
    return [((np.cos(a) * xx + np.sin(a) * yy) / 40 * 255 + 100).clip(0, 255).astype(np.uint8) for a in np.linspace(0, 6, n)]


def test_layer_scores_match_scipy_and_brute_force_neighbours():
    rng = np.random.default_rng(1)
    feats = rng.normal(size=(200, 5)) + np.repeat([[0.0] * 5, [3.0] * 5], 100, axis=0)
    y = np.repeat([0, 1], 100)
    ls = LayerScorer.fit(feats, y, k=3, bank_size=150, rng=np.random.default_rng(0))
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
            ls = LayerScorer.fit(train[n][~held], y[~held], 10, 2000, np.random.default_rng(0))
            oof[held, j] = ls.raw(train[n][held])
    np.testing.assert_allclose(out_of_fold_raw(train, y, LAYERS, folds=4, seed=7), oof)
    # the stored scorers are fold 0's (fitted on the other folds, as many images as every out-of-fold scorer); val scored by them
    for n in LAYERS:
        ref = LayerScorer.fit(train[n][fold != 0], y[fold != 0], 10, 2000, np.random.default_rng(0))
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


def test_predictor_refers_noise_and_gradients_and_keeps_in_distribution_images(ood_package, tiny_npz):
    m = medsight.load_model(ood_package)
    test = load_npz(tiny_npz, "test", NAMES)
    ind = m.predict_batch([test.images[i] for i in range(len(test))], explain=False)
    out = m.predict_batch(noise_images(20) + gradient_images(20), explain=False)
    assert all(p.ood_score is not None for p in ind + out)
    s_in, s_out = np.array([p.ood_score for p in ind]), np.array([p.ood_score for p in out])
    assert roc_auc_score(np.r_[np.zeros(len(s_in)), np.ones(len(s_out))], np.r_[s_in, s_out]) >= 0.99
    flagged_in = [p for p in ind if "unlike the model's training data" in p.statement]
    assert len(flagged_in) / len(ind) <= 0.04  # 1% target on val; 50 test images allow some noise
    for p in out:
        assert p.refer and p.statement.startswith("Refer to a human: the image looks unlike the model's training data")
        assert p.to_dict()["ood_score"] == pytest.approx(p.ood_score)


def test_ood_score_matches_batch_and_single_paths(ood_package, tiny_npz):
    m = medsight.load_model(ood_package)
    test = load_npz(tiny_npz, "test", NAMES)
    stats, _ = dataset_statistics(m.package, test)
    batch = m.predict_batch([test.images[i] for i in range(5)], explain=False)
    np.testing.assert_allclose([p.ood_score for p in batch], m.ood.score_statistics({k: v[:5] for k, v in stats.items()}), rtol=1e-5, atol=1e-6)


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


# -- the image-level block ---------------------------------------------------------------------
from medsight.io.image import MedImage  # noqa: E402
from medsight.predict.ood import BLOCKS, IMAGE, IMAGE_FEATURES, image_statistics, load_ood  # noqa: E402


def test_image_statistics_by_hand():
    grey = np.zeros((4, 4, 1), np.float32)
    grey[:2] = 0.9  # half the pixels at 0.9 (bin 7), half at 0 (bin 0)
    rgb = np.zeros((2, 2, 3), np.float32)
    rgb[..., 0] = 0.6  # every pixel (0.6, 0, 0): colourfulness 0.6, grey value 0.2 (bin 1)
    s = image_statistics([MedImage(grey), MedImage(rgb)])
    assert s.shape == (2, len(IMAGE_FEATURES))
    np.testing.assert_allclose(s[0, :3], [0.0, 0.45, 0.45], atol=1e-6)
    np.testing.assert_allclose(s[0, 3:], [0.5, 0, 0, 0, 0, 0, 0, 0.5])
    np.testing.assert_allclose(s[1, :3], [0.6, 0.2, 0.0], atol=1e-6)
    np.testing.assert_allclose(s[1, 3:], [0, 1, 0, 0, 0, 0, 0, 0])
    # resolution-independent: a 4x upsampled copy (subsampled back for the statistics) gives the same numbers
    big = MedImage(np.repeat(np.repeat(grey, 256, axis=0), 256, axis=1))
    np.testing.assert_allclose(image_statistics([big])[0], s[0], atol=1e-6)


@pytest.fixture(scope="module")
def image_ood_package(tiny_package, tiny_npz, tmp_path_factory):
    d = tmp_path_factory.mktemp("oodimg") / "tiny"
    shutil.copytree(tiny_package, d)
    fit_ood(d, load_npz(tiny_npz, "train", NAMES), load_npz(tiny_npz, "val", NAMES), blocks=BLOCKS,
            selection={"chosen": "network+image"})
    return d


def tinted(images):
    """The same grey images as colour photos (a magenta tint that keeps the luma a grey model's preprocessing takes:
    0.299 * 0.1 - 0.587 * d + 0.114 * 0.1 = 0), so the network's input is unchanged wherever no channel clips."""
    d = (0.299 + 0.114) * 0.1 / 0.587
    out = []
    for im in images:
        g = im.pixels[..., :1]
        out.append(MedImage(np.clip(np.concatenate([g + 0.1, g - d, g + 0.1], axis=2), 0, 1)))
    return out


def test_image_block_catches_colour_the_network_cannot_see(ood_package, image_ood_package, tiny_npz):
    test = load_npz(tiny_npz, "test", NAMES)
    images = [test.image(i) for i in range(len(test))]
    net_only, with_image = medsight.load_model(ood_package), medsight.load_model(image_ood_package)
    card = with_image.card.ood
    assert card["layers"] == list(BLOCKS) and card["selection"] == {"chosen": "network+image"}
    assert with_image.ood.uses_images and not net_only.ood.uses_images
    for m, min_auc in ((with_image, 0.99), (net_only, None)):
        s_in = np.array([p.ood_score for p in m.predict_batch(images, explain=False)])
        s_col = np.array([p.ood_score for p in m.predict_batch(tinted(images), explain=False)])
        auc = roc_auc_score(np.r_[np.zeros(len(s_in)), np.ones(len(s_col))], np.r_[s_in, s_col])
        if min_auc:
            assert auc >= min_auc
        else:
            assert auc < 0.9  # the network alone sees (almost) the same grey tensor
    # the Predictor's scores equal the detector on dataset_statistics (the benchmark's path)
    stats, _ = dataset_statistics(with_image.package, test)
    batch = with_image.predict_batch(images[:5], explain=False)
    np.testing.assert_allclose([p.ood_score for p in batch], with_image.ood.score_statistics({k: v[:5] for k, v in stats.items()}),
                               rtol=1e-5, atol=1e-6)


def test_image_block_needs_the_images(image_ood_package, tiny_npz):
    m = medsight.load_model(image_ood_package)
    stats, _ = dataset_statistics(m.package, load_npz(tiny_npz, "test", NAMES))
    with pytest.raises(ValueError, match="lack block"):
        m.ood.score_statistics({k: v for k, v in stats.items() if k != IMAGE})
    with pytest.raises(ValueError, match="pass the images"):
        m.ood.inputs({k: v for k, v in stats.items() if k != IMAGE})


def test_card_blocks_must_fit_the_file(image_ood_package, tmp_path):
    from medsight.models.package import load_package, read_card, write_card

    d = tmp_path / "p"
    shutil.copytree(image_ood_package, d)
    card = read_card(d)
    card.ood["layers"] = list(LAYERS)  # the file has 4 blocks of constants, the card now says 3
    write_card(card, d)
    with pytest.raises(ModelIntegrityError, match="standardisation constants"):
        load_ood(load_package(d))
    card.ood["layers"] = ["stem", "layer9"]
    write_card(card, d)
    with pytest.raises(Exception, match="OOD blocks must be"):
        load_ood(load_package(d))
