"""The most confident mistakes, with their heat maps: where a reviewer should look first.

"Positive" means the model's findings of interest
(:func:`medsight.models.policy.classes_of_interest`): the positive label of a binary
model, or the card's critical findings of a multi-class model (all classes when it
names none).

* false positive: the model reports a finding of interest the reference does not
  have; ranked by the calibrated probability of the reported finding.
* false negative: the reference has a finding of interest and the model reports
  something else; ranked by how confident that wrong answer was.

Heat maps come from :meth:`Predictor.predict` (Grad-CAM for the class the model
decided on), overlays from :func:`medsight.explain.overlay.overlay_rgb`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from medsight.evaluate.figures import png_base64
from medsight.explain.overlay import overlay_rgb
from medsight.io.datasets import LabeledDataset
from medsight.models.card import ModelCard
from medsight.models.policy import classes_of_interest, decided_classes
from medsight.predict.predictor import Predictor

THUMB = 176  # longest side of a gallery thumbnail in pixels: the size it is shown at (keeps the HTML small)


def select_errors(card: ModelCard, y: np.ndarray, probs: np.ndarray, k: int) -> dict[str, list[int]]:
    """Row indices of the ``k`` most confident false positives and false negatives."""
    pred = decided_classes(card, probs)
    pos = np.isin(np.arange(card.num_outputs), classes_of_interest(card))
    conf_pred = probs[np.arange(len(pred)), pred]
    fp = np.where(pos[pred] & (pred != y))[0]
    fn = np.where(pos[y] & (pred != y))[0]
    if card.task == "binary":
        p = probs[:, card.positive_index]
        fp_order, fn_order = fp[np.argsort(-p[fp], kind="stable")], fn[np.argsort(p[fn], kind="stable")]
    else:
        fp_order, fn_order = fp[np.argsort(-conf_pred[fp], kind="stable")], fn[np.argsort(-conf_pred[fn], kind="stable")]
    return {"false_positives": fp_order[:k].tolist(), "false_negatives": fn_order[:k].tolist()}


def _thumb(pixels: np.ndarray) -> np.ndarray:
    """Downsize to at most THUMB pixels on the longest side (grey (H, W, 1) becomes (H, W))."""
    from PIL import Image

    arr = pixels[..., 0] if pixels.ndim == 3 and pixels.shape[-1] == 1 else pixels
    h, w = arr.shape[:2]
    if max(h, w) <= THUMB:
        return arr
    scale = THUMB / max(h, w)
    return np.asarray(Image.fromarray(arr).resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.LANCZOS))


def gallery_items(
    predictor: Predictor, ds: LabeledDataset, rows: list[int], index: np.ndarray, y: np.ndarray, probs: np.ndarray
) -> list[dict[str, Any]]:
    """One entry per selected case: numbers for the JSON, ``_image``/``_overlay`` base64 PNGs for the HTML.

    ``rows`` index the analysed arrays ``y``/``probs``; ``index`` maps them to data set rows.
    """
    labels = predictor.card.labels
    items = []
    for r in rows:
        dataset_row = int(index[r])
        image = ds.image(dataset_row)
        pred = predictor.predict(image, explain=True)
        base = image.to_uint8()  # grey stays one channel: a third of the bytes
        items.append({
            "row": dataset_row,
            "source": Path(str(ds.meta["source"].iloc[dataset_row])).name,
            "reference": labels[int(y[r])],
            "model_says": pred.label,
            "probabilities": {k: round(v, 4) for k, v in pred.probabilities.items()},
            "probability_of_reference": round(float(probs[r, int(y[r])]), 4),
            "heatmap_for": pred.heatmap_label,
            "ood_score": pred.ood_score,
            "statement": pred.statement,
            "_image": png_base64(_thumb(base)),
            "_overlay": png_base64(_thumb(overlay_rgb(image, pred.heatmap))),
            "_small": max(image.height, image.width) < 96,
        })
    return items
