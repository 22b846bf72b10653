"""PNG / JPEG / TIFF / BMP reading via Pillow.

Public medical data sets (chest X-ray, dermoscopy, fundus, pathology tiles)
are mostly distributed as ordinary raster files. The only decisions that
matter here are how integers become ``[0, 1]`` and which channel layouts are
accepted:

* integer grayscale is divided by its *type* range (a 16-bit PNG keeps its
  16-bit precision and a dark image stays dark, as in a viewer), never
  stretched by its own min/max;
* alpha is dropped, palettes are expanded (to gray when the palette is gray);
* anything whose channels we cannot name (2 samples that are not gray+alpha,
  more than 4 samples) is refused rather than silently truncated;
* the size comes from Pillow's lazy open and is checked against the pixel budget
  (:mod:`medsight.io.budget`) and Pillow's decompression-bomb limit before a pixel
  is decoded: past either, the file is refused, not warned about.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from medsight.errors import (
    EmptyFileError,
    ImageReadError,
    ImageTooLargeError,
    NotAnImageError,
    TruncatedPixelDataError,
    UnsupportedImageError,
)
from medsight.io.budget import current_budget
from medsight.io.image import MedImage

_FORMATS = {"PNG": "png", "JPEG": "jpeg", "MPO": "jpeg", "TIFF": "tiff", "BMP": "bmp"}
# Leading bytes of the formats above: a file that has them but that Pillow
# cannot decode is an unsupported variant, not "not an image".
_SIGNATURES = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+", b"BM")
_TIFF_SAMPLES_PER_PIXEL, _TIFF_EXTRA_SAMPLES = 277, 338


def read_raster(path: str | Path) -> MedImage:
    """Read the first page of a PNG, JPEG, TIFF or BMP file."""
    path = Path(path)
    if path.stat().st_size == 0:
        raise EmptyFileError(path)
    try:
        with Image.open(path) as im:
            fmt = _FORMATS.get(im.format or "", (im.format or "unknown").lower())
            mode = im.mode
            _check_tiff_samples(im, path)
            _check_budget(im, path)
            im.seek(0)
            im.load()
            pixels = _to_unit(ImageOps.exif_transpose(im), path)
            n_pages = int(getattr(im, "n_frames", 1))
    except UnidentifiedImageError as exc:
        if _has_signature(path):
            raise UnsupportedImageError(path, f"Pillow cannot decode this variant: {exc}") from exc
        raise NotAnImageError(path) from exc
    except (ImageReadError, FileNotFoundError):
        raise
    except Image.DecompressionBombError as exc:  # Pillow's own limit, twice its warning threshold
        raise ImageTooLargeError(path, str(exc)) from exc
    except Exception as exc:  # corrupt files (and decompression bombs) make Pillow raise almost anything
        if "truncated" in str(exc).lower():
            raise TruncatedPixelDataError(path, str(exc)) from exc
        raise UnsupportedImageError(path, f"{type(exc).__name__}: {exc}") from exc
    return MedImage(pixels, {"source": str(path), "format": fmt, "mode": mode, "n_pages": n_pages})


def _has_signature(path: Path) -> bool:
    with open(path, "rb") as fh:
        head = fh.read(8)
    return head.startswith(_SIGNATURES)


def _check_tiff_samples(im: Image.Image, path: Path) -> None:
    """Pillow quietly drops TIFF samples it has no name for; we refuse instead."""
    tags = getattr(im, "tag_v2", None)
    if tags is None:
        return
    spp = int(tags.get(_TIFF_SAMPLES_PER_PIXEL, 1))
    extra = tags.get(_TIFF_EXTRA_SAMPLES, ())
    extra = (extra,) if isinstance(extra, int) else tuple(extra)
    if spp > 4:
        raise UnsupportedImageError(path, f"TIFF with {spp} samples per pixel")
    if spp == 2 and not any(e in (1, 2) for e in extra):  # 1, 2 = associated/unassociated alpha
        raise UnsupportedImageError(path, "TIFF with 2 samples per pixel that are not gray + alpha")


def _check_budget(im: Image.Image, path: Path) -> None:
    """Width x height x bands (a palette decodes to RGB) from the header; Pillow's bomb warning counts as a refusal."""
    width, height = im.size
    bands = 3 if im.mode in ("P", "PA") else len(im.getbands())
    current_budget().check_pixels(width * height * bands, f"a {width}x{height} image of {bands} band(s)", path)
    limit = Image.MAX_IMAGE_PIXELS
    if limit and width * height > limit:
        raise ImageTooLargeError(path, f"{width * height:,} pixels exceed Pillow's decompression-bomb limit of {limit:,}")


def _to_unit(im: Image.Image, path: Path) -> np.ndarray:
    mode = im.mode
    if mode in ("1", "L", "LA", "La"):
        return np.asarray(im.getchannel(0), dtype=np.float32)[..., None] / (1.0 if mode == "1" else 255.0)
    if mode.startswith("I;16"):
        return np.asarray(im).astype(np.float32)[..., None] / 65535.0
    if mode == "I":
        return _int32_to_unit(np.asarray(im))[..., None]
    if mode == "F":
        return MedImage.from_array(np.asarray(im, dtype=np.float32)).pixels
    if mode in ("P", "PA"):
        rgb = np.asarray(im.convert("RGB"))
        if np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 0], rgb[..., 2]):
            rgb = rgb[..., :1]
        return rgb.astype(np.float32) / 255.0
    if mode in ("RGB", "RGBA", "RGBX", "RGBa", "CMYK", "YCbCr", "LAB", "HSV"):
        return np.asarray(im.convert("RGB")).astype(np.float32) / 255.0
    raise UnsupportedImageError(path, f"Pillow mode {mode!r}")


def _int32_to_unit(arr: np.ndarray) -> np.ndarray:
    """Pillow's "I" mode (int32) usually carries 16-bit data, e.g. 16-bit TIFFs.

    Dividing by the int32 range would flatten such an image to gray, so data
    that fits in 16 bits is scaled as 16-bit; anything else by its own range.
    """
    if arr.size and arr.min() >= 0 and arr.max() <= 65535:
        return arr.astype(np.float32) / 65535.0
    return MedImage.from_array(arr.astype(np.float64)).pixels[..., 0]
