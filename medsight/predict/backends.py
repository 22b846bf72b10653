"""Inference backends: the one step that differs between PyTorch, ONNX Runtime and int8.

A backend turns a preprocessed batch (B, C, S, S) into what
:meth:`~medsight.models.networks.Classifier.forward_intermediates` returns: logits (B, K),
the last feature map (B, C', h, w) and the early layers' channel statistics (the OOD
detector's input), all from one forward pass. Everything before (reading, preprocessing) and after
(calibration, decisions, referral, heat maps, OOD scores) is done once, by
:class:`medsight.predict.predictor.Predictor`, for every backend.

``auto`` resolves to the backend that ``medsight runtime tune`` recorded in the card
(the fastest one that met the accuracy rule on the model's official test split); a
card without that record, or a record for other weights, resolves to ``torch``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from medsight.errors import BackendError
from medsight.models.card import ModelCard
from medsight.models.networks import STAT_LAYERS, Classifier
from medsight.models.package import ModelPackage
from medsight.predict.export import INPUT, OUTPUTS, IntermediatesTuple
from medsight.predict.settings import RuntimeSettings

log = logging.getLogger(__name__)

BACKENDS = ("torch", "onnx", "onnx-int8")
CHOICES = (*BACKENDS, "auto")


@dataclass(frozen=True)
class ForwardOutput:
    logits: np.ndarray  # (B, K) float32
    feature_maps: np.ndarray  # (B, C, h, w) float32: Intermediates.feature_map, input of the global average pooling
    statistics: dict[str, np.ndarray]  # OOD input: {layer in STAT_LAYERS: (B, 2C) channel mean and std}, float64

    @staticmethod
    def concat(parts: list["ForwardOutput"]) -> "ForwardOutput":
        return ForwardOutput(np.concatenate([p.logits for p in parts]), np.concatenate([p.feature_maps for p in parts]),
                             {k: np.concatenate([p.statistics[k] for p in parts]) for k in STAT_LAYERS})

    @staticmethod
    def of(outputs: list[np.ndarray]) -> "ForwardOutput":
        """From the outputs in :data:`medsight.predict.export.OUTPUTS` order."""
        logits, fmap, *stats = outputs
        return ForwardOutput(logits, fmap, {k: v.astype(np.float64) for k, v in zip(STAT_LAYERS, stats)})


class InferenceBackend(Protocol):
    name: str

    def forward(self, x: torch.Tensor) -> ForwardOutput: ...


class TorchBackend:
    """Eager PyTorch: the reference every other backend is measured against.

    Uses the process's torch thread setting (``torch.set_num_threads``) rather than
    changing it, since that setting is global to the process.
    """

    name = "torch"

    def __init__(self, network: Classifier):
        self._module = IntermediatesTuple(network).eval()

    def forward(self, x: torch.Tensor) -> ForwardOutput:
        with torch.inference_mode():
            return ForwardOutput.of([t.numpy() for t in self._module(x)])


class OnnxBackend:
    """An ONNX Runtime CPU session over an exported (fp32 or int8) model file."""

    def __init__(self, model_path: Path, settings: RuntimeSettings, name: str = "onnx"):
        try:
            import onnxruntime as ort
        except ImportError as e:  # pragma: no cover - onnxruntime is a base dependency
            raise BackendError(f"the {name} backend needs onnxruntime ({e})") from None
        so = ort.SessionOptions()
        so.intra_op_num_threads = settings.intra_op_threads
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # Idle ORT threads spin-wait for the next operator by default; the Predictor's own work
        # between forward passes (heat maps, resizing, decode threads) then competes with them.
        # Off unless asked for (benchmarks/throughput measures both; see medsight.predict.settings).
        so.add_session_config_entry("session.intra_op.allow_spinning", "1" if settings.ort_spinning else "0")
        try:
            self.session = ort.InferenceSession(str(model_path), so, providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime raises its own exception types for unreadable models
            raise BackendError(f"{model_path}: ONNX Runtime cannot load this model ({e}); delete it to rebuild") from None
        self.name = name
        self.model_path = Path(model_path)
        self.metadata = dict(self.session.get_modelmeta().custom_metadata_map)

    def forward(self, x: torch.Tensor) -> ForwardOutput:
        return ForwardOutput.of(self.session.run(list(OUTPUTS), {INPUT: np.ascontiguousarray(x.numpy(), dtype=np.float32)}))


def recorded_choice(card: ModelCard) -> tuple[str, str]:
    """(backend, reason) that ``auto`` means for this card."""
    rt = card.runtime or {}
    choice = rt.get("backend")
    if choice not in BACKENDS:
        return "torch", "no backend choice recorded in the card (run `medsight runtime tune`)"
    if rt.get("weights_sha256") != card.weights_sha256:
        return "torch", "the card's backend choice was measured for other weights"
    return choice, str(rt.get("reason", "recorded by medsight runtime tune"))


def make_backend(package: ModelPackage, name: str = "torch", settings: RuntimeSettings | None = None) -> InferenceBackend:
    """The backend ``name`` (one of :data:`CHOICES`) for a loaded package.

    ONNX files are built into the cache on first use. ``auto`` falls back to ``torch``
    (with a log warning) if the recorded backend cannot be built on this machine.
    """
    from medsight.predict.cache import int8_model_path, onnx_model_path

    if name not in CHOICES:
        raise BackendError(f"unknown backend {name!r}; choose one of {', '.join(CHOICES)}")
    settings = settings or RuntimeSettings()
    if name == "auto":
        choice, reason = recorded_choice(package.card)
        try:
            backend = make_backend(package, choice, settings)
        except BackendError as e:
            log.warning("%s: backend %s unavailable (%s); using torch", package.card.name, choice, e)
            return TorchBackend(package.network)
        log.info("%s: auto backend = %s (%s)", package.card.name, choice, reason)
        return backend
    if name == "torch":
        return TorchBackend(package.network)
    build = onnx_model_path if name == "onnx" else int8_model_path
    return _open_cached(package, lambda: build(package, settings), settings, name)


def _open_cached(package: ModelPackage, build: Callable[[], Path], settings: RuntimeSettings, name: str) -> OnnxBackend:
    """Open a cached file; one that is unreadable or made from other weights is rebuilt once."""
    from medsight.predict.cache import WEIGHTS_KEY

    path = build()
    for attempt in (1, 2):
        try:
            backend = OnnxBackend(path, settings, name)
            if backend.metadata.get(WEIGHTS_KEY) == package.card.weights_sha256:
                return backend
            problem = f"{path} was built from other weights"
        except BackendError as e:
            problem = str(e)
        if attempt == 1:
            log.warning("%s; rebuilding it", problem)
            path.unlink(missing_ok=True)
            path = build()
    raise BackendError(problem)
