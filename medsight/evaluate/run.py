"""``medsight evaluate``: a model on a labelled data set, through the one inference path."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from medsight.errors import DataSetError
from medsight.evaluate.metrics import METRICS, Scorer, bootstrap_metrics
from medsight.io.datasets import ReadFailure, load_dataset
from medsight.models.policy import operating_threshold
from medsight.predict.load import load_model


def evaluate(model: str | Path, data: str | Path, split: str | None = None, n_boot: int = 1000, seed: int = 0) -> dict[str, Any]:
    """Metrics with CIs on the readable images (``n``); unreadable ones are left out and counted (``n_unreadable``)."""
    predictor = load_model(model)
    card = predictor.card
    ds = load_dataset(data, split, label_names=card.labels)
    if len(ds) == 0:
        raise DataSetError(f"{data}: empty data set")
    if ds.label_names != card.labels:
        raise DataSetError(f"{data}: labels {ds.label_names} do not match the model's {card.labels}")
    failures: list[ReadFailure] = []
    probs, rows = predictor.dataset_probs(ds, failures=failures)
    metrics = bootstrap_metrics(Scorer.for_card(card), ds.y[rows], probs, n_boot=n_boot, seed=seed)
    return {
        "model": predictor.model_id, "data": str(data), "split": split, "n": len(rows),
        "n_unreadable": len(failures), "unreadable": [f.as_dict() for f in failures],
        "class_counts": ds.class_counts(), "task": card.task,
        "threshold": operating_threshold(card) if card.task == "binary" else None,
        "averaging": "binary (positive = %s)" % card.positive_label if card.task == "binary" else "macro one-vs-rest",
        "ci_method": f"percentile bootstrap, {n_boot} resamples, 95%", "metric_names": list(METRICS), **metrics,
    }
