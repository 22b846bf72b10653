"""Grad-CAM heat maps through MONAI's maintained implementation (``monai.visualize.GradCAM``)."""

from __future__ import annotations

import numpy as np
import torch
from monai.transforms.utils import rescale_instance_array
from monai.visualize import GradCAM

from medsight.models.networks import FEATURE_MODULE, Classifier


def _unit_range(maps: torch.Tensor) -> torch.Tensor:
    """Per-image min-max scaling to [0, 1], strongest evidence at 1.

    MONAI's default post-processing (``default_normalizer``) maps the maximum to 0,
    i.e. it *inverts* the map; a clinician must see the most important region hot.
    """
    return torch.as_tensor(rescale_instance_array(maps.detach().cpu().numpy(), 0.0, 1.0))


def gradcam(network: Classifier, x: torch.Tensor, class_idx: int | list[int]) -> np.ndarray:
    """Heat maps in [0, 1] at the network's input size: (B, S, S) for a (B, C, S, S) batch.

    Each map is scaled to [0, 1] per image (hottest = 1); a flat map (no evidence) stays 0.
    """
    cam = GradCAM(nn_module=network, target_layers=FEATURE_MODULE, postprocessing=_unit_range)
    was_training = network.training
    network.eval()
    idx = torch.as_tensor(class_idx).reshape(-1)
    with torch.enable_grad():
        maps = [cam(x[i : i + 1].clone(), class_idx=int(idx[i] if len(idx) > 1 else idx[0])) for i in range(len(x))]
    network.train(was_training)
    out = torch.cat(maps)[:, 0].detach().numpy()
    return np.nan_to_num(out, nan=0.0).clip(0.0, 1.0).astype(np.float32)
