"""Out-of-distribution (OOD) scores: does this image look like the model's training data?

A classifier always answers, even for a knee X-ray shown to a skin-lesion model.
The detector here gives every prediction a score and a referral rule, so such an
image says "refer to a human" instead of a finding.

Method: Mahalanobis distance on the penultimate features
(:meth:`medsight.models.networks.Classifier.features`), after Lee et al.,
"A simple unified framework for detecting out-of-distribution samples and
adversarial attacks", NeurIPS 2018: one mean per class and one covariance shared
by all classes, fitted on the training split. The score of an image is the
squared distance to the nearest class mean. The covariance is shrunk with
Ledoit-Wolf (scikit-learn), because 256-dimensional features from a few hundred
training images give a singular sample covariance.

Only the distance itself is written here: no maintained library computes a
class-conditional Mahalanobis score from a fitted mean/precision pair, and it is
three lines of linear algebra.

The threshold is chosen on the *validation* split (images the network never
trained on) so that at most ``val_flag_rate`` of in-distribution images are
flagged. The default, 1 %, is half the 2 % budget a deployment can tolerate,
leaving room for sampling noise on a new in-distribution set.

The fitted parameters live in the model package as ``ood.safetensors``; the
card's ``ood`` field records the method, the threshold and the file's sha256, so
a swapped file is refused like swapped weights.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.numpy import load_file, save_file
from sklearn.covariance import LedoitWolf

from medsight._version import __version__
from medsight.errors import DataSetError, ImageReadError, ModelCardError, ModelIntegrityError
from medsight.io.datasets import LabeledDataset
from medsight.models.networks import Classifier
from medsight.models.package import ModelPackage, load_package, read_card, sha256_of, write_card
from medsight.models.preprocess import batch_to_tensor

OOD_FILE = "ood.safetensors"
METHOD = "mahalanobis"
DEFAULT_VAL_FLAG_RATE = 0.01


@dataclass(frozen=True)
class OODDetector:
    """Class means (K, D), shared precision matrix (D, D) and the referral threshold."""

    class_means: np.ndarray
    precision: np.ndarray
    threshold: float

    def score_features(self, feats: np.ndarray) -> np.ndarray:
        """Squared Mahalanobis distance to the nearest class mean, one value per row."""
        f = np.asarray(feats, dtype=np.float64)
        d = f[:, None, :] - self.class_means[None, :, :]  # (N, K, D)
        dist = np.einsum("nkd,de,nke->nk", d, self.precision, d)
        return dist.min(axis=1)

    def score(self, network: Classifier, x: torch.Tensor, batch_size: int = 256) -> np.ndarray:
        """OOD scores for a preprocessed batch (higher = less like the training data)."""
        return self.score_features(extract_features(network, x, batch_size))

    def flags(self, scores: np.ndarray | float) -> np.ndarray:
        return np.asarray(scores) > self.threshold

    def statement(self, score: float) -> str:
        return (f"Refer to a human: the image looks unlike the model's training data "
                f"(out-of-distribution score {score:.1f} is above the threshold {self.threshold:.1f}); "
                f"no finding is reported.")


@torch.no_grad()
def extract_features(network: Classifier, x: torch.Tensor, batch_size: int = 256) -> np.ndarray:
    was_training = network.training
    network.eval()
    if len(x) == 0:
        out = np.zeros((0, network.net.fc.in_features))
    else:
        out = torch.cat([network.features(x[i : i + batch_size]) for i in range(0, len(x), batch_size)]).numpy()
    network.train(was_training)
    return out.astype(np.float64)


def dataset_features(package: ModelPackage, ds: LabeledDataset, batch_size: int = 128) -> tuple[np.ndarray, np.ndarray]:
    """Penultimate features of every readable image of ``ds`` and the indices that were readable.

    Images are read batch by batch (a data set can be larger than memory) through the
    one preprocessing path; unreadable images are skipped, not fatal.
    """
    feats, keep = [], []
    for start in range(0, len(ds), batch_size):
        images, idx = [], []
        for i in range(start, min(start + batch_size, len(ds))):
            try:
                images.append(ds.image(i))
                idx.append(i)
            except ImageReadError:
                continue
        if images:
            feats.append(extract_features(package.network, batch_to_tensor(images, package.card.input)))
            keep.extend(idx)
    if not keep:
        raise DataSetError(f"{ds.name}: no readable images")
    return np.concatenate(feats), np.asarray(keep, dtype=int)


def fit_mahalanobis(feats: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Class means and the Ledoit-Wolf precision of the class-centred features."""
    y = np.asarray(y).astype(int)
    classes = np.unique(y)
    if len(feats) < 2:
        raise DataSetError("fitting an OOD detector needs at least two training images")
    means = np.stack([feats[y == c].mean(axis=0) for c in classes])
    centred = feats - means[np.searchsorted(classes, y)]
    lw = LedoitWolf(assume_centered=True).fit(centred)
    return means, lw.precision_


def threshold_for_flag_rate(scores: np.ndarray, rate: float) -> float:
    """Smallest order statistic t with at most ``floor(rate * n)`` scores strictly above t."""
    s = np.sort(np.asarray(scores, dtype=np.float64))
    if s.size == 0:
        raise DataSetError("cannot choose an OOD threshold on an empty set")
    if not 0 <= rate < 1:
        raise ValueError("flag rate must be in [0, 1)")
    k = int(np.floor(rate * s.size))
    return float(s[s.size - 1 - k])


def _class_targets(ds: LabeledDataset) -> np.ndarray:
    # Multi-label sets have no single class per image; one pooled mean is used then.
    return np.zeros(len(ds), dtype=int) if ds.multilabel else ds.y


def fit_ood(
    package_dir: str | Path, train_ds: LabeledDataset, val_ds: LabeledDataset | None = None,
    val_flag_rate: float = DEFAULT_VAL_FLAG_RATE, seed: int = 0,
) -> dict[str, Any]:
    """Fit the detector on ``train_ds``, choose its threshold on ``val_ds``, store it in the package.

    Writes ``ood.safetensors`` and the card's ``ood`` field only (weights, calibration
    and metrics are untouched; the card is re-read just before writing so concurrent
    edits of other fields survive). Without ``val_ds`` a seeded 20 % of the training
    images is held out from the fit to choose the threshold; that is weaker, because
    the network has seen those images, so pass a validation split when there is one.
    Returns the new ``card.ood`` dict.
    """
    d = Path(package_dir)
    pkg = load_package(d)
    feats, keep = dataset_features(pkg, train_ds)
    y = _class_targets(train_ds)[keep]
    if val_ds is None:
        rng = np.random.default_rng(seed)
        order = rng.permutation(len(feats))
        n_hold = max(1, len(feats) // 5)
        hold, fit_idx = order[:n_hold], order[n_hold:]
        means, precision = fit_mahalanobis(feats[fit_idx], y[fit_idx])
        val_feats, threshold_set = feats[hold], f"{train_ds.name} (seeded 20% held out of the fit)"
    else:
        means, precision = fit_mahalanobis(feats, y)
        val_feats, _ = dataset_features(pkg, val_ds)
        threshold_set = val_ds.name
    detector = OODDetector(means, precision, 0.0)
    val_scores = detector.score_features(val_feats)
    threshold = threshold_for_flag_rate(val_scores, val_flag_rate)
    ood_path = d / OOD_FILE
    _atomic_save({"class_means": means, "precision": precision}, ood_path)
    info = {
        "method": METHOD,
        "file": OOD_FILE,
        "sha256": sha256_of(ood_path),
        "threshold": threshold,
        "features": "penultimate pooled features (Classifier.features)",
        "covariance": "shared across classes, Ledoit-Wolf shrinkage (scikit-learn)",
        "score": "squared Mahalanobis distance to the nearest class mean",
        "fitted_on": train_ds.name,
        "n_fit": int(len(feats) if val_ds is not None else len(feats) - len(val_feats)),
        "threshold_set": threshold_set,
        "n_threshold_set": int(len(val_feats)),
        "target_flag_rate": val_flag_rate,
        "flag_rate_on_threshold_set": float(np.mean(val_scores > threshold)),
        "fitted": str(date.today()),
        "medsight_version": __version__,
    }
    card = read_card(d)
    card.ood = info
    write_card(card, d)
    return info


def _atomic_save(arrays: dict[str, np.ndarray], path: Path) -> None:
    """Write to a temporary file and rename, so a reader never sees half a file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".ood-", suffix=".safetensors")
    os.close(fd)
    try:
        save_file({k: np.ascontiguousarray(v, dtype=np.float64) for k, v in arrays.items()}, tmp,
                  metadata={"method": METHOD})
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def load_ood(package: ModelPackage) -> OODDetector | None:
    """The package's detector, or None when its card has none; a tampered file is refused."""
    info = package.card.ood
    if not info:
        return None
    if info.get("method") != METHOD:
        raise ModelCardError(f"{package.card.name}: unsupported OOD method {info.get('method')!r} (supported: {METHOD})")
    try:
        threshold = float(info["threshold"])
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
    arrays = load_file(str(path))
    means, precision = arrays["class_means"], arrays["precision"]
    width = package.network.net.fc.in_features
    if means.shape[1] != width or precision.shape != (width, width):
        raise ModelIntegrityError(f"{path}: OOD parameters do not fit the network's {width} features")
    return OODDetector(means, precision, threshold)
