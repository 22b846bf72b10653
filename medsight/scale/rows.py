"""One results row per input, the same for the local and the Ray engine.

Columns are fixed for a model (one ``p_<label>`` column per label) and typed, so
batches made on different workers, including batches where every image failed,
concatenate into one Parquet schema.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from medsight.explain.overlay import save_overlay
from medsight.models.policy import out_of_distribution
from medsight.predict.predictor import Predictor
from medsight.predict.result import Prediction, PredictionError

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def prob_column(label: str) -> str:
    return f"p_{label}"


def columns(labels: Sequence[str]) -> dict[str, str]:
    """Column name -> pandas dtype, in output order."""
    return {
        "index": "int64", "source": "string", "model": "string", "backend": "string", "label": "string",
        **{prob_column(lab): "float64" for lab in labels},
        "confidence": "float64", "refer": "boolean", "ood_score": "float64", "ood_flag": "boolean",
        "statement": "string", "heatmap": "string", "heatmap_label": "string", "error": "string", "error_type": "string",
    }


def heatmap_name(index: int, source: str) -> str:
    """File name for an overlay: the input's index (unique) and a filesystem-safe stem."""
    stem = _UNSAFE.sub("_", Path(source).stem if "[" not in source else source)[:80]
    return f"{index:06d}_{stem}_overlay.png"


def result_row(index: int, result: Prediction | PredictionError, predictor: Predictor, heatmap_dir: Path | None) -> dict[str, Any]:
    labels = predictor.card.labels
    row: dict[str, Any] = {c: None for c in columns(labels)}
    row.update(index=index, model=predictor.model_id, backend=predictor.backend.name, source=result.source)
    if isinstance(result, PredictionError):
        row.update(error=result.error, error_type=result.kind)
        return row
    ood_flag = None
    if result.ood_score is not None and predictor.ood is not None:
        ood_flag = bool(out_of_distribution(predictor.card, result.ood_score))
    heat = None
    if heatmap_dir is not None and result.heatmap is not None and result.image is not None:
        heat = str(save_overlay(result.image, result.heatmap, heatmap_dir / heatmap_name(index, str(result.source))))
    row.update(
        label=result.label, confidence=result.confidence, refer=result.refer, ood_score=result.ood_score, ood_flag=ood_flag,
        statement=result.statement, heatmap=heat, heatmap_label=result.heatmap_label if heat else None,
        **{prob_column(lab): result.probabilities[lab] for lab in labels},
    )
    return row


def rows_frame(rows: list[dict[str, Any]], labels: Sequence[str]) -> pd.DataFrame:
    cols = columns(labels)
    df = pd.DataFrame(rows, columns=list(cols))
    return df.astype(cols)
