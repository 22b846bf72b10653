import numpy as np
import pytest

from medsight.io.image import MedImage
from medsight.models.card import InputSpec
from medsight.models.preprocess import match_channels, to_tensor


def test_normalisation_is_exact_for_same_size():
    img = MedImage(np.full((4, 4, 1), 0.5, np.float32))
    t = to_tensor(img, InputSpec(size=4, channels=1, mean=[0.25], std=[0.5]))
    assert t.shape == (1, 4, 4)
    assert np.allclose(t.numpy(), 0.5)


def test_resize_and_channel_mapping():
    rgb = MedImage(np.random.default_rng(0).uniform(size=(300, 200, 3)).astype(np.float32))
    t = to_tensor(rgb, InputSpec(size=64, channels=1, mean=[0.0], std=[1.0]))
    assert t.shape == (1, 64, 64)
    gray = MedImage(np.full((10, 10, 1), 0.2, np.float32))
    t3 = to_tensor(gray, InputSpec(size=10, channels=3, mean=[0, 0, 0], std=[1, 1, 1]))
    assert t3.shape == (3, 10, 10) and np.allclose(t3.numpy(), 0.2)


def test_luma_weights():
    px = np.zeros((1, 1, 3), np.float32)
    px[..., 1] = 1.0
    assert match_channels(px, 1)[0, 0, 0] == pytest.approx(0.587)


def test_medimage_rejects_bad_shapes():
    with pytest.raises(ValueError):
        MedImage(np.zeros((4, 4, 2)))
    assert MedImage.from_array(np.array([[0, 65535]], np.uint16)).pixels.max() == 1.0
