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

Each of the six scores is standardised by its mean and standard deviation on the
validation split, and the OOD score is their sum. The two scores fail on
different data (Mahalanobis misses skin photos seen by a chest X-ray model,
nearest neighbours miss grey images seen by the colour dermoscopy model), so the
sum is more robust than either. Only the distance arithmetic is written here: no
maintained library scores images against a stored mean/precision pair.

The threshold is chosen on the validation split (images the network never trained
on) so that at most ``val_flag_rate`` of in-distribution images are flagged
(default 1%, half of a 2% budget, leaving room for sampling noise).

Storage: ``ood.safetensors`` in the package (class means, precision matrices, the
nearest-neighbour bank of at most ``bank_size`` training images, standardisation
constants); the card's ``ood`` field records method, layers, threshold and the
file's sha256, so a swapped file is refused like swapped weights.
"""

from __future__ import annotations

import os
import tempfile
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
from medsight.models.networks import Classifier
from medsight.models.package import ModelPackage, load_package, read_card, sha256_of, write_card
from medsight.models.preprocess import batch_to_tensor

OOD_FILE = "ood.safetensors"
METHOD = "feature-statistics"
LAYERS = ("stem", "layer1", "layer2")
SCORERS = ("mahalanobis", "knn")
DEFAULT_VAL_FLAG_RATE = 0.01
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


def dataset_statistics(package: ModelPackage, ds: LabeledDataset, batch_size: int = 128) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Layer statistics of every readable image of ``ds`` and the indices that were readable.

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
            parts.append(layer_statistics(package.network, batch_to_tensor(images, package.card.input)))
            keep.extend(idx)
    if not keep:
        raise DataSetError(f"{ds.name}: no readable images")
    return {k: np.concatenate([p[k] for p in parts]) for k in LAYERS}, np.asarray(keep, dtype=int)


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
    layers: dict[str, LayerScorer]
    z_mean: np.ndarray  # (L, 2) validation mean of each raw score
    z_std: np.ndarray  # (L, 2)
    threshold: float

    def components(self, stats: dict[str, np.ndarray]) -> np.ndarray:
        """(N, L, 2) standardised scores (what the total is summed from)."""
        raw = np.stack([self.layers[name].raw(stats[name]) for name in LAYERS], axis=1)
        return (raw - self.z_mean[None]) / self.z_std[None]

    def score_statistics(self, stats: dict[str, np.ndarray]) -> np.ndarray:
        return self.components(stats).sum(axis=(1, 2))

    def score(self, network: Classifier, x: torch.Tensor) -> np.ndarray:
        """OOD scores for a preprocessed batch (higher = less like the training data)."""
        return self.score_statistics(layer_statistics(network, x))

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


def fit_detector(
    train: dict[str, np.ndarray], y: np.ndarray, val: dict[str, np.ndarray], val_flag_rate: float = DEFAULT_VAL_FLAG_RATE,
    k: int = DEFAULT_K, bank_size: int = DEFAULT_BANK, seed: int = 0,
) -> tuple[OODDetector, np.ndarray]:
    """Fit on training statistics, standardise and threshold on validation statistics; returns (detector, val scores)."""
    if len(y) < 2:
        raise DataSetError("fitting an OOD detector needs at least two training images")
    if len(val[LAYERS[0]]) < 2:
        raise DataSetError("choosing an OOD threshold needs at least two validation images")
    rng = np.random.default_rng(seed)
    layers = {name: LayerScorer.fit(train[name], y, k, bank_size, rng) for name in LAYERS}
    raw = np.stack([layers[name].raw(val[name]) for name in LAYERS], axis=1)
    std = raw.std(axis=0)
    det = OODDetector(layers, raw.mean(axis=0), np.where(std > 0, std, 1.0), threshold=0.0)
    val_scores = det.score_statistics(val)
    det.threshold = threshold_for_flag_rate(val_scores, val_flag_rate)
    return det, val_scores


# -- packages -------------------------------------------------------------------------------
def _class_targets(ds: LabeledDataset) -> np.ndarray:
    # Multi-label sets have no single class per image; one pooled mean is used then.
    return np.zeros(len(ds), dtype=int) if ds.multilabel else ds.y


def fit_ood(
    package_dir: str | Path, train_ds: LabeledDataset, val_ds: LabeledDataset | None = None,
    val_flag_rate: float = DEFAULT_VAL_FLAG_RATE, k: int = DEFAULT_K, bank_size: int = DEFAULT_BANK, seed: int = 0,
) -> dict[str, Any]:
    """Fit the detector on ``train_ds``, standardise/threshold on ``val_ds``, store it in the package.

    Writes ``ood.safetensors`` and the card's ``ood`` field only (weights, calibration
    and metrics are untouched; the card is re-read just before writing so concurrent
    edits of other fields survive). Without ``val_ds`` a seeded 20% of the training
    images is held out of the fit for the standardisation and threshold; that is
    weaker, because the network has seen those images, so pass a validation split
    when there is one. Returns the new ``card.ood`` dict.
    """
    d = Path(package_dir)
    pkg = load_package(d)
    stats, keep = dataset_statistics(pkg, train_ds)
    y = _class_targets(train_ds)[keep]
    if val_ds is None:
        order = np.random.default_rng(seed).permutation(len(y))
        n_hold = max(2, len(y) // 5)
        hold, fit_idx = order[:n_hold], order[n_hold:]
        train_stats, val_stats = {kk: v[fit_idx] for kk, v in stats.items()}, {kk: v[hold] for kk, v in stats.items()}
        y, threshold_set = y[fit_idx], f"{train_ds.name} (seeded 20% held out of the fit)"
    else:
        train_stats, (val_stats, _) = stats, dataset_statistics(pkg, val_ds)
        threshold_set = val_ds.name
    det, val_scores = fit_detector(train_stats, y, val_stats, val_flag_rate, k, bank_size, seed)
    ood_path = d / OOD_FILE
    _atomic_save(_to_arrays(det), ood_path)
    info = {
        "method": METHOD,
        "file": OOD_FILE,
        "sha256": sha256_of(ood_path),
        "threshold": det.threshold,
        "layers": list(LAYERS),
        "features": "per-channel mean and std of the stem, layer1 and layer2 activations",
        "scores": "per layer: squared Mahalanobis distance to the nearest class mean (shared Ledoit-Wolf covariance) "
                  f"and cosine distance to the {k}-th nearest training image; each standardised on the threshold set; summed",
        "k": k,
        "bank_size": int(len(det.layers[LAYERS[0]].bank)),
        "fitted_on": train_ds.name,
        "n_fit": int(len(y)),
        "threshold_set": threshold_set,
        "n_threshold_set": int(len(val_scores)),
        "target_flag_rate": val_flag_rate,
        "flag_rate_on_threshold_set": float(np.mean(val_scores > det.threshold)),
        "fitted": str(date.today()),
        "medsight_version": __version__,
    }
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
                  for n in LAYERS}
        det = OODDetector(layers, a["z_mean"], a["z_std"], threshold)
    except KeyError as e:
        raise ModelIntegrityError(f"{path}: OOD file lacks {e}") from None
    for n, c in zip(LAYERS, _channels(package.network)):
        if layers[n].class_means.shape[1] != 2 * c or layers[n].precision.shape != (2 * c, 2 * c):
            raise ModelIntegrityError(f"{path}: OOD parameters for {n} do not fit the network ({2 * c} statistics)")
    return det
