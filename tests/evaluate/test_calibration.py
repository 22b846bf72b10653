import numpy as np
import pytest

from medsight.evaluate.calibration import fit_temperature, probabilities
from medsight.evaluate.thresholds import threshold_for_sensitivity, youden_threshold
from medsight.errors import MetricNotComputableError


def test_temperature_recovers_planted_overconfidence():
    rng = np.random.default_rng(0)
    true_logits = rng.normal(0, 2, size=(20_000, 3))
    p = np.exp(true_logits) / np.exp(true_logits).sum(1, keepdims=True)
    y = np.array([rng.choice(3, p=row) for row in p])
    overconfident = true_logits * 2.5  # a model 2.5x too sharp
    t, before, after = fit_temperature(overconfident, y)
    assert t == pytest.approx(2.5, rel=0.05)
    assert after < before


def test_temperature_never_worsens_nll():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(50, 2))
    y = rng.integers(0, 2, 50)
    t, before, after = fit_temperature(logits, y)
    assert after <= before + 1e-12


def test_probabilities_rows_sum_to_one():
    p = probabilities(np.array([[2.0, 0.0, -1.0]]), temperature=2.0)
    assert p.sum() == pytest.approx(1.0)
    assert p[0, 0] == pytest.approx(np.exp(1) / (np.exp(1) + 1 + np.exp(-0.5)))


def test_youden_threshold_hand_case():
    y = np.array([0, 0, 0, 1, 1, 1])
    p = np.array([0.1, 0.2, 0.6, 0.4, 0.7, 0.9])
    # at t=0.7: sens 2/3, spec 1 -> J=0.667; at t=0.4: sens 1, spec 2/3 -> J=0.667; first max in roc order is 0.7
    assert youden_threshold(y, p) in (pytest.approx(0.7), pytest.approx(0.4))
    assert threshold_for_sensitivity(y, p, 1.0) == pytest.approx(0.4)


def test_youden_needs_both_classes():
    with pytest.raises(MetricNotComputableError):
        youden_threshold(np.ones(3, int), np.array([0.1, 0.5, 0.9]))
