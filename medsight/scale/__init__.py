"""Batch inference at scale: the same predictions as the local engine, on a Ray cluster.

``pip install medsight[ray]`` adds Ray; nothing here imports it until the Ray engine runs,
and the names below are imported from :mod:`medsight.scale.engine` on first use (PEP 562).
"""

from __future__ import annotations

import importlib

__all__ = ["BatchJob", "BatchSummary", "RayOptions", "run_local", "run_ray"]


def __getattr__(name: str):  # noqa: ANN202 - PEP 562
    if name not in __all__:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module("medsight.scale.engine"), name)
