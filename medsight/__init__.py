"""MedSight: offline medical image classification with calibrated probabilities and heat maps.

>>> import medsight
>>> model = medsight.load_model("pneumonia-cxr")
>>> result = model.predict("chest.dcm")
>>> result.probabilities, result.heatmap, result.statement
"""

from __future__ import annotations

from pathlib import Path

from medsight._version import __version__
from medsight.errors import MedSightError
from medsight.io.image import MedImage
from medsight.predict.predictor import Predictor
from medsight.predict.result import Prediction, PredictionError


def load_model(name_or_path: str | Path, backend: str = "auto") -> Predictor:
    """A ready-to-use model from the zoo (by name) or from a package directory.

    ``backend`` is torch | onnx | onnx-int8 | auto (see :mod:`medsight.predict`). The
    default, ``auto``, is the backend recorded in the model's card by ``medsight runtime
    tune``: the fastest one that met the accuracy rule on the model's test split (torch
    when nothing is recorded, or when the recorded one cannot be built here). So the
    library, the CLI, the service and the DICOM gateway all run one inference path;
    pass ``backend="torch"`` for the eager PyTorch reference.
    """
    from medsight.models.registry import load
    from medsight.predict.backends import make_backend

    package = load(name_or_path)
    return Predictor(package, backend=make_backend(package, backend))


def list_models() -> list[dict]:
    """The zoo: one dict per model with modality, labels and measured test performance."""
    from medsight.models.registry import list_cards

    return [
        {
            "name": c.name, "version": c.version, "task": c.task, "modality": c.modality,
            "body_part": c.body_part, "labels": c.labels, "input_size": c.input.size,
            "test_auc": c.test_metrics.get("auc").value if "auc" in c.test_metrics else None,
            "test_accuracy": c.test_metrics.get("accuracy").value if "accuracy" in c.test_metrics else None,
            "description": c.description,
        }
        for c in list_cards()
    ]


def read_image(path: str | Path) -> MedImage:
    from medsight.io.readers import read_image as _read

    return _read(path)


__all__ = ["__version__", "load_model", "list_models", "read_image", "MedImage", "Predictor", "Prediction", "PredictionError", "MedSightError"]
