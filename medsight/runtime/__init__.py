"""Fast inference: ONNX export, ONNX Runtime sessions, int8 quantisation, backend choice.

The :class:`~medsight.predict.predictor.Predictor` keeps one code path for
preprocessing, calibration, decisions, referral and heat maps; a backend from
:func:`make_backend` only replaces the step "tensor -> logits + last feature map".
"""

from medsight.runtime.backends import BACKENDS, CHOICES, ForwardOutput, InferenceBackend, OnnxBackend, TorchBackend, make_backend, recorded_choice
from medsight.runtime.settings import RuntimeSettings

__all__ = ["BACKENDS", "CHOICES", "ForwardOutput", "InferenceBackend", "OnnxBackend", "TorchBackend", "RuntimeSettings",
           "make_backend", "recorded_choice"]
