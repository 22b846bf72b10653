"""``medsight evaluate``: a model on a labelled data set, through the one inference path."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from medsight.errors import DataSetError
from medsight.evaluate.metrics import METRICS, Scorer, bootstrap_metrics
from medsight.io.datasets import load_dataset
from medsight.models.registry import load
from medsight.predict.predictor import Predictor


def evaluate(model: str | Path, data: str | Path, split: str | None = None, n_boot: int = 1000, seed: int = 0) -> dict[str, Any]:
    pkg = load(model)
    card = pkg.card
    ds = load_dataset(data, split, label_names=card.labels)
    if len(ds) == 0:
        raise DataSetError(f"{data}: empty data set")
    if ds.label_names != card.labels:
        raise DataSetError(f"{data}: labels {ds.label_names} do not match the model's {card.labels}")
    probs = Predictor(pkg).predict_dataset_probs(ds)
    threshold = card.thresholds.get(card.positive_label or "", 0.5)
    scorer = Scorer(card.task, card.positive_index if card.task == "binary" else 1, threshold)
    metrics = bootstrap_metrics(scorer, ds.y, probs, n_boot=n_boot, seed=seed)
    return {
        "model": f"{card.name}@{card.version}", "data": str(data), "split": split, "n": len(ds),
        "class_counts": ds.class_counts(), "task": card.task, "threshold": threshold if card.task == "binary" else None,
        "averaging": "binary (positive = %s)" % card.positive_label if card.task == "binary" else "macro one-vs-rest",
        "ci_method": f"percentile bootstrap, {n_boot} resamples, 95%", "metric_names": list(METRICS), **metrics,
    }
