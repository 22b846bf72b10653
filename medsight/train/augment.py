"""Training-time augmentation, built from MONAI transforms.

Applied to already-preprocessed tensors (see :mod:`medsight.models.preprocess`),
so augmentation can never leak into inference.
"""

from __future__ import annotations

import math

import torch
from monai.transforms import Compose, RandAdjustContrast, RandAffine, RandFlip, RandGaussianNoise

from medsight.train.config import AugmentConfig


class BatchAugmenter:
    def __init__(self, cfg: AugmentConfig, size: int, seed: int):
        parts = []
        if cfg.flip:
            parts.append(RandFlip(prob=0.5, spatial_axis=1))
        if cfg.rotate_deg or cfg.scale or cfg.translate:
            parts.append(
                RandAffine(
                    prob=cfg.prob,
                    rotate_range=math.radians(cfg.rotate_deg),
                    scale_range=(cfg.scale, cfg.scale),
                    translate_range=(cfg.translate * size, cfg.translate * size),
                    padding_mode="border",
                )
            )
        if cfg.contrast:
            parts.append(RandAdjustContrast(prob=0.5, gamma=(1 - cfg.contrast, 1 + cfg.contrast)))
        if cfg.noise_std:
            parts.append(RandGaussianNoise(prob=0.3, std=cfg.noise_std))
        self.transform = Compose(parts)
        self.transform.set_random_state(seed)

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        return torch.stack([torch.as_tensor(self.transform(x)) for x in batch])
