"""Export a package's network to ONNX with the logits, the last feature map and the OOD statistics.

The graph is :meth:`Classifier.forward_intermediates` (the network's one forward walk),
flattened to a tuple. The feature map is exported next to the logits so heat maps stay
available on the fast path: for a network that ends in global average pooling and a
linear layer, Grad-CAM equals the class-weighted sum of that map (see
:mod:`medsight.predict.cam`), so no gradients are needed. The early layers' channel
statistics are exported so out-of-distribution scores need no second, PyTorch, forward
pass either.

The legacy TorchScript exporter (``dynamo=False``) is used: it is part of torch
itself, needs no ``onnxscript``, and handles this plain convolutional network
exactly (the tests bound the logit difference to PyTorch).
"""

from __future__ import annotations

import os
import tempfile
import warnings
from pathlib import Path

import torch
from torch import nn

from medsight.models.card import InputSpec
from medsight.models.networks import STAT_LAYERS, Classifier

#: ONNX operator set; 17 is supported by every onnxruntime release since 1.14.
OPSET = 17
#: bump when the exported graph changes, so cached files from older versions are not reused
EXPORT_FORMAT = 2
INPUT = "input"
LOGITS = "logits"
FEATURE_MAP = "feature_map"
STAT_OUTPUTS = tuple(f"stats_{k}" for k in STAT_LAYERS)
OUTPUTS = (LOGITS, FEATURE_MAP, *STAT_OUTPUTS)


class IntermediatesTuple(nn.Module):
    """:meth:`Classifier.forward_intermediates` as a tuple in :data:`OUTPUTS` order (what an exporter can name)."""

    def __init__(self, network: Classifier):
        super().__init__()
        self.network = network

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.network.forward_intermediates(x)
        return (out.logits, out.feature_map, *(out.statistics[k] for k in STAT_LAYERS))


def export_onnx(network: Classifier, spec: InputSpec, path: str | Path, metadata: dict[str, str] | None = None) -> Path:
    """Write the network as ONNX (dynamic batch axis) to ``path`` atomically.

    ``metadata`` is stored in the model's ``metadata_props`` (e.g. the weights'
    sha256), so a cached file can be checked against the package it came from.
    """
    import onnx

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    module = IntermediatesTuple(network).eval()
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
                input_names=[INPUT], output_names=list(OUTPUTS),
                dynamic_axes={name: {0: "batch"} for name in (INPUT, *OUTPUTS)},
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
