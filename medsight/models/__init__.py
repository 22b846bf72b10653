"""Model packages (weights + card), networks, preprocessing and the zoo registry.

The names below are imported from their submodules on first use (PEP 562), so importing one
submodule (``medsight.models.registry`` to list the zoo) does not load the others with it.
"""

from __future__ import annotations

import importlib

#: public name -> submodule of this package that defines it
_WHERE = {
    "Architecture": "card", "Calibration": "card", "InputSpec": "card", "MetricValue": "card", "ModelCard": "card",
    "ModelPackage": "package", "load_package": "package", "read_card": "package",
    "ZOO_DIR": "registry", "list_cards": "registry", "resolve": "registry",
}
__all__ = list(_WHERE)


def __getattr__(name: str):  # noqa: ANN202 - PEP 562
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
