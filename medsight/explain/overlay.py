"""Heat-map overlays as PNG files at the image's own resolution.

The overlay is drawn at full resolution (a radiograph is ~2000 x 2000 pixels), once
per study, in the request path of the service and the DICOM gateway, so it is built
from 8-bit lookup tables and Pillow's C compositing rather than float arrays:

* the heat map is quantised once to 256 levels, ``min(floor(h * 256), 255)``, which
  is exactly the index matplotlib's 256-entry ``jet`` colormap looks a float up at,
  so the colours are matplotlib's;
* the colour is a palette lookup (``P`` image converted to RGB) and the opacity a
  256-entry table (``Image.point``), evaluated at each level's centre;
* ``Image.composite`` blends colour over the image with that opacity in integer
  arithmetic.

The result differs from the float formula ``round(base * (1 - a) + colour * a)`` by
at most one or two grey levels (tested), i.e. the same picture, about five times
faster on a 1955 x 1841 radiograph (benchmarks/throughput).
"""

from __future__ import annotations

import zlib
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from functools import lru_cache
from pathlib import Path
from typing import Generic, TypeVar

import numpy as np
from PIL import Image

from medsight.io.image import MedImage

T = TypeVar("T")

#: zlib level of overlay PNGs: level 1, not PIL's default 6, is several times faster on a full-size
#: radiograph for slightly larger files (measured by benchmarks/throughput, see docs/performance.md)
PNG_COMPRESS_LEVEL = 1
#: zlib's Z_RLE strategy, which zlib documents as made for PNG image data: slightly faster than the
#: default strategy at level 1 and slightly smaller files (3.1 vs 3.1-3.2 MB, 166 vs 175 ms on RG1_J2KR)
PNG_STRATEGY = zlib.Z_RLE


@lru_cache(maxsize=1)
def _jet_palette() -> list[int]:
    """matplotlib's ``jet`` as a 256-entry RGB palette (entry i = jet(i), rounded to 8 bits)."""
    from matplotlib import colormaps

    rgb = colormaps["jet"](np.arange(256))[:, :3]
    return (rgb * 255).round().astype(np.uint8).ravel().tolist()


@lru_cache(maxsize=32)
def _opacity_table(alpha: float, floor: float) -> list[int]:
    """Opacity (0-255) of each of the 256 heat-map levels, at the level's centre value."""
    centre = (np.arange(256) + 0.5) / 256
    a = alpha * np.clip((centre - floor) / (1 - floor), 0.0, 1.0)
    return (a * 255).round().astype(np.uint8).tolist()


def _levels(heatmap: np.ndarray) -> np.ndarray:
    """(H, W) uint8 level of each heat-map value: matplotlib's colormap index (values clipped to [0, 1], NaN -> 0)."""
    h = np.asarray(heatmap, dtype=np.float32) * np.float32(256)  # exact: a power of two
    # fmax/fmin (not clip) so that NaN becomes 0 instead of an undefined integer
    return np.fmin(np.fmax(h, np.float32(0), out=h), np.float32(255), out=h).astype(np.uint8)


def overlay_image(image: MedImage, heatmap: np.ndarray, alpha: float = 0.45, floor: float = 0.15) -> Image.Image:
    """RGB PIL image: ``image`` in gray/colour with the heat map (jet) blended where it exceeds ``floor``.

    The opacity rises linearly from 0 at ``floor`` to ``alpha`` at the map's maximum; weights
    below ``floor`` are left transparent so anatomy stays readable.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if not 0.0 <= floor < 1.0:
        raise ValueError(f"floor must be in [0, 1), got {floor}")
    base = image.to_uint8()
    if heatmap.shape != base.shape[:2]:
        raise ValueError(f"heat map {heatmap.shape} does not match image {base.shape[:2]}")
    under = Image.fromarray(base[..., 0], "L").convert("RGB") if base.shape[-1] == 1 else Image.fromarray(base, "RGB")
    levels = Image.fromarray(_levels(heatmap), "L")
    colour = levels.convert("P")
    colour.putpalette(_jet_palette())
    return Image.composite(colour.convert("RGB"), under, levels.point(_opacity_table(float(alpha), float(floor))))


def overlay_rgb(image: MedImage, heatmap: np.ndarray, alpha: float = 0.45, floor: float = 0.15) -> np.ndarray:
    """(H, W, 3) uint8: :func:`overlay_image` as an array (for DICOM Secondary Captures, thumbnails)."""
    return np.array(overlay_image(image, heatmap, alpha, floor))  # a writable copy, as before


def save_overlay(image: MedImage, heatmap: np.ndarray, path: str | Path, alpha: float = 0.45) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    overlay_image(image, heatmap, alpha).save(path, format="PNG", compress_level=PNG_COMPRESS_LEVEL,
                                              compress_type=PNG_STRATEGY)
    return path


def save_heatmap(heatmap: np.ndarray, path: str | Path) -> Path:
    """The bare heat map as an 8-bit gray PNG (for viewers that blend it themselves)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((heatmap * 255).round().astype(np.uint8)).save(path)
    return path


class OverlayWriter(Generic[T]):
    """Overlay PNGs written in background threads, with the caller's items handed back in order.

    Encoding a PNG (Pillow's row filters and zlib, which run without the GIL) costs several
    times what classifying the image did, so a batch command hands each overlay to ``workers``
    threads and goes on. :meth:`put` queues an item (a result row) with the overlay it
    waits for, if any, and returns the items whose overlays are on disk, in the order they
    were put; :meth:`drain` waits for the rest. At most ``max_pending`` overlays (each holding
    its image and heat map) wait at once. A failed write raises from :meth:`put`/:meth:`drain`.
    """

    def __init__(self, workers: int = 1, max_pending: int = 32, alpha: float = 0.45):
        self._pool = ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="medsight-overlay")
        self._pending: deque[tuple[T, Future | None]] = deque()
        self._max_pending, self._alpha = max_pending, alpha

    def put(self, item: T, image: MedImage | None = None, heatmap: np.ndarray | None = None,
            path: str | Path | None = None) -> list[T]:
        """Queue ``item``, after ``image``'s overlay is written to ``path`` when one is given."""
        job = None if image is None else self._pool.submit(save_overlay, image, heatmap, path, self._alpha)
        self._pending.append((item, job))
        return self._ready(keep=self._max_pending)

    def drain(self) -> list[T]:
        return self._ready(keep=0)

    def _ready(self, keep: int) -> list[T]:
        """The leading items whose overlays are written, waiting while more than ``keep`` are pending."""
        out: list[T] = []
        while self._pending:
            item, job = self._pending[0]
            if job is not None:
                if not job.done() and len(self._pending) <= keep:
                    break
                job.result()
            out.append(item)
            self._pending.popleft()
        return out

    def __enter__(self) -> "OverlayWriter[T]":
        return self

    def __exit__(self, *exc: object) -> None:
        self._pool.shutdown(wait=True, cancel_futures=exc[0] is not None)
