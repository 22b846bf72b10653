"""Out-of-distribution (OOD) scores: does this image look like the model's training data?

A classifier always answers, even for a dermoscopy photo shown to a chest X-ray
model. The detector here gives every prediction a score and a referral rule, so
such an image says "refer to a human" instead of a finding.

What is measured. Images of another modality differ first in low-level texture
and intensity statistics, which the early layers of the network encode; the
penultimate features of a classifier trained on a few hundred images mostly
encode the class and miss them (measured: far-OOD AUROC 0.36-0.96 with
penultimate-feature Mahalanobis, see benchmarks/ood). So the detector describes
an image by the per-channel mean and standard deviation of the activations of
the stem and the first two residual blocks ("feature statistics", as in
Lee et al., NeurIPS 2018, multi-layer variant) and scores each block twice:

* Mahalanobis distance to the nearest class mean with one covariance shared by
  the classes (Lee et al. 2018), shrunk with Ledoit-Wolf (scikit-learn) because a
  few hundred images give a singular sample covariance;
* cosine distance to the k-th nearest training image (Sun et al., ICML 2022,
  "deep nearest neighbours"), via scikit-learn's ``NearestNeighbors``.

Optionally (``blocks`` including ``"image"``) the image itself is described too,
independently of the network: how coloured it is (mean over pixels of the largest
channel difference; 0 for a grey image) and its grey-level distribution (mean,
standard deviation and an 8-bin histogram of the [0, 1] intensities). Colour is the
clearest difference between dermoscopy photos and radiology, and it is lost once a
grey model's preprocessing converts the image to one channel, so no network layer
can see it. The image's size and aspect ratio are deliberately left out: they are
artefacts of how a public data set was prepared (MedMNIST is 28 x 28 and square),
and a real DICOM of the right modality would be flagged for them. This block is
scored like a layer, with one pooled mean (image statistics do not depend on the
class). Which blocks a zoo model uses is chosen by ``benchmarks/ood`` with
leave-one-modality-out selection (never on the modality it is scored on).

Each block's scores are standardised by their mean and standard deviation on the
threshold set (below), and the OOD score is their sum. The two scores fail on
different data (Mahalanobis misses skin photos seen by a chest X-ray model,
nearest neighbours miss grey images seen by the colour dermoscopy model), so the
sum is more robust than either. Only the distance arithmetic is written here: no
maintained library scores images against a stored mean/precision pair.

The threshold is the score above which at most ``val_flag_rate`` of the threshold
set lies (default 1%, half of a 2% budget, leaving room for sampling noise). Two
rules choose the threshold set (``threshold_rule``):

* ``"cross-fit"`` (the default): the training images are split into ``folds``
  (default 10) seeded, class-stratified folds; scorers fitted on all folds but one
  score the held-out fold, so every training image gets an *out-of-fold* score from
  scorers that never saw it, just as a new image is scored by a stored detector
  that never saw it. The stored detector is the fold-0 one (fitted on all folds but
  fold 0, i.e. 90% of the training images), so every score in the threshold set
  and every deployed score comes from scorers fitted on the same number of images:
  over the seeded split their scores are equally distributed, so the threshold set's
  quantile estimates the deployed flag rate. (Scorers fitted on all training images would score new images lower than
  the out-of-fold ones, which come from scorers fitted on fewer: the k-th neighbour
  is nearer in a larger bank and the Mahalanobis estimate is tighter. On Gaussian
  data with 400 training images that rule flagged 0.4% of fresh images at a nominal
  2%, 5 folds, tests/predict/test_ood.py.) The out-of-fold scores are pooled with
  the validation images' scores (by the stored detector); the pool's raw scores
  give the standardisation constants and its quantile the threshold. With a few
  hundred training images and 78-87 validation images (BreastMNIST,
  covid-chestxray) the pool is 5-8 times larger than val alone, whose 1% quantile
  is simply its maximum. The network itself was trained on the training images;
  the card records the flag rate of each part of the pool (out-of-fold training
  images, val), so a difference between them is visible.
* ``"val"``: the scorers are fitted on all training images and standardised and
  thresholded on the validation split alone (the earlier rule).

Storage: ``ood.safetensors`` in the package (class means, precision matrices, the
nearest-neighbour bank of at most ``bank_size`` training images, standardisation
constants); the card's ``ood`` field records method, layers, threshold and the
file's sha256, so a swapped file is refused like swapped weights.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.numpy import load_file, save_file
from sklearn.covariance import LedoitWolf
from sklearn.neighbors import NearestNeighbors

from medsight._version import __version__
from medsight.errors import DataSetError, ImageReadError, ModelCardError, ModelIntegrityError
from medsight.io.datasets import LabeledDataset
from medsight.io.image import MedImage
from medsight.models.networks import Classifier
from medsight.models.package import ModelPackage, load_package, read_card, sha256_of, write_card
from medsight.models.preprocess import batch_to_tensor

OOD_FILE = "ood.safetensors"
METHOD = "feature-statistics"
#: network blocks whose channel statistics every backend returns (medsight.predict.export.STAT_LAYERS)
LAYERS = ("stem", "layer1", "layer2")
#: the image-level block: colour and grey-level statistics of the image itself
IMAGE = "image"
BLOCKS = (*LAYERS, IMAGE)
IMAGE_FEATURES = ("colourfulness", "grey_mean", "grey_std", *(f"grey_hist_{i}" for i in range(8)))
#: an image is subsampled to at most this many pixels per side for its statistics (bounded cost for a 4k radiograph)
IMAGE_STAT_SIDE = 256
SCORERS = ("mahalanobis", "knn")
DEFAULT_VAL_FLAG_RATE = 0.01
#: how the threshold set is built (see the module docstring); the first is the default
THRESHOLD_RULES = ("cross-fit", "val")
DEFAULT_THRESHOLD_RULE = "cross-fit"
DEFAULT_FOLDS = 10
DEFAULT_K = 10
DEFAULT_BANK = 2000


# -- features ---------------------------------------------------------------------------
@torch.no_grad()
def layer_statistics(network: Classifier, x: torch.Tensor, batch_size: int = 128) -> dict[str, np.ndarray]:
    """Per-channel mean and std of the stem, layer1 and layer2 activations: {layer: (N, 2C)}."""
    was_training = network.training
    network.eval()
    n = network.net
    out: dict[str, list[np.ndarray]] = {k: [] for k in LAYERS}
    for i in range(0, len(x), batch_size):
        h = n.maxpool(n.act(n.bn1(n.conv1(x[i : i + batch_size]))))
        for name, block in (("stem", None), ("layer1", n.layer1), ("layer2", n.layer2)):
            if block is not None:
                h = block(h)
            out[name].append(torch.cat([h.mean(dim=(2, 3)), h.std(dim=(2, 3))], dim=1).numpy())
    network.train(was_training)
    width = {k: 2 * c for k, c in zip(LAYERS, _channels(network))}
    return {k: (np.concatenate(v) if v else np.zeros((0, width[k]))).astype(np.float64) for k, v in out.items()}


def _channels(network: Classifier) -> tuple[int, int, int]:
    n = network.net
    return n.conv1.out_channels, n.layer1[-1].conv2.out_channels, n.layer2[-1].conv2.out_channels


def image_statistics(images: Sequence[MedImage]) -> np.ndarray:
    """(N, 11) image-level statistics, in :data:`IMAGE_FEATURES` order, from the images' own pixels.

    Computed on a strided subsample (at most :data:`IMAGE_STAT_SIDE` pixels per side), so
    they do not depend on the image's resolution and stay cheap for large images.
    """
    out = np.zeros((len(images), len(IMAGE_FEATURES)))
    for i, im in enumerate(images):
        px = im.pixels
        step = max(1, int(np.ceil(max(px.shape[:2]) / IMAGE_STAT_SIDE)))
        px = np.clip(px[::step, ::step].astype(np.float64), 0.0, 1.0)
        grey = px.mean(axis=2)
        colour = float((px.max(axis=2) - px.min(axis=2)).mean()) if px.shape[2] == 3 else 0.0
        hist = np.histogram(grey, bins=8, range=(0.0, 1.0))[0] / grey.size
        out[i] = np.r_[colour, grey.mean(), grey.std(), hist]
    return out


def dataset_statistics(package: ModelPackage, ds: LabeledDataset, batch_size: int = 128) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Statistics of every block (:data:`BLOCKS`) of every readable image of ``ds`` and the indices that were readable.

    Images are read batch by batch through the one preprocessing path; unreadable
    images are skipped, not fatal.
    """
    parts: list[dict[str, np.ndarray]] = []
    keep: list[int] = []
    for start in range(0, len(ds), batch_size):
        images, idx = [], []
        for i in range(start, min(start + batch_size, len(ds))):
            try:
                images.append(ds.image(i))
                idx.append(i)
            except ImageReadError:
                continue
        if images:
            stats = layer_statistics(package.network, batch_to_tensor(images, package.card.input))
            stats[IMAGE] = image_statistics(images)
            parts.append(stats)
            keep.extend(idx)
    if not keep:
        raise DataSetError(f"{ds.name}: no readable images")
    return {k: np.concatenate([p[k] for p in parts]) for k in BLOCKS}, np.asarray(keep, dtype=int)


# -- the two scores of one layer ----------------------------------------------------------
def _unit(a: np.ndarray) -> np.ndarray:
    return a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)


@dataclass
class LayerScorer:
    """Mahalanobis (nearest class mean, shared precision) and k-NN cosine distance for one layer."""

    class_means: np.ndarray  # (K, D)
    precision: np.ndarray  # (D, D)
    bank: np.ndarray  # (M, D), unit-normalised training vectors
    k: int
    _nn: NearestNeighbors | None = field(default=None, repr=False)

    @classmethod
    def fit(cls, feats: np.ndarray, y: np.ndarray, k: int, bank_size: int, rng: np.random.Generator) -> "LayerScorer":
        y = np.asarray(y).astype(int)
        classes = np.unique(y)
        means = np.stack([feats[y == c].mean(axis=0) for c in classes])
        centred = feats - means[np.searchsorted(classes, y)]
        precision = LedoitWolf(assume_centered=True).fit(centred).precision_
        idx = np.sort(rng.choice(len(feats), bank_size, replace=False)) if len(feats) > bank_size else np.arange(len(feats))
        return cls(means, precision, _unit(feats[idx]).astype(np.float32), min(k, len(idx)))

    def mahalanobis(self, feats: np.ndarray) -> np.ndarray:
        """Squared Mahalanobis distance to the nearest class mean."""
        d = np.asarray(feats, dtype=np.float64)[:, None, :] - self.class_means[None, :, :]
        return np.einsum("nkd,de,nke->nk", d, self.precision, d).min(axis=1)

    def knn(self, feats: np.ndarray) -> np.ndarray:
        """Euclidean distance between unit vectors (a monotone function of cosine) to the k-th nearest bank vector."""
        if self._nn is None:
            self._nn = NearestNeighbors(n_neighbors=self.k).fit(self.bank)
        return self._nn.kneighbors(_unit(np.asarray(feats, dtype=np.float64)))[0][:, -1]

    def raw(self, feats: np.ndarray) -> np.ndarray:
        """(N, 2): the two raw scores, in SCORERS order."""
        return np.stack([self.mahalanobis(feats), self.knn(feats)], axis=1)


@dataclass
class OODDetector:
    layers: dict[str, LayerScorer]  # one scorer per block, in ``blocks`` order
    z_mean: np.ndarray  # (L, 2) validation mean of each raw score
    z_std: np.ndarray  # (L, 2)
    threshold: float
    blocks: tuple[str, ...] = LAYERS

    @property
    def uses_images(self) -> bool:
        """True when the score also needs the images themselves (the image-level block)."""
        return IMAGE in self.blocks

    def inputs(self, statistics: dict[str, np.ndarray], images: Sequence[MedImage] | None = None) -> dict[str, np.ndarray]:
        """The detector's input: a backend's layer statistics plus, if this detector uses it, the image block."""
        if not self.uses_images:
            return statistics
        if images is None:
            raise ValueError("this OOD detector also scores image-level statistics; pass the images")
        return {**statistics, IMAGE: image_statistics(images)}

    def components(self, stats: dict[str, np.ndarray]) -> np.ndarray:
        """(N, L, 2) standardised scores (what the total is summed from)."""
        missing = [b for b in self.blocks if b not in stats]
        if missing:
            raise ValueError(f"OOD statistics lack block(s) {missing}; build them with OODDetector.inputs(statistics, images)")
        return self.standardise(_raw(self.layers, stats, self.blocks))

    def standardise(self, raw: np.ndarray) -> np.ndarray:
        """(N, L, 2) raw block scores -> standardised components."""
        return (raw - self.z_mean[None]) / self.z_std[None]

    def score_statistics(self, stats: dict[str, np.ndarray]) -> np.ndarray:
        return self.components(stats).sum(axis=(1, 2))

    def score(self, network: Classifier, x: torch.Tensor, images: Sequence[MedImage] | None = None) -> np.ndarray:
        """OOD scores for a preprocessed batch (higher = less like the training data); ``images`` as ``inputs``."""
        return self.score_statistics(self.inputs(layer_statistics(network, x), images))

    def flags(self, scores: np.ndarray | float) -> np.ndarray:
        return np.asarray(scores) > self.threshold

    def statement(self, score: float) -> str:
        return (f"Refer to a human: the image looks unlike the model's training data "
                f"(out-of-distribution score {score:.1f} is above the threshold {self.threshold:.1f}); "
                f"no finding is reported.")


def threshold_for_flag_rate(scores: np.ndarray, rate: float) -> float:
    """Smallest order statistic t with at most ``floor(rate * n)`` scores strictly above t."""
    s = np.sort(np.asarray(scores, dtype=np.float64))
    if s.size == 0:
        raise DataSetError("cannot choose an OOD threshold on an empty set")
    if not 0 <= rate < 1:
        raise ValueError("flag rate must be in [0, 1)")
    k = int(np.floor(rate * s.size))
    return float(s[s.size - 1 - k])


def _check_blocks(blocks: Sequence[str]) -> tuple[str, ...]:
    blocks = tuple(blocks)
    bad = [b for b in blocks if b not in BLOCKS]
    if bad or not blocks or len(set(blocks)) != len(blocks):
        raise ValueError(f"OOD blocks must be distinct names from {BLOCKS}, got {list(blocks)}")
    return tuple(b for b in BLOCKS if b in blocks)  # canonical order


def _fit_scorers(train: dict[str, np.ndarray], y: np.ndarray, blocks: tuple[str, ...], k: int, bank_size: int,
                 rng: np.random.Generator) -> dict[str, LayerScorer]:
    # image statistics do not depend on the class: one pooled mean
    return {name: LayerScorer.fit(train[name], np.zeros_like(y) if name == IMAGE else y, k, bank_size, rng) for name in blocks}


def _raw(layers: dict[str, LayerScorer], stats: dict[str, np.ndarray], blocks: tuple[str, ...]) -> np.ndarray:
    return np.stack([layers[name].raw(stats[name]) for name in blocks], axis=1)


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
        raw[held] = _raw(layers, {name: train[name][held] for name in blocks}, blocks)
        if f == 0:
            first = layers
    return first, fold, raw


def out_of_fold_raw(train: dict[str, np.ndarray], y: np.ndarray, blocks: Sequence[str], folds: int = DEFAULT_FOLDS,
                    k: int = DEFAULT_K, bank_size: int = DEFAULT_BANK, seed: int = 0) -> np.ndarray:
    """(N, L, 2) raw scores of every training image by scorers fitted on the other folds (:func:`fold_assignment`)."""
    return _cross_fit(train, np.asarray(y), _check_blocks(blocks), folds, k, bank_size, seed)[2]


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
    blocks = _check_blocks(blocks)
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
        parts = [_raw(layers, val, blocks)]
    else:
        if isinstance(folds, bool) or not isinstance(folds, (int, np.integer)) or folds < 2:
            raise ValueError(f"a cross-fitted OOD threshold needs at least 2 folds, got {folds!r}")
        if len(y) < 2 * folds:
            raise DataSetError(f"a {folds}-fold cross-fitted OOD threshold needs at least {2 * folds} training images "
                               f"(two per fold), got {len(y)}; use fewer folds or threshold_rule='val'")
        if val is not None and len(val[blocks[0]]) == 0:
            raise DataSetError("the OOD validation set is empty; pass None to threshold on the out-of-fold training scores alone")
        layers, _, oof = _cross_fit(train, y, blocks, folds, k, bank_size, seed)
        parts = [oof] if val is None else [oof, _raw(layers, val, blocks)]
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

    The threshold set (``threshold_rule``, see the module docstring): ``"cross-fit"``
    (default) pools the out-of-fold scores of ``train_ds`` (``folds`` folds) with the
    scores of ``val_ds`` (when given), and the stored detector is fitted on all folds
    but fold 0; ``"val"`` fits on all of ``train_ds`` and uses ``val_ds`` alone, or without
    ``val_ds`` a seeded 20% of the training images held out of the fit (weaker,
    because the network has seen those images).

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
    _atomic_save(_to_arrays(det), ood_path)
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


def _to_arrays(det: OODDetector) -> dict[str, np.ndarray]:
    arrays = {"z_mean": det.z_mean, "z_std": det.z_std}
    for name, ls in det.layers.items():
        # the neighbour bank is stored in float32: it halves the file and cosine distances need no more
        arrays.update({f"{name}.class_means": ls.class_means, f"{name}.precision": ls.precision,
                       f"{name}.bank": ls.bank.astype(np.float32)})
    return arrays


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


def load_ood(package: ModelPackage) -> OODDetector | None:
    """The package's detector, or None when its card has none; a tampered or mismatched file is refused."""
    info = package.card.ood
    if not info:
        return None
    if info.get("method") != METHOD:
        raise ModelCardError(f"{package.card.name}: unsupported OOD method {info.get('method')!r} (supported: {METHOD})")
    try:
        threshold, k = float(info["threshold"]), int(info.get("k", DEFAULT_K))
        name, expected = info.get("file", OOD_FILE), info["sha256"]
        blocks = _check_blocks(info.get("layers", LAYERS))
    except (KeyError, TypeError, ValueError) as e:
        raise ModelCardError(f"{package.card.name}: card.ood is incomplete ({e})") from None
    if package.path is None:
        raise ModelIntegrityError(f"{package.card.name}: card names an OOD file but the package has no directory")
    path = Path(package.path) / name
    if not path.is_file():
        raise ModelIntegrityError(f"{path}: OOD parameters named in the card are missing")
    digest = sha256_of(path)
    if digest != expected:
        raise ModelIntegrityError(f"{path}: sha256 {digest} does not match the card ({expected}); refusing to load")
    a = load_file(str(path))
    try:
        layers = {n: LayerScorer(a[f"{n}.class_means"], a[f"{n}.precision"], a[f"{n}.bank"], min(k, len(a[f"{n}.bank"])))
                  for n in blocks}
        det = OODDetector(layers, a["z_mean"], a["z_std"], threshold, blocks)
    except KeyError as e:
        raise ModelIntegrityError(f"{path}: OOD file lacks {e}") from None
    widths = {**{n: 2 * c for n, c in zip(LAYERS, _channels(package.network))}, IMAGE: len(IMAGE_FEATURES)}
    for n in blocks:
        w = widths[n]
        if layers[n].class_means.shape[1] != w or layers[n].precision.shape != (w, w):
            raise ModelIntegrityError(f"{path}: OOD parameters for {n} do not fit ({w} statistics expected)")
    if det.z_mean.shape != (len(blocks), len(SCORERS)):
        raise ModelIntegrityError(f"{path}: OOD standardisation constants do not fit the card's {len(blocks)} blocks")
    return det
