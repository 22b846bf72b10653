"""Applying a card's calibration: logits -> calibrated probabilities (the fitting is in
:mod:`medsight.evaluate.calibration`).

This is the one place a card's calibration is applied; the Predictor, reports and
benchmarks all call :func:`calibrated_probabilities`. It sits with the cards because
every consumer of a package needs it and only the offline tools fit it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.special import softmax

from medsight.errors import UnsupportedTaskError


def probabilities(logits: np.ndarray, temperature: float = 1.0, multilabel: bool = False) -> np.ndarray:
    """Temperature-scaled softmax (sigmoid for multi-label)."""
    z = np.asarray(logits, dtype=np.float64) / temperature
    if multilabel:
        from scipy.special import expit

        return expit(z)
    return softmax(z, axis=1)


@dataclass
class CalibrationMap:
    """A fitted calibration map; ``params()`` is what the model card stores."""

    method: str
    temperature: float = 1.0
    scale: np.ndarray | None = None  # vector scaling: (K,)
    bias: np.ndarray | None = None  # temperature-bias and vector: (K,), bias[0] = 0
    isotonic: list[dict[str, list[float]]] | None = None  # per class: knots {"x": [...], "y": [...]}

    def apply(self, logits: np.ndarray) -> np.ndarray:
        z = np.asarray(logits, dtype=np.float64)
        if z.ndim != 2:
            raise ValueError(f"logits must be (N, K), got shape {z.shape}")
        if self.method in ("none", "temperature"):
            return softmax(z / self.temperature, axis=1)
        if self.method == "temperature-bias":
            return softmax(z / self.temperature + self.bias, axis=1)
        if self.method == "vector":
            return softmax(z * self.scale + self.bias, axis=1)
        if self.method == "isotonic":
            p = softmax(z, axis=1)
            # np.interp with clamped ends is exactly IsotonicRegression(out_of_bounds="clip").predict
            out = np.stack([np.interp(p[:, c], k["x"], k["y"]) for c, k in enumerate(self.isotonic)], axis=1)
            s = out.sum(axis=1, keepdims=True)
            # a case every class map sends to 0 carries no information: uniform
            return np.where(s > 0, out / np.where(s > 0, s, 1.0), 1.0 / z.shape[1])
        raise ValueError(f"unknown calibration method {self.method!r}")

    def params(self) -> dict[str, Any]:
        d: dict[str, Any] = {"method": self.method, "temperature": float(self.temperature)}
        if self.scale is not None:
            d["scale"] = [float(v) for v in self.scale]
        if self.bias is not None:
            d["bias"] = [float(v) for v in self.bias]
        if self.isotonic is not None:
            d["isotonic"] = self.isotonic
        return d


def calibration_map(cal: Any) -> CalibrationMap:
    """The map a card's ``calibration`` field describes (:class:`medsight.models.card.Calibration`)."""
    return CalibrationMap(
        cal.method, temperature=cal.temperature,
        scale=None if cal.scale is None else np.asarray(cal.scale, dtype=np.float64),
        bias=None if cal.bias is None else np.asarray(cal.bias, dtype=np.float64),
        isotonic=cal.isotonic,
    )


def calibrated_probabilities(logits: np.ndarray, cal: Any, multilabel: bool = False) -> np.ndarray:
    """Logits -> probabilities as the card's calibration says (method, then the prior adjustment if any).

    This is the one place the card's calibration is applied; the Predictor, reports
    and benchmarks all call it.
    """
    if multilabel:
        if cal.method not in ("none", "temperature"):
            raise UnsupportedTaskError(f"calibration method {cal.method!r} supports single-label models only")
        return probabilities(logits, cal.temperature, multilabel=True)
    p = calibration_map(cal).apply(logits)
    if cal.prior_shift is not None:
        p = adjust_priors(p, np.asarray(cal.prior_shift["source_priors"]), np.asarray(cal.prior_shift["target_priors"]))
    return p


def adjust_priors(probs: np.ndarray, source_priors: np.ndarray, target_priors: np.ndarray) -> np.ndarray:
    """Bayes' rule for new class priors: p'(c|x) is proportional to p(c|x) * target(c) / source(c)."""
    s, t = np.asarray(source_priors, dtype=np.float64), np.asarray(target_priors, dtype=np.float64)
    if s.shape != t.shape or s.shape[0] != probs.shape[1]:
        raise ValueError(f"priors {s.shape}/{t.shape} do not fit {probs.shape[1]} classes")
    if (s <= 0).any() or (t < 0).any():
        raise ValueError("source priors must be positive and target priors non-negative")
    q = probs * (t / s)
    total = q.sum(axis=1, keepdims=True)
    return np.where(total > 0, q / np.where(total > 0, total, 1.0), probs)
