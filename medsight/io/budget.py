"""The pixel budget: how large an image MedSight agrees to decode, decided from its header first.

A few hundred kilobytes can declare gigabytes (a PNG of 13000x13000 zeros, a deflated DICOM of
12000^2 zeros), and decoding is where the memory goes. So every reader of this package (DICOM,
PNG/JPEG/TIFF, NIfTI, .npz) and the DICOM listener's validation ask this module *before* they
decode or inflate anything, and one number bounds them all:

* ``max_pixels``: the samples (Rows x Columns x Samples per Pixel) of one decoded frame or
  slice. Frames of a multi-frame object are decoded one at a time, so a long ultrasound clip is
  budgeted per frame; reading every frame at once is budgeted by bytes (below).
* ``max_bytes``, derived: 16 bytes per budgeted sample. The most a deflated data set or a
  gzip-compressed volume may inflate to, and the float32 bytes of all frames read together.

The process-wide budget comes from ``$MEDSIGHT_MAX_PIXELS`` or :data:`DEFAULT_MAX_PIXELS`; the
service sets it from its ``max_pixels`` setting. docs/security.md ("Limits") says what real
files need and what a refusal looks like.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medsight.errors import ImageTooLargeError, OverlongPixelDataError

#: 64 Mi samples: an 8192x8192 grayscale frame, a 12-megapixel RGB photograph; the largest
#: full-field mammograms are about 28 million.
DEFAULT_MAX_PIXELS = 1 << 26
#: Decompressed bytes allowed per budgeted sample (see ``max_bytes``).
BYTES_PER_SAMPLE = 16
ENV_VAR = "MEDSIGHT_MAX_PIXELS"

Source = str | Path | None


@dataclass(frozen=True)
class ImageBudget:
    max_pixels: int = DEFAULT_MAX_PIXELS

    def __post_init__(self) -> None:
        if self.max_pixels <= 0:
            raise ValueError(f"max_pixels must be positive, not {self.max_pixels}")

    @property
    def max_bytes(self) -> int:
        return self.max_pixels * BYTES_PER_SAMPLE

    def check_pixels(self, samples: int, what: str, source: Source = None) -> None:
        if samples > self.max_pixels:
            raise ImageTooLargeError(source, f"{what} is {samples:,} samples; the limit (max_pixels) is {self.max_pixels:,}")

    def check_bytes(self, n: int, what: str, source: Source = None) -> None:
        if n > self.max_bytes:
            raise ImageTooLargeError(source, f"{what} is {n:,} bytes; the limit ({BYTES_PER_SAMPLE} x max_pixels) is {self.max_bytes:,}")


def _from_env() -> ImageBudget:
    value = os.environ.get(ENV_VAR, "").strip()
    return ImageBudget(int(value)) if value else ImageBudget()


_budget = _from_env()


def current_budget() -> ImageBudget:
    return _budget


def set_max_pixels(max_pixels: int | None) -> ImageBudget:
    """Set this process's budget (``None``: back to ``$MEDSIGHT_MAX_PIXELS`` or the default); returns it."""
    global _budget
    _budget = ImageBudget(max_pixels) if max_pixels is not None else _from_env()
    return _budget


def check_dicom(ds: Any, source: Source = None, *, all_frames: bool = False, pixel_length: int | None = None,
                budget: ImageBudget | None = None) -> None:
    """Refuse a DICOM image from its header: a frame over the budget, all frames (when read
    together) over the byte cap, or native pixel data longer than declared by a frame or more.

    ``pixel_length`` is the Pixel Data length when ``ds`` holds only the header (a deflated data
    set checked before its pixels are inflated). An incomplete pixel description is left to the
    decoder, which refuses it with its own reason.
    """
    budget = budget or _budget
    try:
        rows, cols = int(ds.Rows), int(ds.Columns)
        spp = int(ds.get("SamplesPerPixel", 1) or 1)
        frames = max(1, int(ds.get("NumberOfFrames", 1) or 1))
    except (AttributeError, KeyError, TypeError, ValueError):
        return
    frame = rows * cols * spp
    budget.check_pixels(frame, f"a {rows}x{cols} frame of {spp} sample(s) per pixel", source)
    if all_frames:
        budget.check_bytes(frame * frames * 4, f"{frames} frames of {rows}x{cols}x{spp} as float32", source)
    if pixel_length is None:
        pixel_length = _native_pixel_length(ds)
    if pixel_length is not None:
        _check_length(ds, pixel_length, frames, source)


def expected_pixel_bytes(ds: Any) -> int | None:
    """Bytes of native Pixel Data the header declares (no padding byte), or ``None`` if it cannot say."""
    from pydicom.pixels.utils import get_expected_length

    try:
        return int(get_expected_length(ds))
    except Exception:  # an incomplete header: the decoder refuses it with a specific reason
        return None


def _native_pixel_length(ds: Any) -> int | None:
    if "PixelData" not in ds:
        return None
    elem = ds["PixelData"]
    meta = getattr(ds, "file_meta", None)
    ts = meta.get("TransferSyntaxUID") if meta is not None else None
    if elem.is_undefined_length or (ts is not None and ts.is_encapsulated) or not isinstance(elem.value, (bytes, bytearray)):
        return None
    return len(elem.value)


def _check_length(ds: Any, actual: int, frames: int, source: Source) -> None:
    """Padding is less than one frame (what pydicom trims as "excess padding"); more is refused."""
    expected = expected_pixel_bytes(ds)
    if expected is None or actual <= expected:
        return
    frame_bytes = -(-expected // frames)
    if actual - expected > max(frame_bytes - 1, 1):
        raise OverlongPixelDataError(source, f"{actual:,} bytes of Pixel Data, the header declares {expected:,}")


__all__ = ["ImageBudget", "DEFAULT_MAX_PIXELS", "BYTES_PER_SAMPLE", "ENV_VAR", "current_budget", "set_max_pixels",
           "check_dicom", "expected_pixel_bytes"]
