"""Deterministic, seeded, group-aware splits for data sets that ship without one.

Images of one patient (or lesion, or duplicate group) must never sit on both
sides of a split, so folds are made with scikit-learn's StratifiedGroupKFold.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedGroupKFold

from medsight.errors import DataSetError


def _carve(labels: np.ndarray, groups: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Boolean mask of roughly ``fraction`` of the rows, whole groups only, stratified by label."""
    n_splits = max(2, int(round(1.0 / fraction)))
    if len(np.unique(groups)) < n_splits:
        raise DataSetError(f"too few groups ({len(np.unique(groups))}) to carve a {fraction:.0%} split")
    skf = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    _, held = next(iter(skf.split(np.zeros(len(labels)), labels, groups)))
    mask = np.zeros(len(labels), dtype=bool)
    mask[held] = True
    return mask


def group_split(labels: pd.Series, groups: pd.Series | None, val: float, test: float, seed: int) -> np.ndarray:
    """Array of 'train' / 'val' / 'test' per row. ``test`` may be 0 (split column given elsewhere)."""
    y = labels.astype(str).to_numpy()
    g = groups.astype(str).to_numpy() if groups is not None else np.arange(len(y)).astype(str)
    out = np.full(len(y), "train", dtype=object)
    rest = np.arange(len(y))
    if test > 0:
        m = _carve(y, g, test, seed)
        out[m] = "test"
        rest = np.where(~m)[0]
    if val > 0:
        m = _carve(y[rest], g[rest], val / (1 - test), seed + 1)
        out[rest[m]] = "val"
    return out
