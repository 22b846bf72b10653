"""What one inference returns, in a form the CLI, service and DICOM writers all share."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from medsight.io.image import MedImage
from medsight.models import policy


@dataclass
class Prediction:
    """A calibrated prediction for one image.

    ``label`` is the reported finding (or the model's "no finding" class);
    ``confidence`` is the calibrated probability of that decision; ``refer`` is
    True when the policy in the card says a human should decide instead, and
    ``statement`` says why in one sentence.
    """

    source: str | None
    model: str
    label: str
    probabilities: dict[str, float]
    confidence: float
    refer: bool
    statement: str
    heatmap: np.ndarray | None = None
    heatmap_label: str | None = None
    image: MedImage | None = field(default=None, repr=False)
    ood_score: float | None = None
    extras: dict[str, Any] = field(default_factory=dict)

    @property
    def reported_finding(self) -> str | None:
        """The finding this result may state (:func:`medsight.models.policy.reported_finding`): None when it is
        referred or finds nothing, so no writer can headline ``label`` where the policy reports no finding."""
        return policy.reported_finding(self.label, self.refer)

    def to_dict(self, heatmap_path: str | None = None) -> dict[str, Any]:
        return {
            "path": self.source,
            "model": self.model,
            "label": self.label,
            "probabilities": {k: round(v, 6) for k, v in self.probabilities.items()},
            "confidence": round(self.confidence, 6),
            "refer": self.refer,
            "statement": self.statement,
            "heatmap": heatmap_path,
            "heatmap_label": self.heatmap_label,
            "ood_score": self.ood_score,
            **self.extras,
        }


@dataclass
class PredictionError:
    """An input that could not be analysed; batches report it and carry on."""

    source: str | None
    error: str
    kind: str

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.source, "error": self.error, "error_type": self.kind}
