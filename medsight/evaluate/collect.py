"""Run a model over a labelled data set once and keep everything a report needs.

Logits come from :meth:`Predictor.forward` on :func:`batch_to_tensor` input (the one
inference and preprocessing path); OOD scores from :meth:`Predictor.ood_scores` on the
same forward pass.
Raw logits are kept (not only calibrated probabilities) so calibration can be
shown before (T = 1) and after (the card's calibration) without a second pass.
Unreadable images are skipped and listed (:meth:`LabeledDataset.batches`, the one
error policy), so one bad file does not sink a validation of thousands.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from medsight.errors import DataSetError
from medsight.io.datasets import LabeledDataset, ReadFailure
from medsight.models.preprocess import batch_to_tensor
from medsight.predict.predictor import Predictor


@dataclass
class DatasetOutputs:
    index: np.ndarray  # rows of the data set that were readable, aligned with the arrays below
    logits: np.ndarray
    ood_scores: np.ndarray | None
    mean_intensity: np.ndarray
    errors: list[dict[str, str]] = field(default_factory=list)


def collect_outputs(predictor: Predictor, ds: LabeledDataset, batch_size: int = 128) -> DatasetOutputs:
    if len(ds) == 0:
        raise DataSetError(f"{ds.name or 'data set'}: empty data set; nothing to validate")
    logits, ood, intensity, keep = [], [], [], []
    failures: list[ReadFailure] = []
    for batch in ds.batches(batch_size, failures):
        out = predictor.forward(batch_to_tensor(batch.images, predictor.card.input))
        logits.append(out.logits)
        scores = predictor.ood_scores(out, batch.images)  # the Predictor's own scoring of the same forward pass
        if scores is not None:
            ood.append(scores)
        intensity.extend(float(im.pixels.mean()) for im in batch.images)
        keep.append(batch.index)
    return DatasetOutputs(
        index=np.concatenate(keep), logits=np.concatenate(logits),
        ood_scores=np.concatenate(ood) if ood else None, mean_intensity=np.asarray(intensity),
        errors=[f.as_dict() for f in failures],
    )
