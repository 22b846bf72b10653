"""The one inference path: image(s) + model package -> calibrated predictions.

Everything that classifies an image (library, CLI, service, DICOM gateway,
evaluation) goes through :class:`Predictor`, so preprocessing, calibration,
thresholds and the referral policy are applied identically everywhere.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

from medsight.errors import MedSightError
from medsight.io.datasets import LabeledDataset
from medsight.io.image import MedImage
from medsight.models.calibration import calibrated_probabilities
from medsight.models.package import ModelPackage
from medsight.models.preprocess import batch_to_tensor
from medsight.predict.backends import ForwardOutput, InferenceBackend, TorchBackend
from medsight.predict.cam import class_activation_maps, resize_map
from medsight.predict.ood import load_ood
from medsight.predict.result import Prediction, PredictionError

ImageLike = str | Path | MedImage | np.ndarray


def as_image(x: ImageLike) -> MedImage:
    if isinstance(x, MedImage):
        return x
    if isinstance(x, np.ndarray):
        return MedImage.from_array(x, source="<array>", format="array")
    from medsight.io.readers import read_image

    return read_image(x)


class Predictor:
    def __init__(self, package: ModelPackage, backend: InferenceBackend | None = None):
        self.package = package
        self.card = package.card
        self.network = package.network.eval()
        # The one step that differs per backend: tensor -> logits + last feature map (medsight.predict).
        self.backend = backend if backend is not None else TorchBackend(self.network)
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
        return self.ood.score_statistics(self.ood.inputs(out.statistics, images))

    def predict_dataset_probs(self, ds: LabeledDataset, batch_size: int = 256) -> np.ndarray:
        """Calibrated probabilities for every image of a labelled set (errors propagate)."""
        out = []
        for i in range(0, len(ds), batch_size):
            out.append(self.probs([ds.image(j) for j in range(i, min(i + batch_size, len(ds)))]))
        return np.concatenate(out) if out else np.zeros((0, self.card.num_outputs))

    # -- decisions -----------------------------------------------------------
    def decide(self, p: np.ndarray) -> tuple[str, float, int]:
        """(reported label, calibrated probability of that decision, class index for the heat map)."""
        card = self.card
        if card.task == "binary":
            pos = card.positive_index
            th = card.thresholds.get(card.positive_label, 0.5)  # type: ignore[arg-type]
            if p[pos] >= th:
                return card.labels[pos], float(p[pos]), pos
            return card.labels[1 - pos], float(1 - p[pos]), pos
        if card.task == "multilabel":
            k = int(np.argmax(p))
            th = card.thresholds.get(card.labels[k], 0.5)
            if p[k] >= th:
                return card.labels[k], float(p[k]), k
            return "no finding", float(np.prod(1 - p)), k
        k = int(np.argmax(p))
        return card.labels[k], float(p[k]), k

    def statement(self, label: str, confidence: float) -> tuple[bool, str]:
        floor = self.card.confidence.refer_below
        if confidence < floor:
            return True, (f"Refer to a human: the model is uncertain (calibrated probability {confidence:.2f} "
                          f"for '{label}' is below the {floor:.2f} referral floor).")
        return False, f"Model finding: '{label}' with calibrated probability {confidence:.2f}; confirm clinically."

    # -- public API ----------------------------------------------------------
    def predict(self, x: ImageLike, explain: bool = True) -> Prediction:
        return self.predict_batch([x], explain=explain)[0]  # type: ignore[return-value]

    def predict_batch(self, items: Sequence[ImageLike], explain: bool = True, raise_errors: bool = True,
                      tensors: torch.Tensor | None = None) -> list[Prediction | PredictionError]:
        """``tensors``: the items' ``batch_to_tensor`` output when a caller already made it (decoded
        images only, e.g. in a decode thread: medsight.predict.stream); otherwise it is made here."""
        images: list[MedImage] = []
        slots: list[Prediction | PredictionError | None] = []
        for it in items:
            try:
                images.append(as_image(it))
                slots.append(None)
            except MedSightError as e:
                if raise_errors:
                    raise
                slots.append(PredictionError(str(it), str(e), type(e).__name__))
        if images:
            x = tensors if tensors is not None else batch_to_tensor(images, self.card.input)
            out = self.forward(x)
            p = self.calibrate(out.logits)
            decisions = [self.decide(row) for row in p]
            # CAM from the feature map equals Grad-CAM for this GAP + linear head (medsight.predict.cam).
            maps = (class_activation_maps(out.feature_maps, self.network.class_weights(),
                                          [d[2] for d in decisions], self.card.input.size) if explain else [None] * len(images))
            # OOD scores from the early layers' statistics, which the backend returns with the logits
            scores = self.ood_scores(out, images)
            ood = scores if scores is not None else [None] * len(images)
            made = iter(
                self._prediction(img, row, dec, m, o) for img, row, dec, m, o in zip(images, p, decisions, maps, ood)
            )
            slots = [next(made) if s is None else s for s in slots]
        return slots  # type: ignore[return-value]

    def predict_many(self, items: Iterable[ImageLike], explain: bool = True, batch_size: int = 16) -> Iterator[Prediction | PredictionError]:
        """Stream predictions; unreadable inputs become :class:`PredictionError` and the batch goes on."""
        buf: list[ImageLike] = []
        for it in items:
            buf.append(it)
            if len(buf) == batch_size:
                yield from self.predict_batch(buf, explain, raise_errors=False)
                buf = []
        if buf:
            yield from self.predict_batch(buf, explain, raise_errors=False)

    def _prediction(self, image: MedImage, p: np.ndarray, decision: tuple[str, float, int], cam: np.ndarray | None,
                    ood_score: float | None = None) -> Prediction:
        label, conf, k = decision
        refer, text = self.statement(label, conf)
        if ood_score is not None and self.ood is not None and bool(self.ood.flags(ood_score)):
            refer, text = True, self.ood.statement(float(ood_score))
        heat = resize_map(cam, image.height, image.width) if cam is not None else None
        return Prediction(
            source=image.source, model=self.model_id, label=label,
            probabilities={n: float(v) for n, v in zip(self.card.labels, p)},
            confidence=conf, refer=refer, statement=text, heatmap=heat,
            heatmap_label=self.card.labels[k] if cam is not None else None, image=image,
            ood_score=None if ood_score is None else float(ood_score),
        )
