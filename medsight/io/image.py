"""The one in-memory image type every reader produces and every model consumes."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class MedImage:
    """A single 2-D image ready for display and for model preprocessing.

    ``pixels`` is float32 in ``[0, 1]`` with shape ``(H, W, C)``, ``C`` being 1
    (grayscale) or 3 (RGB). Readers have already applied everything that
    changes what a radiologist would *see* (DICOM Modality LUT, VOI LUT or
    window, MONOCHROME1 inversion, palette / YBR to RGB), so downstream code
    never needs to know the file format. Model-specific resizing and
    normalisation happen later, in :mod:`medsight.models.preprocess` only.

    ``meta`` holds what a reader knows about the image: ``source`` (path),
    ``format`` ("dicom", "png", ...), and for DICOM ``modality``,
    ``study_instance_uid``, ``series_instance_uid``, ``sop_instance_uid``,
    ``patient_sex``, ``patient_age``, ``frame_index``, ``n_frames`` where present.
    """

    pixels: np.ndarray
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        px = np.asarray(self.pixels)
        if px.ndim == 2:
            px = px[..., None]
        if px.ndim != 3 or px.shape[-1] not in (1, 3):
            raise ValueError(f"MedImage pixels must be (H, W, 1|3), got shape {px.shape}")
        self.pixels = px.astype(np.float32, copy=False)

    @property
    def height(self) -> int:
        return int(self.pixels.shape[0])

    @property
    def width(self) -> int:
        return int(self.pixels.shape[1])

    @property
    def channels(self) -> int:
        return int(self.pixels.shape[2])

    @property
    def source(self) -> str | None:
        return self.meta.get("source")

    def to_uint8(self) -> np.ndarray:
        """(H, W, C) uint8 for saving or drawing overlays."""
        return (np.clip(self.pixels, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)

    @classmethod
    def from_array(cls, array: np.ndarray, **meta: Any) -> "MedImage":
        """Build from an integer or float array, scaling integers by their dtype range."""
        arr = np.asarray(array)
        if np.issubdtype(arr.dtype, np.integer):
            info = np.iinfo(arr.dtype)
            scaled = (arr.astype(np.float32) - info.min) / float(info.max - info.min)
        else:
            scaled = arr.astype(np.float32)
            lo, hi = float(np.nanmin(scaled)), float(np.nanmax(scaled))
            if lo < 0.0 or hi > 1.0:
                scaled = (scaled - lo) / (hi - lo) if hi > lo else np.zeros_like(scaled)
        return cls(scaled, dict(meta))
