"""Heat maps from the last feature map and the linear head's weights, without gradients.

For :class:`medsight.models.networks.Classifier` (feature map ``A`` -> global average
pooling -> dropout (identity at inference) -> linear layer ``W``), the gradient of
class score ``k`` with respect to ``A[c, i, j]`` is ``W[k, c] / (h * w)`` at every
position. Grad-CAM's channel weights (the spatial mean of that gradient) are therefore
``W[k, c] / (h * w)``, and

    Grad-CAM_k = ReLU(sum_c W[k, c] * A[c]) / (h * w)  =  CAM_k / (h * w)

(Zhou et al. 2016 CAM; Selvaraju et al. 2017 show Grad-CAM generalises it). After the
per-image [0, 1] scaling every MedSight heat map gets, the constant disappears, so this
equals :func:`medsight.explain.gradcam` exactly; the tests check it against MONAI's
Grad-CAM. Any backend that returns the feature map (ONNX Runtime, int8) thus gets the
same heat maps as PyTorch from one forward pass, without autograd.

Upsampling (bilinear, ``align_corners=False``) and scaling (MONAI's
``rescale_instance_array``) are the ones the Grad-CAM path uses.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from monai.transforms.utils import rescale_instance_array


def class_activation_maps(feature_maps: np.ndarray, class_weights: np.ndarray, class_idx: Sequence[int], size: int) -> np.ndarray:
    """(B, size, size) heat maps in [0, 1], one for class ``class_idx[b]`` of each image.

    ``feature_maps`` is (B, C, h, w); ``class_weights`` is the linear head's (K, C) weight (:meth:`Classifier.class_weights`).
    """
    fmap = torch.as_tensor(np.asarray(feature_maps, dtype=np.float32))
    w = torch.as_tensor(np.asarray(class_weights, dtype=np.float32))[torch.as_tensor(list(class_idx), dtype=torch.long)]
    if len(w) != len(fmap):
        raise ValueError(f"{len(fmap)} feature maps but {len(w)} class indices")
    cam = F.relu(torch.einsum("bc,bchw->bhw", w, fmap))[:, None]
    up = F.interpolate(cam, size=(size, size), mode="bilinear", align_corners=False)[:, 0]
    out = rescale_instance_array(up.numpy(), 0.0, 1.0)
    return np.nan_to_num(out, nan=0.0).clip(0.0, 1.0).astype(np.float32)


def resize_map(heatmap: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear resize of one (S, S) map to an image's own resolution."""
    t = torch.from_numpy(heatmap)[None, None]
    return F.interpolate(t, size=(height, width), mode="bilinear", align_corners=False)[0, 0].numpy().clip(0, 1)
