"""Network construction from a card's :class:`Architecture`.

MONAI's ResNet is used because it is maintained, works on torch 2.13 CPU and needs
no torchvision. The card stores the few knobs that matter for small inputs
(stem kernel/stride, max-pool, widths), so a 28-px MedMNIST image is not shrunk
to nothing by an ImageNet stem.
"""

from __future__ import annotations

import torch
from monai.networks.nets import ResNet
from torch import nn

from medsight.models.card import Architecture

#: name of the module whose activations Grad-CAM and the OOD features use
FEATURE_LAYER = "layer4"


class Classifier(nn.Module):
    """A MONAI ResNet trunk with an optional dropout before the linear head.

    The trunk's attribute names (``layer4``, ``fc``) are kept so Grad-CAM can find
    the last convolutional block by name.
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

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate (pooled) features: what the linear head sees."""
        n = self.net
        x = n.act(n.bn1(n.conv1(x)))
        x = n.maxpool(x)
        x = n.layer4(n.layer3(n.layer2(n.layer1(x))))
        return torch.flatten(n.avgpool(x), 1)

    def head(self, feats: torch.Tensor) -> torch.Tensor:
        return self.net.fc(self.dropout(feats))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    def replace_head(self, num_outputs: int) -> None:
        """New linear layer for a different label set (fine-tuning)."""
        self.net.fc = nn.Linear(self.net.fc.in_features, num_outputs)


def build_network(arch: Architecture, in_channels: int, num_outputs: int) -> Classifier:
    if arch.name != "resnet":  # pragma: no cover - the card schema only admits resnet today
        raise ValueError(f"unsupported architecture {arch.name!r}")
    return Classifier(arch, in_channels, num_outputs)
