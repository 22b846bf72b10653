"""MedSight: offline medical image classification with calibrated probabilities and heat maps.

>>> import medsight
>>> model = medsight.load_model("pneumonia-cxr")
>>> result = model.predict("chest.dcm")
>>> result.probabilities, result.heatmap, result.statement

The facade only names what the layers define. Every ``medsight.*`` import runs this file
first (the command line's included), so the names are looked up on first use (PEP 562)
and ``import medsight`` loads neither torch nor any other heavy library.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from medsight._version import __version__
from medsight.errors import MedSightError

#: public name -> (module, name there), imported when first asked for
_LAZY: dict[str, tuple[str, str]] = {
    "load_model": ("medsight.predict.load", "load_model"),
    "list_models": ("medsight.models.registry", "zoo_summary"),
    "read_image": ("medsight.io.readers", "read_image"),
    "MedImage": ("medsight.io.image", "MedImage"),
    "Predictor": ("medsight.predict.predictor", "Predictor"),
    "Prediction": ("medsight.predict.result", "Prediction"),
    "PredictionError": ("medsight.predict.result", "PredictionError"),
}

if TYPE_CHECKING:  # for type checkers and IDEs; at run time __getattr__ below does it
    from medsight.io.image import MedImage
    from medsight.io.readers import read_image
    from medsight.models.registry import zoo_summary as list_models
    from medsight.predict.load import load_model
    from medsight.predict.predictor import Predictor
    from medsight.predict.result import Prediction, PredictionError


def __getattr__(name: str):  # noqa: ANN202 - PEP 562
    try:
        module, attr = _LAZY[name]
    except KeyError:
        raise AttributeError(f"module 'medsight' has no attribute {name!r}") from None
    value = getattr(importlib.import_module(module), attr)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})


__all__ = ["__version__", "load_model", "list_models", "read_image", "MedImage", "Predictor", "Prediction", "PredictionError", "MedSightError"]
