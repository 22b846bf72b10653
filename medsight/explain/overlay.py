"""Heat-map overlays as PNG files at the image's own resolution."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib import colormaps
from PIL import Image

from medsight.io.image import MedImage


def overlay_rgb(image: MedImage, heatmap: np.ndarray, alpha: float = 0.45, floor: float = 0.15) -> np.ndarray:
    """(H, W, 3) uint8: the image in gray/colour with the heat map blended where it exceeds ``floor``.

    Weights below ``floor`` are left transparent so anatomy stays readable.
    """
    base = image.to_uint8()
    if base.shape[-1] == 1:
        base = np.repeat(base, 3, axis=-1)
    if heatmap.shape != base.shape[:2]:
        raise ValueError(f"heat map {heatmap.shape} does not match image {base.shape[:2]}")
    colour = (colormaps["jet"](heatmap)[..., :3] * 255).astype(np.float32)
    a = (alpha * np.clip((heatmap - floor) / (1 - floor), 0, 1))[..., None]
    return (base * (1 - a) + colour * a).round().clip(0, 255).astype(np.uint8)


def save_overlay(image: MedImage, heatmap: np.ndarray, path: str | Path, alpha: float = 0.45) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # zlib level 1, not PIL's default 6: several times faster on a full-size radiograph for slightly
    # larger files (measured by benchmarks/throughput, see docs/performance.md).
    Image.fromarray(overlay_rgb(image, heatmap, alpha)).save(path, compress_level=1)
    return path


def save_heatmap(heatmap: np.ndarray, path: str | Path) -> Path:
    """The bare heat map as an 8-bit gray PNG (for viewers that blend it themselves)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((heatmap * 255).round().astype(np.uint8)).save(path)
    return path
