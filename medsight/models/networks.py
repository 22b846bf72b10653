"""Network construction from a card's :class:`Architecture`, and the network's one forward walk.

MONAI's ResNet is used because it is maintained, works on torch 2.13 CPU and needs
no torchvision. The card stores the few knobs that matter for small inputs
(stem kernel/stride, max-pool, widths), so a 28-px MedMNIST image is not shrunk
to nothing by an ImageNet stem.

:meth:`Classifier.forward_intermediates` (after timm's method of that name) is the only
place the trunk is walked: the logits, the heat maps' feature map and the OOD detector's
layer statistics all come from it, on every backend (the ONNX export wraps it), so the
layer names below are defined here once.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from monai.networks.nets import ResNet
from torch import nn

from medsight.models.card import Architecture

#: the trunk's stages in walk order: the stem (conv1, bn1, act, maxpool), then MONAI's residual blocks (``net.layer<i>``)
STAGES = ("stem", "layer1", "layer2", "layer3", "layer4")
#: the stage whose output is the feature map (input of global average pooling) that heat maps weight
FEATURE_LAYER = STAGES[-1]
#: its qualified module name in a :class:`Classifier` (what hook-based tools such as MONAI's Grad-CAM look up)
FEATURE_MODULE = f"net.{FEATURE_LAYER}"
#: stages whose per-channel activation statistics are returned (the OOD detector's input)
STAT_LAYERS = STAGES[:3]


@dataclass(frozen=True)
class Intermediates:
    """What one forward pass yields: everything the Predictor needs besides the images."""

    logits: torch.Tensor  # (B, K)
    feature_map: torch.Tensor  # (B, C, h, w): the :data:`FEATURE_LAYER` activations, input of global average pooling
    statistics: dict[str, torch.Tensor]  # {layer in STAT_LAYERS: (B, 2C) per-channel mean and unbiased std}


def channel_statistics(h: torch.Tensor) -> torch.Tensor:
    """(B, 2C): per-channel spatial mean and (unbiased) standard deviation of a (B, C, h, w) activation."""
    return torch.cat([h.mean(dim=(2, 3)), h.std(dim=(2, 3))], dim=1)


class Classifier(nn.Module):
    """A MONAI ResNet trunk with an optional dropout before the linear head.

    The trunk's attribute names (``net.layer4``, ``net.fc``) are the state-dict keys of
    every shipped package, so they stay; code outside this module uses
    :meth:`forward_intermediates`, :meth:`class_weights` and :data:`FEATURE_LAYER` instead.
    """

    def __init__(self, arch: Architecture, in_channels: int, num_outputs: int):
        super().__init__()
        self.net = ResNet(
            block="basic",
            layers=list(arch.layers),
            block_inplanes=list(arch.widths),
            spatial_dims=2,
            n_input_channels=in_channels,
            conv1_t_size=arch.stem_kernel,
            conv1_t_stride=arch.stem_stride,
            no_max_pool=not arch.max_pool,
            num_classes=num_outputs,
        )
        self.dropout = nn.Dropout(arch.dropout) if arch.dropout > 0 else nn.Identity()

    def _stem(self, x: torch.Tensor) -> torch.Tensor:
        # The max-pool is applied whatever ``arch.max_pool`` says (MONAI's own forward would
        # skip it): every shipped model was trained and exported this way.
        n = self.net
        return n.maxpool(n.act(n.bn1(n.conv1(x))))

    def _stage(self, name: str) -> Callable[[torch.Tensor], torch.Tensor]:
        return self._stem if name == "stem" else getattr(self.net, name)

    def _walk(self, x: torch.Tensor, statistics: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(feature map, {stage: channel statistics} when asked for): the only walk through the trunk."""
        stats: dict[str, torch.Tensor] = {}
        for name in STAGES:
            x = self._stage(name)(x)
            if statistics and name in STAT_LAYERS:
                stats[name] = channel_statistics(x)
        return x, stats

    def _pooled(self, feature_map: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.net.avgpool(feature_map), 1)

    def forward_intermediates(self, x: torch.Tensor) -> Intermediates:
        """Logits, the feature map and the :data:`STAT_LAYERS` statistics of a batch, from one pass."""
        fmap, stats = self._walk(x, statistics=True)
        return Intermediates(self.head(self._pooled(fmap)), fmap, stats)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate (pooled) features: what the linear head sees."""
        return self._pooled(self._walk(x, statistics=False)[0])

    def head(self, feats: torch.Tensor) -> torch.Tensor:
        return self.net.fc(self.dropout(feats))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    def statistic_widths(self) -> dict[str, int]:
        """{stage in STAT_LAYERS: 2C}: how many statistics each returns (mean and std per output channel)."""
        n = self.net
        # the stem ends in conv1 (bn1, act and maxpool keep the channels); a stage ends in a basic block's conv2
        channels = {name: n.conv1.out_channels if name == "stem" else getattr(n, name)[-1].conv2.out_channels
                    for name in STAT_LAYERS}
        return {name: 2 * c for name, c in channels.items()}

    def class_weights(self) -> np.ndarray:
        """(K, C) float32: the linear head's weight per class (class activation maps weight the feature map by it)."""
        return self.net.fc.weight.detach().cpu().numpy()

    def replace_head(self, num_outputs: int) -> None:
        """New linear layer for a different label set (fine-tuning)."""
        self.net.fc = nn.Linear(self.net.fc.in_features, num_outputs)


def build_network(arch: Architecture, in_channels: int, num_outputs: int) -> Classifier:
    if arch.name != "resnet":  # pragma: no cover - the card schema only admits resnet today
        raise ValueError(f"unsupported architecture {arch.name!r}")
    return Classifier(arch, in_channels, num_outputs)
