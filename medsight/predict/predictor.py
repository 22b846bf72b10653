"""The one inference path: image(s) + model package -> calibrated predictions.

Everything that classifies an image (library, CLI, service, DICOM gateway,
evaluation) goes through :class:`Predictor`, so preprocessing, calibration and the
card's policy (:mod:`medsight.models.policy`: decision rule, referral) are applied
identically everywhere. Get one from :func:`medsight.predict.load.load_model`, the one
place that chooses its backend.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

import numpy as np
import torch

from medsight.io.datasets import LabeledDataset, ReadFailure
from medsight.io.image import MedImage
from medsight.models import policy
from medsight.models.calibration import calibrated_probabilities
from medsight.models.package import ModelPackage
from medsight.models.preprocess import batch_to_tensor
from medsight.predict.backends import ForwardOutput, InferenceBackend
from medsight.predict.cam import class_activation_maps, resize_map
from medsight.predict.ood import load_ood
from medsight.predict.result import Prediction, PredictionError
from medsight.predict.settings import RuntimeSettings
from medsight.predict.stream import ImageLike, Prepared, as_image, decoded_batches


class Predictor:
    """A loaded model on one backend. ``settings`` gives :meth:`stream` its default decode threads."""

    def __init__(self, package: ModelPackage, backend: InferenceBackend, settings: RuntimeSettings | None = None):
        self.package = package
        self.card = package.card
        self.network = package.network.eval()
        # The one step that differs per backend: tensor -> logits + last feature map (medsight.predict).
        self.backend = backend
        self.settings = settings or RuntimeSettings()
        self._multilabel = self.card.task == "multilabel"
        self.ood = load_ood(package)  # None when the card has no OOD detector

    @property
    def model_id(self) -> str:
        return f"{self.card.name}@{self.card.version}"

    # -- probabilities -------------------------------------------------------
    def forward(self, x: torch.Tensor, batch_size: int = 256) -> ForwardOutput:
        """Logits and last feature maps of a preprocessed batch, through the chosen backend."""
        if not len(x):
            return ForwardOutput(np.zeros((0, self.card.num_outputs), np.float32), np.zeros((0, 0, 0, 0), np.float32))
        return ForwardOutput.concat([self.backend.forward(x[i : i + batch_size]) for i in range(0, len(x), batch_size)])

    def logits(self, x: torch.Tensor, batch_size: int = 256) -> np.ndarray:
        return self.forward(x, batch_size).logits

    def probs(self, images: Sequence[MedImage]) -> np.ndarray:
        x = batch_to_tensor(images, self.card.input)
        return self.calibrate(self.logits(x))

    def calibrate(self, logits: np.ndarray) -> np.ndarray:
        """Calibrated probabilities from logits, as the card's calibration says (any method)."""
        return calibrated_probabilities(logits, self.card.calibration, self._multilabel)

    def ood_scores(self, out: ForwardOutput, images: Sequence[MedImage]) -> np.ndarray | None:
        """OOD scores of a batch from the backend's layer statistics (and the images, when the
        detector also scores image-level statistics); None without a detector."""
        if self.ood is None:
            return None
        with self.settings.blas_limit():  # small matrix products: see medsight.predict.settings
            return self.ood.score_statistics(self.ood.inputs(out.statistics, images))

    def dataset_probs(self, ds: LabeledDataset, batch_size: int = 256,
                      failures: list[ReadFailure] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Calibrated probabilities of the readable images of a labelled set, and their rows (``ds.y[rows]``
        are their labels); unreadable images are skipped into ``failures`` (:meth:`LabeledDataset.batches`)."""
        parts = [(b.index, self.probs(b.images)) for b in ds.batches(batch_size, failures)]
        return np.concatenate([p for _, p in parts]), np.concatenate([i for i, _ in parts])

    # -- public API ----------------------------------------------------------
    def predict(self, x: ImageLike, explain: bool = True) -> Prediction:
        """One image; an unreadable one raises (its :class:`~medsight.errors.MedSightError`)."""
        return self._batch([as_image(x)], explain)[0]

    def stream(self, items: Iterable[ImageLike], explain: bool = True, batch_size: int = 16,
               workers: int | None = None) -> Iterator[Prediction | PredictionError]:
        """Predictions for ``items`` in input order; an unreadable input becomes a :class:`PredictionError`
        in its place and the rest go on.

        ``workers`` threads decode and preprocess ``batch_size`` items at a time ahead of the model
        (:mod:`medsight.predict.stream`; default: ``settings.decode_workers``, 0 = in the caller). A
        sequence is read by index, so a lazy one is read by the decode threads.
        """
        seq = items if isinstance(items, Sequence) else list(items)
        workers = self.settings.decode_workers if workers is None else workers
        for batch in decoded_batches(seq, batch_size, workers, spec=self.card.input):
            ready = [d for d in batch if isinstance(d, Prepared)]
            made = iter(self._batch([d.image for d in ready], explain, torch.stack([d.tensor for d in ready])) if ready else [])
            yield from (next(made) if isinstance(d, Prepared) else d for d in batch)

    def _batch(self, images: list[MedImage], explain: bool, tensors: torch.Tensor | None = None) -> list[Prediction]:
        """The batch step: decoded images (and their ``batch_to_tensor`` input when already made) -> predictions."""
        x = tensors if tensors is not None else batch_to_tensor(images, self.card.input)
        out = self.forward(x)
        p = self.calibrate(out.logits)
        decisions = [policy.decide(self.card, row) for row in p]
        # CAM from the feature map equals Grad-CAM for this GAP + linear head (medsight.predict.cam).
        maps = (class_activation_maps(out.feature_maps, self.network.class_weights(),
                                      [d.heatmap_class for d in decisions], self.card.input.size) if explain else [None] * len(images))
        # OOD scores from the early layers' statistics, which the backend returns with the logits
        scores = self.ood_scores(out, images)
        ood = scores if scores is not None else [None] * len(images)
        return [self._prediction(img, row, dec, m, o) for img, row, dec, m, o in zip(images, p, decisions, maps, ood)]

    def _prediction(self, image: MedImage, p: np.ndarray, decision: policy.Decision, cam: np.ndarray | None,
                    ood_score: float | None = None) -> Prediction:
        score = None if ood_score is None else float(ood_score)
        refer, text = policy.referral(self.card, decision.label, decision.confidence, score)
        heat = resize_map(cam, image.height, image.width) if cam is not None else None
        return Prediction(
            source=image.source, model=self.model_id, label=decision.label,
            probabilities={n: float(v) for n, v in zip(self.card.labels, p)},
            confidence=decision.confidence, refer=refer, statement=text, heatmap=heat,
            heatmap_label=self.card.labels[decision.heatmap_class] if cam is not None else None, image=image,
            ood_score=score,
        )
