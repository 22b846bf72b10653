"""Out-of-distribution (OOD) scoring: does this image look like the model's training data?

What a Predictor needs per request: the detector stored in a package (:func:`load_ood`),
the blocks' statistics (the network's, from
:meth:`~medsight.models.networks.Classifier.forward_intermediates`, and the image's own)
and their scores. Fitting and storing a detector is :mod:`medsight.evaluate.ood_fit`;
the method (what is measured, the two scores, the threshold rules) is docs/ood.md.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import load_file

from medsight.errors import ModelCardError, ModelIntegrityError
from medsight.io.image import MedImage
from medsight.models.networks import STAT_LAYERS, Classifier
from medsight.models.package import ModelPackage, sha256_of

OOD_FILE = "ood.safetensors"
METHOD = "feature-statistics"
#: network blocks whose channel statistics every backend returns (defined by the network)
LAYERS = STAT_LAYERS
#: the image-level block: colour and grey-level statistics of the image itself
IMAGE = "image"
BLOCKS = (*LAYERS, IMAGE)
IMAGE_FEATURES = ("colourfulness", "grey_mean", "grey_std", *(f"grey_hist_{i}" for i in range(8)))
#: an image is subsampled to at most this many pixels per side for its statistics (bounded cost for a 4k radiograph)
IMAGE_STAT_SIDE = 256
SCORERS = ("mahalanobis", "knn")
DEFAULT_K = 10


# -- features ---------------------------------------------------------------------------
@torch.no_grad()
def layer_statistics(network: Classifier, x: torch.Tensor, batch_size: int = 128) -> dict[str, np.ndarray]:
    """{layer: (N, 2C)} per-channel mean and std of the :data:`LAYERS` activations, in float64."""
    was_training = network.training
    network.eval()
    out: dict[str, list[np.ndarray]] = {k: [] for k in LAYERS}
    for i in range(0, len(x), batch_size):
        for k, v in network.forward_intermediates(x[i : i + batch_size]).statistics.items():
            out[k].append(v.numpy())
    network.train(was_training)
    width = network.statistic_widths()
    return {k: (np.concatenate(v) if v else np.zeros((0, width[k]))).astype(np.float64) for k, v in out.items()}


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


# -- the two scores of one block ----------------------------------------------------------
def unit_rows(a: np.ndarray) -> np.ndarray:
    """Rows scaled to unit Euclidean length (cosine distances become Euclidean ones)."""
    return a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)


@dataclass
class LayerScorer:
    """Mahalanobis (nearest class mean, shared precision) and k-NN cosine distance for one block."""

    class_means: np.ndarray  # (K, D)
    precision: np.ndarray  # (D, D)
    bank: np.ndarray  # (M, D), unit-normalised training vectors
    k: int
    _bank64: tuple[np.ndarray, np.ndarray] | None = field(default=None, repr=False)  # (bank, its squared norms) in float64

    def mahalanobis(self, feats: np.ndarray) -> np.ndarray:
        """Squared Mahalanobis distance to the nearest class mean."""
        d = np.asarray(feats, dtype=np.float64)[:, None, :] - self.class_means[None, :, :]
        return np.einsum("nkd,de,nke->nk", d, self.precision, d).min(axis=1)

    def knn(self, feats: np.ndarray) -> np.ndarray:
        """Euclidean distance between unit vectors (a monotone function of cosine) to the k-th nearest bank vector.

        The arithmetic of scikit-learn's brute-force ``NearestNeighbors(n_neighbors=k).kneighbors``
        (float64 ``|x|^2 - 2 x.b + |b|^2`` clipped at 0, square root of the k-th smallest), equal to
        it to the bit (tests/predict/test_ood_knn.py), without its per-call validation and float64
        copy of the whole bank, which cost more than the distances for a batch of a few images.
        """
        if self._bank64 is None:
            bank = np.asarray(self.bank, dtype=np.float64)
            self._bank64 = bank, np.einsum("ij,ij->i", bank, bank)[None, :]
        bank, bank_sq = self._bank64
        x = unit_rows(np.asarray(feats, dtype=np.float64))
        d2 = -2 * (x @ bank.T)
        d2 += np.einsum("ij,ij->i", x, x)[:, None]
        d2 += bank_sq
        np.maximum(d2, 0, out=d2)
        return np.sqrt(np.partition(d2, self.k - 1, axis=1)[:, self.k - 1])

    def raw(self, feats: np.ndarray) -> np.ndarray:
        """(N, 2): the two raw scores, in SCORERS order."""
        return np.stack([self.mahalanobis(feats), self.knn(feats)], axis=1)


def raw_scores(layers: dict[str, LayerScorer], stats: dict[str, np.ndarray], blocks: Sequence[str]) -> np.ndarray:
    """(N, L, 2): every block's two raw scores, blocks in ``blocks`` order."""
    return np.stack([layers[name].raw(stats[name]) for name in blocks], axis=1)


def check_blocks(blocks: Sequence[str]) -> tuple[str, ...]:
    """``blocks`` in canonical (:data:`BLOCKS`) order; an error for unknown, repeated or no names."""
    blocks = tuple(blocks)
    bad = [b for b in blocks if b not in BLOCKS]
    if bad or not blocks or len(set(blocks)) != len(blocks):
        raise ValueError(f"OOD blocks must be distinct names from {BLOCKS}, got {list(blocks)}")
    return tuple(b for b in BLOCKS if b in blocks)


@dataclass
class OODDetector:
    layers: dict[str, LayerScorer]  # one scorer per block, in ``blocks`` order
    z_mean: np.ndarray  # (L, 2) threshold-set mean of each raw score
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
        return self.standardise(raw_scores(self.layers, stats, self.blocks))

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

    def arrays(self) -> dict[str, np.ndarray]:
        """The detector's parameters as ``ood.safetensors`` stores them (:func:`load_ood` reads them back)."""
        arrays = {"z_mean": self.z_mean, "z_std": self.z_std}
        for name, ls in self.layers.items():
            # the neighbour bank is stored in float32: it halves the file and cosine distances need no more
            arrays.update({f"{name}.class_means": ls.class_means, f"{name}.precision": ls.precision,
                           f"{name}.bank": ls.bank.astype(np.float32)})
        return arrays


# -- packages -------------------------------------------------------------------------------
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
        blocks = check_blocks(info.get("layers", LAYERS))
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
    widths = {**package.network.statistic_widths(), IMAGE: len(IMAGE_FEATURES)}
    for n in blocks:
        w = widths[n]
        if layers[n].class_means.shape[1] != w or layers[n].precision.shape != (w, w):
            raise ModelIntegrityError(f"{path}: OOD parameters for {n} do not fit ({w} statistics expected)")
    if det.z_mean.shape != (len(blocks), len(SCORERS)):
        raise ModelIntegrityError(f"{path}: OOD standardisation constants do not fit the card's {len(blocks)} blocks")
    return det
