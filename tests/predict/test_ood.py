"""OOD scoring: the Predictor hook, the image-level block and storage integrity (fitting: tests/evaluate/test_ood_fit.py)."""

import shutil

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

import medsight
from medsight.errors import ModelIntegrityError
from medsight.evaluate.ood_fit import dataset_statistics, fit_ood
from medsight.io.datasets import load_npz
from medsight.io.image import MedImage
from medsight.predict.ood import BLOCKS, IMAGE, IMAGE_FEATURES, LAYERS, OOD_FILE, image_statistics, load_ood

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


def test_predictor_refers_noise_and_gradients_and_keeps_in_distribution_images(ood_package, tiny_npz):
    m = medsight.load_model(ood_package)
    test = load_npz(tiny_npz, "test", NAMES)
    ind = list(m.stream([test.images[i] for i in range(len(test))], explain=False))
    out = list(m.stream(noise_images(20) + gradient_images(20), explain=False))
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
    batch = list(m.stream([test.images[i] for i in range(5)], explain=False))
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


# -- the image-level block ---------------------------------------------------------------------
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
        s_in = np.array([p.ood_score for p in m.stream(images, explain=False)])
        s_col = np.array([p.ood_score for p in m.stream(tinted(images), explain=False)])
        auc = roc_auc_score(np.r_[np.zeros(len(s_in)), np.ones(len(s_col))], np.r_[s_in, s_col])
        if min_auc:
            assert auc >= min_auc
        else:
            assert auc < 0.9  # the network alone sees (almost) the same grey tensor
    # the Predictor's scores equal the detector on dataset_statistics (the benchmark's path)
    stats, _ = dataset_statistics(with_image.package, test)
    batch = list(with_image.stream(images[:5], explain=False))
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
