"""Raster reader: bit depth, channel layouts and error mapping, on files written here."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medsight.errors import EmptyFileError, NotAnImageError, TruncatedPixelDataError, UnsupportedImageError
from medsight.io import read_raster

RNG = np.random.default_rng(7)


def save(array: np.ndarray, path: Path, mode: str | None = None, **kwargs) -> Path:
    image = Image.fromarray(array, mode) if mode else Image.fromarray(array)
    image.save(path, **kwargs)
    return path


def write_tiff(path: Path, array: np.ndarray, extra_samples: tuple[int, ...]) -> Path:
    """Minimal uncompressed little-endian TIFF with any number of 8-bit samples.

    Pillow cannot *write* such files (5 samples, or 2 samples that are not
    gray + alpha), so the few required tags are packed by hand.
    """
    h, w, c = array.shape
    pixels = array.astype(np.uint8).tobytes()
    n_tags = 11
    blobs_at = 8 + 2 + 12 * n_tags + 4
    bits = struct.pack(f"<{c}H", *([8] * c))
    extra = struct.pack(f"<{len(extra_samples)}H", *extra_samples)
    extra_at, data_at = blobs_at + len(bits), blobs_at + len(bits) + len(extra)

    def tag(code, typ, count, value):
        return struct.pack("<HHI", code, typ, count) + value

    def inline_shorts(*values):
        return struct.pack(f"<{len(values)}H", *values).ljust(4, b"\0")

    def offset(at):
        return struct.pack("<I", at)

    tags = [
        tag(256, 3, 1, inline_shorts(w)),
        tag(257, 3, 1, inline_shorts(h)),
        tag(258, 3, c, inline_shorts(*[8] * c) if c <= 2 else offset(blobs_at)),
        tag(259, 3, 1, inline_shorts(1)),  # no compression
        tag(262, 3, 1, inline_shorts(2 if c >= 3 else 1)),  # RGB / BlackIsZero
        tag(273, 4, 1, offset(data_at)),
        tag(277, 3, 1, inline_shorts(c)),
        tag(278, 3, 1, inline_shorts(h)),
        tag(279, 4, 1, offset(len(pixels))),
        tag(284, 3, 1, inline_shorts(1)),  # chunky
        tag(338, 3, len(extra_samples), inline_shorts(*extra_samples) if len(extra_samples) <= 2 else offset(extra_at)),
    ]
    header = b"II*\x00" + offset(8) + struct.pack("<H", n_tags) + b"".join(tags) + offset(0)
    path.write_bytes(header + bits + extra + pixels)
    return path


# --------------------------------------------------------------------------- grayscale


def test_png_8bit_gray(tmp_path):
    arr = RNG.integers(0, 256, (20, 30), dtype=np.uint8)
    image = read_raster(save(arr, tmp_path / "g8.png"))
    assert image.pixels.shape == (20, 30, 1) and image.pixels.dtype == np.float32
    np.testing.assert_allclose(image.pixels[..., 0], arr / 255.0, atol=1e-7)
    assert image.meta == {"source": str(tmp_path / "g8.png"), "format": "png", "mode": "L", "n_pages": 1}


def test_png_16bit_keeps_16bit_precision(tmp_path):
    arr = np.array([[1000, 1001, 1002], [0, 65535, 30000]], dtype=np.uint16)
    image = read_raster(save(arr, tmp_path / "g16.png"))
    assert image.meta["mode"].startswith("I;16")
    np.testing.assert_allclose(image.pixels[..., 0], arr / 65535.0, rtol=1e-6)
    assert len(np.unique(image.pixels[0, :, 0])) == 3  # neighbouring 16-bit values stay distinct


def test_dark_image_is_not_stretched(tmp_path):
    arr = np.full((8, 8), 10, dtype=np.uint8)
    arr[0, 0] = 20
    assert read_raster(save(arr, tmp_path / "dark.png")).pixels.max() == pytest.approx(20 / 255)


def test_int32_tiff_holding_16bit_data(tmp_path):
    arr = (np.arange(64, dtype=np.int32).reshape(8, 8) * 1000)
    image = read_raster(save(arr, tmp_path / "i32.tif"))
    assert image.meta["mode"] == "I"
    np.testing.assert_allclose(image.pixels[..., 0], arr / 65535.0, rtol=1e-6)


def test_float_tiff_is_min_max_scaled(tmp_path):
    arr = np.linspace(-3.0, 5.0, 64, dtype=np.float32).reshape(8, 8)
    image = read_raster(save(arr, tmp_path / "f.tif"))
    assert image.meta["mode"] == "F"
    np.testing.assert_allclose(image.pixels[..., 0], (arr + 3.0) / 8.0, atol=1e-6)


def test_gray_alpha_png_drops_alpha(tmp_path):
    arr = np.stack([RNG.integers(0, 256, (6, 7)), np.full((6, 7), 128)], axis=-1).astype(np.uint8)
    image = read_raster(save(arr, tmp_path / "la.png", mode="LA"))
    assert image.channels == 1
    np.testing.assert_allclose(image.pixels[..., 0], arr[..., 0] / 255.0, atol=1e-7)


def test_palette_with_gray_palette_is_gray_and_colour_palette_is_rgb(tmp_path):
    gray = Image.fromarray(RNG.integers(0, 256, (5, 5), dtype=np.uint8)).convert("P")
    gray.putpalette([v for i in range(256) for v in (i, i, i)])
    gray.save(tmp_path / "gray_p.png")
    assert read_raster(tmp_path / "gray_p.png").channels == 1

    colour = Image.fromarray(RNG.integers(0, 256, (5, 5, 3), dtype=np.uint8)).convert("P", palette=Image.Palette.ADAPTIVE)
    colour.save(tmp_path / "colour_p.png")
    image = read_raster(tmp_path / "colour_p.png")
    assert image.channels == 3
    np.testing.assert_allclose(image.pixels, np.asarray(colour.convert("RGB")) / 255.0, atol=1e-7)


# --------------------------------------------------------------------------- colour


@pytest.mark.parametrize("suffix", ["png", "tiff"])
def test_rgba_drops_alpha(tmp_path, suffix):
    arr = RNG.integers(0, 256, (9, 11, 4), dtype=np.uint8)
    image = read_raster(save(arr, tmp_path / f"rgba.{suffix}"))
    assert image.channels == 3 and image.meta["mode"] == "RGBA"
    assert image.meta["format"] == ("png" if suffix == "png" else "tiff")
    np.testing.assert_allclose(image.pixels, arr[..., :3] / 255.0, atol=1e-7)


def test_rgb_jpeg(tmp_path):
    arr = np.zeros((16, 16, 3), dtype=np.uint8)
    arr[..., 0] = 200  # flat colour survives JPEG nearly unchanged
    image = read_raster(save(arr, tmp_path / "rgb.jpg", quality=95))
    assert image.channels == 3 and image.meta["format"] == "jpeg"
    assert np.abs(image.pixels - arr / 255.0).max() < 0.03


def test_cmyk_jpeg_becomes_rgb(tmp_path):
    Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg")
    image = read_raster(tmp_path / "cmyk.jpg")
    assert image.channels == 3 and image.meta["mode"] == "CMYK"
    assert image.pixels[..., 0].mean() > 0.9 and image.pixels[..., 1:].mean() < 0.1  # red


def test_exif_orientation_is_applied(tmp_path):
    image = Image.new("RGB", (40, 20), (10, 20, 30))
    exif = image.getexif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    image.save(tmp_path / "rotated.jpg", exif=exif)
    assert read_raster(tmp_path / "rotated.jpg").pixels.shape == (40, 20, 3)


def test_multipage_tiff_reads_first_page(tmp_path):
    pages = [Image.fromarray(np.full((4, 4), v, dtype=np.uint8)) for v in (10, 200)]
    pages[0].save(tmp_path / "pages.tif", save_all=True, append_images=pages[1:])
    image = read_raster(tmp_path / "pages.tif")
    assert image.meta["n_pages"] == 2
    np.testing.assert_allclose(image.pixels, 10 / 255.0, atol=1e-7)


def test_bmp(tmp_path):
    arr = RNG.integers(0, 256, (5, 6, 3), dtype=np.uint8)
    image = read_raster(save(arr, tmp_path / "x.bmp"))
    assert image.meta["format"] == "bmp"
    np.testing.assert_allclose(image.pixels, arr / 255.0, atol=1e-7)


# --------------------------------------------------------------------------- errors


def _raises(error, path):
    with pytest.raises(error) as info:
        read_raster(path)
    assert str(path) in str(info.value)
    return info.value


def test_five_channel_tiff_is_unsupported(tmp_path):
    path = write_tiff(tmp_path / "five.tif", RNG.integers(0, 256, (4, 6, 5)), extra_samples=(0, 0))
    assert "5 samples" in _raises(UnsupportedImageError, path).detail


def test_two_channel_tiff_that_is_not_gray_alpha_is_unsupported(tmp_path):
    path = write_tiff(tmp_path / "two.tif", RNG.integers(0, 256, (4, 6, 2)), extra_samples=(0,))
    _raises(UnsupportedImageError, path)


def test_two_channel_tiff_with_alpha_is_gray(tmp_path):
    arr = RNG.integers(0, 256, (4, 6, 2)).astype(np.uint8)
    image = read_raster(write_tiff(tmp_path / "ga.tif", arr, extra_samples=(2,)))
    np.testing.assert_allclose(image.pixels[..., 0], arr[..., 0] / 255.0, atol=1e-7)


def test_truncated_png(tmp_path):
    full = save(RNG.integers(0, 256, (64, 64, 3), dtype=np.uint8), tmp_path / "full.png")
    cut = tmp_path / "cut.png"
    cut.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    _raises(TruncatedPixelDataError, cut)


def test_text_file_is_not_an_image(tmp_path):
    path = tmp_path / "readme.png"
    path.write_text("not a picture")
    _raises(NotAnImageError, path)


def test_png_signature_with_garbage_is_unsupported_not_unknown(tmp_path):
    path = tmp_path / "broken.png"
    data = b"xxxx"  # a PNG whose first chunk is image data instead of the IHDR header
    chunk = struct.pack(">I", len(data)) + b"IDAT" + data + struct.pack(">I", zlib.crc32(b"IDAT" + data))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk)
    _raises(UnsupportedImageError, path)


def test_empty_file(tmp_path):
    path = tmp_path / "empty.png"
    path.touch()
    _raises(EmptyFileError, path)
