"""Export a package's network to ONNX with two outputs: the logits and the last feature map.

The feature map (``net.layer4`` activations) is exported next to the logits so heat
maps stay available on the fast path: for a network that ends in global average
pooling and a linear layer, Grad-CAM equals the class-weighted sum of that map
(see :mod:`medsight.runtime.cam`), so no gradients are needed.

The legacy TorchScript exporter (``dynamo=False``) is used: it is part of torch
itself, needs no ``onnxscript``, and handles this plain convolutional network
exactly (max abs logit difference ~1e-6, checked by the tests).
"""

from __future__ import annotations

import os
import tempfile
import warnings
from pathlib import Path

import torch
from torch import nn

from medsight.models.card import InputSpec
from medsight.models.networks import Classifier

#: ONNX operator set; 17 is supported by every onnxruntime release since 1.14.
OPSET = 17
#: bump when the exported graph changes, so cached files from older versions are not reused
EXPORT_FORMAT = 1
INPUT = "input"
LOGITS = "logits"
FEATURE_MAP = "feature_map"


class LogitsAndFeatureMap(nn.Module):
    """The classifier's forward pass, also returning the last convolutional feature map.

    Mirrors :meth:`Classifier.features` + :meth:`Classifier.head` operation for
    operation (the tests check its logits against ``network(x)``), because the
    exporter needs one module whose outputs are both tensors.
    """

    def __init__(self, network: Classifier):
        super().__init__()
        self.network = network

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n = self.network.net
        h = n.maxpool(n.act(n.bn1(n.conv1(x))))
        fmap = n.layer4(n.layer3(n.layer2(n.layer1(h))))
        logits = self.network.head(torch.flatten(n.avgpool(fmap), 1))
        return logits, fmap


def export_onnx(network: Classifier, spec: InputSpec, path: str | Path, metadata: dict[str, str] | None = None) -> Path:
    """Write the network as ONNX (dynamic batch axis) to ``path`` atomically.

    ``metadata`` is stored in the model's ``metadata_props`` (e.g. the weights'
    sha256), so a cached file can be checked against the package it came from.
    """
    import onnx

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    module = LogitsAndFeatureMap(network).eval()
    example = torch.zeros(2, spec.channels, spec.size, spec.size)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".export-", suffix=".onnx")
    os.close(fd)
    try:
        with warnings.catch_warnings():
            # torch >= 2.9 warns that the TorchScript exporter is legacy; it is still supported
            # and is the one that needs no extra dependency.
            warnings.simplefilter("ignore", category=DeprecationWarning)
            torch.onnx.export(
                module, (example,), tmp, dynamo=False, opset_version=OPSET, do_constant_folding=True,
                input_names=[INPUT], output_names=[LOGITS, FEATURE_MAP],
                dynamic_axes={INPUT: {0: "batch"}, LOGITS: {0: "batch"}, FEATURE_MAP: {0: "batch"}},
            )
        model = onnx.load(tmp)
        onnx.checker.check_model(model)
        for k, v in (metadata or {}).items():
            entry = model.metadata_props.add()
            entry.key, entry.value = k, v
        onnx.save(model, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path
