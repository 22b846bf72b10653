"""The one door into every model: a zoo name, a package directory or a loaded package -> a :class:`Predictor`.

Every caller (library, CLI, demo, validation, the service's catalog, the batch engines)
gets its Predictor here, so they all run the same backend for the same model unless
they ask for another one by name.
"""

from __future__ import annotations

from pathlib import Path

from medsight.models.package import ModelPackage
from medsight.models.registry import load
from medsight.predict.backends import make_backend
from medsight.predict.predictor import Predictor
from medsight.predict.settings import RuntimeSettings


def load_model(model: str | Path | ModelPackage, backend: str = "auto", settings: RuntimeSettings | None = None) -> Predictor:
    """A ready-to-use model.

    ``backend`` is torch | onnx | onnx-int8 | auto (see :mod:`medsight.predict.backends`). The
    default, ``auto``, is the backend recorded in the model's card by ``medsight runtime tune``:
    the fastest one that met the accuracy rule on the model's test split (torch when nothing is
    recorded, or when the recorded one cannot be built here). Pass ``backend="torch"`` for the
    eager PyTorch reference. ``settings``: the ONNX cache and the inference and decode threads
    (default: :class:`RuntimeSettings`, every core this process may use).
    """
    package = model if isinstance(model, ModelPackage) else load(model)
    settings = settings or RuntimeSettings()
    return Predictor(package, make_backend(package, backend, settings), settings)
