"""Overlays: the 8-bit lookup-table drawing shows what the float formula showed."""

from __future__ import annotations

import numpy as np
import pytest
from matplotlib import colormaps
from PIL import Image

from medsight.explain.overlay import overlay_rgb, save_overlay
from medsight.io.image import MedImage
from medsight.io.readers import read_image


def float_overlay(image: MedImage, heatmap: np.ndarray, alpha: float = 0.45, floor: float = 0.15) -> np.ndarray:
    """The previous implementation (matplotlib jet in float, float blending): the visual reference."""
    base = image.to_uint8()
    if base.shape[-1] == 1:
        base = np.repeat(base, 3, axis=-1)
    colour = (colormaps["jet"](heatmap)[..., :3] * 255).astype(np.float32)
    a = (alpha * np.clip((heatmap - floor) / (1 - floor), 0, 1))[..., None]
    return (base * (1 - a) + colour * a).round().clip(0, 255).astype(np.uint8)


def smooth_map(h: int, w: int) -> np.ndarray:
    """A CAM-like map: one blob, 0 at the far corner and 1 at its peak."""
    yy, xx = np.mgrid[:h, :w]
    m = np.exp(-(((yy - 0.4 * h) / (0.3 * h)) ** 2 + ((xx - 0.6 * w) / (0.3 * w)) ** 2))
    return ((m - m.min()) / (m.max() - m.min())).astype(np.float32)


@pytest.mark.parametrize("alpha", [0.45, 1.0, 0.2])
@pytest.mark.parametrize("channels", [1, 3])
def test_overlay_matches_the_float_formula(alpha, channels):
    rng = np.random.default_rng(channels)
    image = MedImage(rng.random((97, 131, channels)).astype(np.float32))
    for heat in (smooth_map(97, 131), rng.random((97, 131)).astype(np.float32)):  # every level, not only a smooth ramp
        got, want = overlay_rgb(image, heat, alpha), float_overlay(image, heat, alpha)
        assert got.shape == want.shape and got.dtype == np.uint8
        diff = np.abs(got.astype(int) - want)
        assert diff.max() <= 2 and diff.mean() < 0.25
        below = heat < 0.15  # transparent there: exactly the image
        assert np.array_equal(got[below], want[below])


def test_overlay_on_a_real_radiograph_at_its_own_resolution():
    from pydicom.data import get_testdata_file

    image = read_image(get_testdata_file("RG1_J2KR.dcm"))  # 1955 x 1841 chest radiograph (pydicom-data)
    heat = smooth_map(image.height, image.width)
    got = overlay_rgb(image, heat)
    assert got.shape == (image.height, image.width, 3)
    assert np.abs(got.astype(int) - float_overlay(image, heat)).max() <= 2
    peak = np.unravel_index(np.argmax(heat), heat.shape)
    r, g, b = got[peak].astype(int)
    assert r > b + 40  # the strongest evidence is drawn in jet's red end


def test_colours_are_matplotlibs_jet():
    image = MedImage(np.zeros((1, 256, 1), np.float32))
    heat = (np.arange(256, dtype=np.float32) / 255)[None]
    got = overlay_rgb(image, heat, alpha=1.0, floor=0.0)[0]
    want = (colormaps["jet"](heat[0])[:, :3] * 255 * np.clip(heat[0], 0, 1)[:, None])  # over black: colour x opacity
    assert np.abs(got.astype(float) - want).max() <= 2


def test_nan_and_out_of_range_values_do_not_break_the_picture():
    image = MedImage(np.full((4, 4, 1), 0.5, np.float32))
    heat = np.array([[np.nan, -1.0, 2.0, 0.0]] * 4, dtype=np.float32)
    got = overlay_rgb(image, heat)
    assert np.array_equal(got[:, 0], got[:, 3])  # NaN drawn as no evidence
    assert np.array_equal(got[:, 1], got[:, 3])  # below 0 clipped to 0
    assert np.array_equal(got[:, 2], overlay_rgb(image, np.ones((4, 4), np.float32))[:, 2])  # above 1 clipped to 1


def test_bad_arguments_are_refused_clearly():
    image = MedImage(np.zeros((4, 4, 1), np.float32))
    with pytest.raises(ValueError, match="does not match image"):
        overlay_rgb(image, np.zeros((5, 4), np.float32))
    with pytest.raises(ValueError, match="alpha must be in"):
        overlay_rgb(image, np.zeros((4, 4), np.float32), alpha=1.5)
    with pytest.raises(ValueError, match="floor must be in"):
        overlay_rgb(image, np.zeros((4, 4), np.float32), floor=1.0)


def test_saved_png_is_the_overlay(tmp_path):
    rng = np.random.default_rng(0)
    image, heat = MedImage(rng.random((40, 50, 1)).astype(np.float32)), smooth_map(40, 50)
    path = save_overlay(image, heat, tmp_path / "sub" / "o.png")
    with Image.open(path) as im:
        assert im.format == "PNG" and im.mode == "RGB"
        assert np.array_equal(np.asarray(im), overlay_rgb(image, heat))
