"""Derived model files (ONNX fp32 and int8), built on first use into a cache directory.

The files are keyed by the weights' sha256 (which the package already verified), the
export format version and, for int8, a hash of the calibration ranges, so a retrained
or re-tuned model can never pick up a stale file, and the repository stores only the
weights. Files are written to a temporary name and renamed, so two processes (e.g.
Ray actors) building the same file at once each see either nothing or a whole file.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from medsight.errors import BackendError
from medsight.models.package import ModelPackage, sha256_of
from medsight.predict.export import EXPORT_FORMAT, export_onnx
from medsight.predict.settings import RuntimeSettings

WEIGHTS_KEY = "medsight.weights_sha256"
#: int8 activation ranges inside a package (ONNX Runtime calibration-cache JSON), written by `medsight runtime tune`
CALIBRATION_FILE = "int8_calibration.json"


def _writable_cache(settings: RuntimeSettings) -> Path:
    d = settings.onnx_cache
    try:
        d.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise BackendError(f"cannot create the model cache {d} ({e}); set MEDSIGHT_CACHE_DIR to a writable folder") from None
    return d


def _weights_sha(package: ModelPackage) -> str:
    sha = package.card.weights_sha256
    if not sha:
        raise BackendError(f"{package.card.name}: card has no weights_sha256, so derived files cannot be cached safely")
    return sha


def onnx_model_path(package: ModelPackage, settings: RuntimeSettings) -> Path:
    """The fp32 ONNX export of ``package`` (exported now if not cached)."""
    sha = _weights_sha(package)
    path = _writable_cache(settings) / f"{sha}.v{EXPORT_FORMAT}.onnx"
    if not path.is_file():
        try:
            export_onnx(package.network, package.card.input, path,
                        metadata={WEIGHTS_KEY: sha, "medsight.model": f"{package.card.name}@{package.card.version}"})
        except OSError as e:
            raise BackendError(f"cannot write {path} ({e}); set MEDSIGHT_CACHE_DIR to a writable folder") from None
    return path


def int8_calibration(package: ModelPackage) -> dict[str, Any]:
    """The package's int8 activation ranges (file named in card.runtime), checked like the weights."""
    rt = package.card.runtime or {}
    info = rt.get("int8") or {}
    name = package.card.name
    if not info.get("calibration_file"):
        raise BackendError(f"{name}: the card has no int8 calibration; run `medsight runtime tune {name}` with the training data first")
    if rt.get("weights_sha256") != package.card.weights_sha256:
        raise BackendError(f"{name}: the card's int8 calibration was measured for other weights; re-run `medsight runtime tune {name}`")
    if package.path is None:
        raise BackendError(f"{name}: the package has no directory to read {info['calibration_file']} from")
    path = Path(package.path) / info["calibration_file"]
    if not path.is_file():
        raise BackendError(f"{path}: int8 calibration named in the card is missing; re-run `medsight runtime tune {name}`")
    digest = sha256_of(path)
    if digest != info.get("calibration_sha256"):
        raise BackendError(f"{path}: sha256 {digest} does not match the card; refusing to build an int8 model from it")
    return json.loads(path.read_text())


def int8_model_path(package: ModelPackage, settings: RuntimeSettings, calibration: dict[str, Any] | None = None) -> Path:
    """The int8 model built from the fp32 export and the calibration ranges (card's by default)."""
    from medsight.predict.quantize import QUANT_VERSION, quantize_int8

    calib = calibration if calibration is not None else int8_calibration(package)
    key = hashlib.sha256(json.dumps(calib, sort_keys=True).encode()).hexdigest()[:16]
    path = _writable_cache(settings) / f"{_weights_sha(package)}.v{EXPORT_FORMAT}.int8q{QUANT_VERSION}-{key}.onnx"
    if not path.is_file():
        try:
            quantize_int8(onnx_model_path(package, settings), path, calib)
        except OSError as e:
            raise BackendError(f"cannot write {path} ({e}); set MEDSIGHT_CACHE_DIR to a writable folder") from None
    return path
