"""int8 quantisation with ONNX Runtime (``onnxruntime.quantization``).

Static quantisation (activations *and* weights int8, QDQ format) is used, because a
convolutional network only gets faster when its activations are int8 too; dynamic
quantisation leaves the convolutions in float or runs them as slow ``ConvInteger``.

Static quantisation needs activation ranges measured on representative images.
They are measured once, on training images, by ``medsight runtime tune`` and stored
in the model package (``int8_calibration.json``, ONNX Runtime's own calibration-cache
JSON, its sha256 in ``card.runtime["int8"]``). The int8 file itself is derived data: it is rebuilt from
the fp32 export and those ranges on first use, so the repository never stores it
and every machine gets the same int8 model.

Settings: per-channel int8 weights, uint8 activations (the layout ONNX Runtime's x86
kernels are fastest with), and ``reduce_range`` (7-bit weights) so the int16
intermediate sums of CPUs without VNNI cannot saturate: the accuracy measured on one
machine then holds on every x86 CPU.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from medsight.errors import BackendError
from medsight.io.datasets import LabeledDataset
from medsight.models.card import InputSpec
from medsight.models.preprocess import batch_to_tensor
from medsight.runtime.export import INPUT

QUANT_FORMAT = "QDQ"
#: bump when the quantisation settings change, so cached int8 files from older settings are not reused
QUANT_VERSION = 2
METHOD = ("static QDQ int8 (onnxruntime.quantization.quantize_static) of Conv and Gemm: per-channel int8 weights "
          "with 7-bit reduce_range, uint8 activations, MinMax calibration")


#: Only convolutions and the linear layer are quantised. They hold nearly all the FLOPs; the rest
#: (residual adds, pooling, and the channel statistics the OOD detector scores) stays fp32 on
#: dequantised activations. Quantising every op also quantised the mean/std subgraph, and the
#: OOD referral flag then disagreed with PyTorch's on up to 74% of a test split (medsight runtime tune).
OP_TYPES = ["Conv", "Gemm"]


def _quant_kwargs() -> dict[str, Any]:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType

    return dict(quant_format=QuantFormat.QDQ, per_channel=True, reduce_range=True,
                activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                calibrate_method=CalibrationMethod.MinMax, op_types_to_quantize=OP_TYPES)


def calibration_sample(ds: LabeledDataset, n: int, seed: int = 0) -> np.ndarray:
    """Indices of ``n`` training images, drawn without replacement with a fixed seed."""
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(len(ds), size=min(n, len(ds)), replace=False))


class DatasetCalibrationReader:
    """Feeds preprocessed images of a labelled set to ONNX Runtime's calibrator.

    Goes through :func:`batch_to_tensor`, the one preprocessing path, so the ranges
    are those of the inputs the model will see in use.
    """

    def __init__(self, ds: LabeledDataset, spec: InputSpec, batch_size: int = 32):
        self._batches = self._iter(ds, spec, batch_size)

    @staticmethod
    def _iter(ds: LabeledDataset, spec: InputSpec, batch_size: int) -> Iterator[dict[str, np.ndarray]]:
        for start in range(0, len(ds), batch_size):
            images = [ds.image(i) for i in range(start, min(start + batch_size, len(ds)))]
            yield {INPUT: batch_to_tensor(images, spec).numpy()}

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._batches, None)

    def rewind(self) -> None:  # pragma: no cover - only used by ORT's strided calibration
        raise NotImplementedError


def _preprocess(fp32_path: Path, out: Path) -> None:
    """ONNX Runtime's recommended pre-pass (shape inference + graph optimisation)."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    quant_pre_process(str(fp32_path), str(out))


def measure_calibration(fp32_path: Path, ds: LabeledDataset, spec: InputSpec) -> dict[str, Any]:
    """Activation ranges of the exported model on ``ds`` (ONNX Runtime calibration-cache JSON)."""
    from onnxruntime.quantization import quantize_static

    with tempfile.TemporaryDirectory(prefix="medsight-calib-") as tmp:
        t = Path(tmp)
        _preprocess(fp32_path, t / "pre.onnx")
        quantize_static(str(t / "pre.onnx"), str(t / "int8.onnx"), DatasetCalibrationReader(ds, spec),
                        calibration_cache_path=str(t / "calibration.json"), **_quant_kwargs())
        return json.loads((t / "calibration.json").read_text())


def quantize_int8(fp32_path: Path, out_path: Path, calibration: dict[str, Any]) -> Path:
    """Build the int8 model from the fp32 export and stored activation ranges (no images needed)."""
    from onnxruntime.quantization import quantize_static

    with tempfile.TemporaryDirectory(prefix="medsight-int8-", dir=out_path.parent) as tmp:
        t = Path(tmp)
        (t / "calibration.json").write_text(json.dumps(calibration))
        _preprocess(fp32_path, t / "pre.onnx")
        try:
            quantize_static(str(t / "pre.onnx"), str(t / "int8.onnx"), None,
                            calibration_cache_path=str(t / "calibration.json"), **_quant_kwargs())
        except (KeyError, ValueError) as e:
            raise BackendError(
                f"stored int8 calibration does not fit the exported graph ({e}); re-run `medsight runtime tune`"
            ) from None
        (t / "int8.onnx").replace(out_path)
    return out_path
