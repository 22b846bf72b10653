"""The one place images become network inputs.

Training, evaluation, the CLI, the service and the DICOM gateway all call
:func:`to_tensor`/:func:`batch_to_tensor` with the card's :class:`InputSpec`;
no other module resizes or normalises pixels for a model.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F

from medsight.io.image import MedImage
from medsight.models.card import InputSpec

# ITU-R BT.601 luma weights: the usual way to turn an RGB image into one channel.
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


def match_channels(pixels: np.ndarray, channels: int) -> np.ndarray:
    """(H, W, C) -> (H, W, channels): replicate gray to RGB or take luma of RGB."""
    c = pixels.shape[-1]
    if c == channels:
        return pixels
    if c == 1 and channels == 3:
        return np.repeat(pixels, 3, axis=-1)
    if c == 3 and channels == 1:
        return (pixels @ _LUMA)[..., None]
    raise ValueError(f"cannot map {c} channels to {channels}")


@lru_cache(maxsize=16)
def _normalisation(mean: tuple[float, ...], std: tuple[float, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)


def to_tensor(image: MedImage, spec: InputSpec) -> torch.Tensor:
    """One image -> (C, size, size) float tensor, normalised as the card says."""
    px = match_channels(image.pixels, spec.channels)
    # a (C, H, W) view, not a copy: the resampling reads any strides and writes a new tensor
    t = torch.from_numpy(px).permute(2, 0, 1)[None]
    if t.shape[-2:] != (spec.size, spec.size):
        # Antialiased bilinear resampling: downsizing a 2k radiograph without it aliases fine texture.
        t = F.interpolate(t, size=(spec.size, spec.size), mode="bilinear", antialias=True, align_corners=False)
    mean, std = _normalisation(tuple(spec.mean), tuple(spec.std))
    return ((t.clamp(0.0, 1.0) - mean) / std)[0]


def batch_to_tensor(images: Sequence[MedImage], spec: InputSpec) -> torch.Tensor:
    return torch.stack([to_tensor(im, spec) for im in images]) if images else torch.empty(0, spec.channels, spec.size, spec.size)
