"""Run a model over a labelled data set once and keep everything a report needs.

Logits come from :meth:`Predictor.forward` on :func:`batch_to_tensor` input (the one
inference and preprocessing path); OOD scores from :meth:`Predictor.ood_scores` on the
same forward pass.
Raw logits are kept (not only calibrated probabilities) so calibration can be
shown before (T = 1) and after (the card's calibration) without a second pass.
Unreadable images are skipped and listed, so one bad file does not sink a
validation of thousands.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from medsight.errors import DataSetError, ImageReadError
from medsight.io.datasets import LabeledDataset
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
    logits, ood, intensity, keep, errors = [], [], [], [], []
    for start in range(0, len(ds), batch_size):
        images, idx = [], []
        for i in range(start, min(start + batch_size, len(ds))):
            try:
                images.append(ds.image(i))
                idx.append(i)
            except ImageReadError as e:
                errors.append({"source": str(ds.meta["source"].iloc[i]) if "source" in ds.meta else str(i), "error": str(e)})
        if not images:
            continue
        out = predictor.forward(batch_to_tensor(images, predictor.card.input))
        logits.append(out.logits)
        scores = predictor.ood_scores(out, images)  # the Predictor's own scoring of the same forward pass
        if scores is not None:
            ood.append(scores)
        intensity.extend(float(im.pixels.mean()) for im in images)
        keep.extend(idx)
    if not keep:
        raise DataSetError(f"{ds.name or 'data set'}: none of the {len(ds)} images could be read (first error: {errors[0]['error']})")
    return DatasetOutputs(
        index=np.asarray(keep, dtype=int), logits=np.concatenate(logits),
        ood_scores=np.concatenate(ood) if ood else None, mean_intensity=np.asarray(intensity), errors=errors,
    )
