"""int8 quantisation with ONNX Runtime (``onnxruntime.quantization``).

Static quantisation (activations *and* weights int8, QOperator format, see below) is used, because a
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

What is quantised, and in which format, was chosen by profiling the zoo models with
ONNX Runtime's profiler (batch 32, 2 threads; docs/performance.md):

* The convolutions, the linear layer, the ReLUs and the residual adds run in int8, so
  a residual block stays uint8 from end to end (``QLinearConv`` with the ReLU folded
  into its output range, ``QLinearAdd``). With only Conv/Gemm quantised every
  activation went uint8 -> float -> uint8 around each ReLU and add.
* The stem (first convolution, its ReLU and the max pooling) stays fp32. It sees 1 or
  3 input channels, so its int8 GEMM is tiny (K = 25-75) and ran far below the int8
  limit, while ONNX Runtime's fp32 NCHWc convolution does the same work faster; its
  output also feeds the OOD statistics, which then stay exact.
* QOperator format, not QDQ: with an fp32 stem, ONNX Runtime's QDQ propagation moves
  the first QuantizeLinear above the max pooling and runs it as a uint8 NCHW MaxPool,
  which took a third of the forward pass; the QOperator graph has no such move and
  was the fastest of the four combinations measured.
* The OOD statistics (mean/std subgraph) are not quantised: quantising it changed the
  OOD referral flag on a large share of a test split (``medsight runtime tune``).

The measurements behind these choices are in docs/performance.md and
benchmarks/throughput/int8_variants.md.
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
from medsight.predict.export import INPUT

QUANT_FORMAT = "QOperator"
#: bump when the quantisation settings change, so cached int8 files from older settings are not reused
QUANT_VERSION = 3
METHOD = ("static int8, QOperator format (onnxruntime.quantization.quantize_static) of Conv, Gemm, Relu and Add "
          "after the fp32 stem: per-channel int8 weights with 7-bit reduce_range, uint8 activations, MinMax calibration")

#: Operator types quantised (see the module docstring); the OOD statistics subgraph is left fp32.
OP_TYPES = ["Conv", "Gemm", "Relu", "Add"]
#: ONNX node-name scopes of the stem (Classifier.forward_intermediates: net.conv1 -> bn1 -> act -> maxpool), kept fp32
STEM_SCOPES = ("/conv1/", "/bn1/", "/act/", "/maxpool/")


def stem_nodes(model_path: Path) -> list[str]:
    """Names of the stem's nodes in an exported (pre-processed) graph; an error if there are none."""
    import onnx

    names = [n.name for n in onnx.load(str(model_path), load_external_data=False).graph.node if n.name.startswith(STEM_SCOPES)]
    if not any(n.startswith("/conv1/") for n in names):
        raise BackendError(f"{model_path}: no stem convolution (/conv1/...) in the exported graph; re-export the model")
    return names


def _quant_kwargs(model_path: Path) -> dict[str, Any]:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType

    return dict(quant_format=QuantFormat.QOperator, per_channel=True, reduce_range=True,
                activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                calibrate_method=CalibrationMethod.MinMax, op_types_to_quantize=OP_TYPES,
                nodes_to_exclude=stem_nodes(model_path))


def calibration_sample(ds: LabeledDataset, n: int, seed: int = 0) -> np.ndarray:
    """Indices of ``n`` training images, drawn without replacement with a fixed seed."""
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(len(ds), size=min(n, len(ds)), replace=False))


class DatasetCalibrationReader:
    """Feeds preprocessed images of a labelled set to ONNX Runtime's calibrator.

    Goes through :func:`batch_to_tensor`, the one preprocessing path, so the ranges
    are those of the inputs the model will see in use; unreadable images are skipped
    (:meth:`LabeledDataset.batches`).
    """

    def __init__(self, ds: LabeledDataset, spec: InputSpec, batch_size: int = 32):
        self._batches = self._iter(ds, spec, batch_size)

    @staticmethod
    def _iter(ds: LabeledDataset, spec: InputSpec, batch_size: int) -> Iterator[dict[str, np.ndarray]]:
        for batch in ds.batches(batch_size):
            yield {INPUT: batch_to_tensor(batch.images, spec).numpy()}

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
                        calibration_cache_path=str(t / "calibration.json"), **_quant_kwargs(t / "pre.onnx"))
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
                            calibration_cache_path=str(t / "calibration.json"), **_quant_kwargs(t / "pre.onnx"))
        except (KeyError, ValueError) as e:
            raise BackendError(
                f"stored int8 calibration does not fit the exported graph ({e}); re-run `medsight runtime tune`"
            ) from None
        (t / "int8.onnx").replace(out_path)
    return out_path
