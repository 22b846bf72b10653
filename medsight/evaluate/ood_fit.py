"""Fitting an out-of-distribution detector and storing it in a package.

The offline half of :mod:`medsight.predict.ood` (which scores): the blocks' statistics of
a labelled set, the scorers fitted on the training images, the cross-fitted threshold set,
and ``ood.safetensors`` + the card's ``ood`` field. The method and the reasons for the
threshold rules are in docs/ood.md.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from datetime import date
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import save_file
from sklearn.covariance import LedoitWolf

from medsight._version import __version__
from medsight.errors import DataSetError
from medsight.io.datasets import LabeledDataset
from medsight.models.package import ModelPackage, load_package, read_card, sha256_of, write_card
from medsight.models.preprocess import batch_to_tensor
from medsight.predict.ood import (BLOCKS, DEFAULT_K, IMAGE, IMAGE_FEATURES, LAYERS, METHOD, OOD_FILE, SCORERS, LayerScorer,
                                  OODDetector, check_blocks, image_statistics, layer_statistics, raw_scores, unit_rows)

DEFAULT_VAL_FLAG_RATE = 0.01
#: how the threshold set is built (docs/ood.md); the first is the default
THRESHOLD_RULES = ("cross-fit", "val")
DEFAULT_THRESHOLD_RULE = "cross-fit"
DEFAULT_FOLDS = 10
DEFAULT_BANK = 2000


def dataset_statistics(package: ModelPackage, ds: LabeledDataset, batch_size: int = 128) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Statistics of every block (:data:`BLOCKS`) of every readable image of ``ds`` and the indices that were readable.

    Read through :meth:`LabeledDataset.batches` (unreadable images skipped; none readable is
    an error) and the one preprocessing path.
    """
    parts: list[dict[str, np.ndarray]] = []
    keep: list[np.ndarray] = []
    for batch in ds.batches(batch_size):
        stats = layer_statistics(package.network, batch_to_tensor(batch.images, package.card.input))
        stats[IMAGE] = image_statistics(batch.images)
        parts.append(stats)
        keep.append(batch.index)
    return {k: np.concatenate([p[k] for p in parts]) for k in BLOCKS}, np.concatenate(keep)


# -- scorers and the threshold set --------------------------------------------------------
def fit_scorer(feats: np.ndarray, y: np.ndarray, k: int, bank_size: int, rng: np.random.Generator) -> LayerScorer:
    """Class means, a Ledoit-Wolf shared precision and a seeded neighbour bank of at most ``bank_size`` rows."""
    y = np.asarray(y).astype(int)
    classes = np.unique(y)
    means = np.stack([feats[y == c].mean(axis=0) for c in classes])
    centred = feats - means[np.searchsorted(classes, y)]
    precision = LedoitWolf(assume_centered=True).fit(centred).precision_
    idx = np.sort(rng.choice(len(feats), bank_size, replace=False)) if len(feats) > bank_size else np.arange(len(feats))
    return LayerScorer(means, precision, unit_rows(feats[idx]).astype(np.float32), min(k, len(idx)))


def threshold_for_flag_rate(scores: np.ndarray, rate: float) -> float:
    """Smallest order statistic t with at most ``floor(rate * n)`` scores strictly above t."""
    s = np.sort(np.asarray(scores, dtype=np.float64))
    if s.size == 0:
        raise DataSetError("cannot choose an OOD threshold on an empty set")
    if not 0 <= rate < 1:
        raise ValueError("flag rate must be in [0, 1)")
    k = int(np.floor(rate * s.size))
    return float(s[s.size - 1 - k])


def _fit_scorers(train: dict[str, np.ndarray], y: np.ndarray, blocks: tuple[str, ...], k: int, bank_size: int,
                 rng: np.random.Generator) -> dict[str, LayerScorer]:
    # image statistics do not depend on the class: one pooled mean
    return {name: fit_scorer(train[name], np.zeros_like(y) if name == IMAGE else y, k, bank_size, rng) for name in blocks}


def fold_assignment(y: np.ndarray, folds: int, seed: int = 0) -> np.ndarray:
    """Seeded, class-stratified fold (0 .. folds - 1) of every training image; fold sizes differ by at most one."""
    y = np.asarray(y)
    rng = np.random.default_rng([seed, 2718])  # a stream of its own, apart from the neighbour banks' draws
    fold = np.empty(len(y), dtype=int)
    offset = 0
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        fold[idx] = (np.arange(len(idx)) + offset) % folds  # round robin continued across classes
        offset += len(idx)
    return fold


def _cross_fit(train: dict[str, np.ndarray], y: np.ndarray, blocks: tuple[str, ...], folds: int, k: int, bank_size: int,
               seed: int) -> tuple[dict[str, LayerScorer], np.ndarray, np.ndarray]:
    """(scorers fitted on all folds but fold 0, fold of every image, (N, L, 2) out-of-fold raw scores)."""
    fold = fold_assignment(y, folds, seed)
    raw = np.empty((len(y), len(blocks), len(SCORERS)))
    first: dict[str, LayerScorer] = {}
    for f in range(folds):
        held = fold == f
        fit_part = {name: train[name][~held] for name in blocks}
        layers = _fit_scorers(fit_part, y[~held], blocks, k, bank_size, np.random.default_rng([seed, f + 1]))
        raw[held] = raw_scores(layers, {name: train[name][held] for name in blocks}, blocks)
        if f == 0:
            first = layers
    return first, fold, raw


def out_of_fold_raw(train: dict[str, np.ndarray], y: np.ndarray, blocks: Sequence[str], folds: int = DEFAULT_FOLDS,
                    k: int = DEFAULT_K, bank_size: int = DEFAULT_BANK, seed: int = 0) -> np.ndarray:
    """(N, L, 2) raw scores of every training image by scorers fitted on the other folds (:func:`fold_assignment`)."""
    return _cross_fit(train, np.asarray(y), check_blocks(blocks), folds, k, bank_size, seed)[2]


def fit_detector(
    train: dict[str, np.ndarray], y: np.ndarray, val: dict[str, np.ndarray] | None, val_flag_rate: float = DEFAULT_VAL_FLAG_RATE,
    k: int = DEFAULT_K, bank_size: int = DEFAULT_BANK, seed: int = 0, blocks: Sequence[str] = LAYERS,
    threshold_rule: str = DEFAULT_THRESHOLD_RULE, folds: int = DEFAULT_FOLDS,
) -> tuple[OODDetector, np.ndarray]:
    """Fit on training statistics, standardise and threshold on the threshold set; returns (detector, threshold-set scores).

    ``threshold_rule="cross-fit"``: the training images are split into ``folds``
    class-stratified folds (:func:`fold_assignment`); the threshold set is every training
    image's out-of-fold score followed by the scores of ``val`` (optional; None = the
    out-of-fold scores alone), in that order, and the stored scorers are the fold-0
    detector's (fitted on all folds but fold 0), so that every score in the threshold
    set and every deployed score comes from scorers fitted on the same number of images
    the score's image is not among. ``"val"``: the scorers are fitted on all of
    ``train`` and the threshold set is ``val``. ``val_flag_rate``: the share of the
    threshold set that may lie above the threshold.
    """
    blocks = check_blocks(blocks)
    if threshold_rule not in THRESHOLD_RULES:
        raise ValueError(f"OOD threshold rule must be one of {THRESHOLD_RULES}, got {threshold_rule!r}")
    y = np.asarray(y)
    if len(y) < 2:
        raise DataSetError("fitting an OOD detector needs at least two training images")
    bad = [name for name in blocks if len(train[name]) != len(y)]
    if bad:
        raise ValueError(f"OOD training statistics of {bad} do not have one row per label ({len(y)})")
    if threshold_rule == "val":
        if val is None or len(val[blocks[0]]) < 2:
            raise DataSetError("choosing an OOD threshold on the validation split needs at least two validation images")
        layers = _fit_scorers(train, y, blocks, k, bank_size, np.random.default_rng(seed))
        parts = [raw_scores(layers, val, blocks)]
    else:
        if isinstance(folds, bool) or not isinstance(folds, (int, np.integer)) or folds < 2:
            raise ValueError(f"a cross-fitted OOD threshold needs at least 2 folds, got {folds!r}")
        if len(y) < 2 * folds:
            raise DataSetError(f"a {folds}-fold cross-fitted OOD threshold needs at least {2 * folds} training images "
                               f"(two per fold), got {len(y)}; use fewer folds or threshold_rule='val'")
        if val is not None and len(val[blocks[0]]) == 0:
            raise DataSetError("the OOD validation set is empty; pass None to threshold on the out-of-fold training scores alone")
        layers, _, oof = _cross_fit(train, y, blocks, folds, k, bank_size, seed)
        parts = [oof] if val is None else [oof, raw_scores(layers, val, blocks)]
    raw = np.concatenate(parts)
    std = raw.std(axis=0)
    det = OODDetector(layers, raw.mean(axis=0), np.where(std > 0, std, 1.0), threshold=0.0, blocks=blocks)
    scores = det.standardise(raw).sum(axis=(1, 2))
    det.threshold = threshold_for_flag_rate(scores, val_flag_rate)
    return det, scores


# -- packages -------------------------------------------------------------------------------
def _class_targets(ds: LabeledDataset) -> np.ndarray:
    # Multi-label sets have no single class per image; one pooled mean is used then.
    return np.zeros(len(ds), dtype=int) if ds.multilabel else ds.y


def fit_ood(
    package_dir: str | Path, train_ds: LabeledDataset, val_ds: LabeledDataset | None = None,
    val_flag_rate: float = DEFAULT_VAL_FLAG_RATE, k: int = DEFAULT_K, bank_size: int = DEFAULT_BANK, seed: int = 0,
    blocks: Sequence[str] = LAYERS, selection: dict[str, Any] | None = None,
    threshold_rule: str = DEFAULT_THRESHOLD_RULE, folds: int = DEFAULT_FOLDS,
) -> dict[str, Any]:
    """Fit the detector on ``train_ds``, standardise/threshold on the threshold set, store it in the package.

    The threshold set (``threshold_rule``, docs/ood.md): ``"cross-fit"`` (default) pools
    the out-of-fold scores of ``train_ds`` (``folds`` folds) with the scores of ``val_ds``
    (when given), and the stored detector is fitted on all folds but fold 0; ``"val"``
    fits on all of ``train_ds`` and uses ``val_ds`` alone, or without ``val_ds`` a seeded
    20% of the training images held out of the fit (weaker, because the network has seen
    those images).

    Writes ``ood.safetensors`` and the card's ``ood`` field only (weights, calibration
    and metrics are untouched; the card is re-read just before writing so concurrent
    edits of other fields survive). ``blocks``: which statistics are scored
    (:data:`BLOCKS`; adding ``"image"`` makes the score use the images too);
    ``selection``: how they were chosen, recorded in the card. The card records the
    threshold set's name and size and, per part of it, its size and flag rate.
    Returns the new ``card.ood`` dict.
    """
    if threshold_rule not in THRESHOLD_RULES:
        raise ValueError(f"OOD threshold rule must be one of {THRESHOLD_RULES}, got {threshold_rule!r}")
    d = Path(package_dir)
    pkg = load_package(d)
    stats, keep = dataset_statistics(pkg, train_ds)
    y = _class_targets(train_ds)[keep]
    val_stats = dataset_statistics(pkg, val_ds)[0] if val_ds is not None else None
    train_stats = stats
    parts: list[tuple[str, int]] = []  # (name, n) of each part of the threshold set, in score order
    if threshold_rule == "val" and val_ds is None:
        order = np.random.default_rng(seed).permutation(len(y))
        n_hold = max(2, len(y) // 5)
        hold, fit_idx = order[:n_hold], order[n_hold:]
        train_stats, val_stats = {kk: v[fit_idx] for kk, v in stats.items()}, {kk: v[hold] for kk, v in stats.items()}
        y = y[fit_idx]
        parts.append((f"{train_ds.name} (seeded 20% held out of the fit)", len(hold)))
    else:
        if threshold_rule == "cross-fit":
            parts.append((f"{train_ds.name} out-of-fold ({folds} class-stratified folds, seed {seed})", len(y)))
        if val_ds is not None:
            parts.append((val_ds.name, len(val_stats[IMAGE])))
    det, scores = fit_detector(train_stats, y, val_stats, val_flag_rate, k, bank_size, seed, blocks, threshold_rule, folds)
    n_fit = int(len(y)) if threshold_rule == "val" else int(np.sum(fold_assignment(y, folds, seed) != 0))
    flagged = scores > det.threshold
    bounds = np.cumsum([0] + [n for _, n in parts])
    assert bounds[-1] == len(scores)
    ood_path = d / OOD_FILE
    _atomic_save(det.arrays(), ood_path)
    info = {
        "method": METHOD,
        "file": OOD_FILE,
        "sha256": sha256_of(ood_path),
        "threshold": det.threshold,
        "layers": list(det.blocks),
        "features": "per-channel mean and std of the " + ", ".join(b for b in det.blocks if b != IMAGE) + " activations"
                    + ("; image-level: " + ", ".join(IMAGE_FEATURES) if det.uses_images else ""),
        "scores": "per block: squared Mahalanobis distance to the nearest class mean (shared Ledoit-Wolf covariance; "
                  f"image block: one pooled mean) and cosine distance to the {k}-th nearest training image; "
                  "each standardised on the threshold set; summed",
        "k": k,
        "bank_size": int(len(det.layers[det.blocks[0]].bank)),
        "fitted_on": train_ds.name,
        "n_fit": n_fit,
        "threshold_rule": threshold_rule,
        "threshold_set": " + ".join(name for name, _ in parts),
        "n_threshold_set": int(len(scores)),
        "threshold_set_parts": [{"name": name, "n": int(n), "flag_rate": float(flagged[lo:hi].mean())}
                                for (name, n), lo, hi in zip(parts, bounds[:-1], bounds[1:])],
        "target_flag_rate": val_flag_rate,
        "flag_rate_on_threshold_set": float(flagged.mean()),
        "fitted": str(date.today()),
        "medsight_version": __version__,
    }
    if threshold_rule == "cross-fit":
        info["folds"] = folds
        info["fit_subset"] = (f"all training images but fold 0 of {folds} ({n_fit} of {len(y)}), so the stored detector is fitted "
                              "on as many images as each detector that gave an out-of-fold score")
    if selection is not None:
        info["selection"] = selection
    card = read_card(d)
    card.ood = info
    write_card(card, d)
    return info


def _atomic_save(arrays: dict[str, np.ndarray], path: Path) -> None:
    """Write to a temporary file and rename, so a reader never sees half a file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".ood-", suffix=".safetensors")
    os.close(fd)
    try:
        save_file({k: np.ascontiguousarray(v) for k, v in arrays.items()}, tmp, metadata={"method": METHOD})
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; a package file must be readable by the service user
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
