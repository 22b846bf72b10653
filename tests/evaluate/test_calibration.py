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


# -- methods beyond temperature: reference values from scikit-learn and hand computation ------------
from scipy.special import expit  # noqa: E402
from sklearn.isotonic import IsotonicRegression  # noqa: E402
from sklearn.linear_model import LogisticRegression  # noqa: E402

from medsight.errors import DataSetError  # noqa: E402
from medsight.evaluate.calibration import (  # noqa: E402
    CalibrationMap, adjust_priors, calibrated_probabilities, em_prior_shift, fit_calibration, select_calibration,
)
from medsight.models.card import Calibration  # noqa: E402


def _binary_logits(n=4000, seed=0):
    rng = np.random.default_rng(seed)
    z = rng.normal(0, 2, size=(n, 2))
    p1 = expit(0.6 * z[:, 1] - 1.4 * z[:, 0] + 0.8)  # truth: class-specific scales and a bias
    y = (rng.uniform(size=n) < p1).astype(int)
    return z, y


def test_temperature_bias_equals_unpenalised_logistic_regression_on_the_logit_difference():
    # softmax(z/T + [0, b])[:, 1] = sigmoid((z1 - z0)/T + b): exactly a one-feature logistic regression
    z, y = _binary_logits()
    m = fit_calibration(z, y, "temperature-bias")
    lr = LogisticRegression(C=np.inf, tol=1e-10, max_iter=1000).fit((z[:, 1] - z[:, 0])[:, None], y)
    assert 1 / m.temperature == pytest.approx(lr.coef_[0, 0], rel=1e-3)
    assert m.bias[1] == pytest.approx(lr.intercept_[0], abs=1e-3)
    np.testing.assert_allclose(m.apply(z)[:, 1], lr.predict_proba((z[:, 1] - z[:, 0])[:, None])[:, 1], atol=1e-4)


def test_vector_scaling_equals_logistic_regression_on_both_logits():
    # softmax(a*z + [0, b])[:, 1] = sigmoid(a1 z1 - a0 z0 + b)
    z, y = _binary_logits(seed=1)
    m = fit_calibration(z, y, "vector")
    lr = LogisticRegression(C=np.inf, tol=1e-10, max_iter=1000).fit(z, y)
    np.testing.assert_allclose([-m.scale[0], m.scale[1]], lr.coef_[0], rtol=1e-3)
    assert m.bias[1] == pytest.approx(lr.intercept_[0], abs=1e-3)
    assert m.scale[0] == pytest.approx(1.4, rel=0.15) and m.scale[1] == pytest.approx(0.6, rel=0.15)


def test_isotonic_matches_scikit_learn_one_vs_rest_renormalised():
    rng = np.random.default_rng(2)
    z = rng.normal(size=(300, 3)) * 3
    y = rng.integers(0, 3, 300)
    m = fit_calibration(z, y, "isotonic")
    zt = rng.normal(size=(50, 3)) * 4  # some beyond the fitted range: clipped
    p, pt = np.exp(z) / np.exp(z).sum(1, keepdims=True), np.exp(zt) / np.exp(zt).sum(1, keepdims=True)
    ref = np.stack([IsotonicRegression(y_min=0, y_max=1, out_of_bounds="clip").fit(p[:, c], y == c).predict(pt[:, c])
                    for c in range(3)], axis=1)
    s = ref.sum(1, keepdims=True)
    ref = np.where(s > 0, ref / np.where(s > 0, s, 1), 1 / 3)
    np.testing.assert_allclose(m.apply(zt), ref, atol=1e-12)


def test_card_round_trip_applies_the_same_map():
    z, y = _binary_logits(500, seed=3)
    for method in ("temperature", "temperature-bias", "vector", "isotonic"):
        m = fit_calibration(z, y, method)
        cal = Calibration.model_validate_json(Calibration(**m.params()).model_dump_json())
        np.testing.assert_allclose(calibrated_probabilities(z, cal), m.apply(z), atol=1e-12)


def test_card_refuses_incomplete_or_mismatched_parameters():
    with pytest.raises(ValueError, match="needs isotonic"):
        Calibration(method="isotonic")
    with pytest.raises(ValueError, match="needs scale"):
        Calibration(method="vector", bias=[0.0, 1.0])
    with pytest.raises(ValueError, match="positive"):
        Calibration(method="vector", scale=[1.0, -1.0], bias=[0.0, 0.0])
    with pytest.raises(ValueError, match="prior_shift"):
        Calibration(prior_shift={"source_priors": [0.5, 0.5], "target_priors": [1.0]})


def test_selection_is_the_lowest_cross_validated_ece_and_ignores_nothing_but_val():
    z, y = _binary_logits(1500, seed=4)  # needs a bias: temperature alone cannot fit it
    m, info = select_calibration(z, y)
    assert info["chosen"] == min(info["cv"], key=lambda k: info["cv"][k]["ece"])
    assert info["chosen"] != "temperature" and m.method == info["chosen"]
    assert info["cv"]["temperature"]["ece"] > info["cv"]["temperature-bias"]["ece"]


def test_selection_refuses_a_single_class():
    with pytest.raises(DataSetError, match="two classes"):
        select_calibration(np.zeros((5, 2)), np.zeros(5, int))


def test_adjust_priors_by_hand():
    # p = [0.6, 0.4] calibrated for priors [0.5, 0.5]; new priors [0.2, 0.8]:
    # [0.6*0.4, 0.4*1.6] = [0.24, 0.64] -> [0.24/0.88, 0.64/0.88]
    got = adjust_priors(np.array([[0.6, 0.4]]), np.array([0.5, 0.5]), np.array([0.2, 0.8]))
    np.testing.assert_allclose(got, [[0.24 / 0.88, 0.64 / 0.88]])


def test_em_recovers_planted_label_shift():
    # calibrated posteriors of a 2-Gaussian problem with source priors 0.5/0.5; the target set has 20% class 0
    rng = np.random.default_rng(5)
    n = 20_000
    y = (rng.uniform(size=n) < 0.8).astype(int)
    x = rng.normal(np.where(y == 1, 1.0, -1.0), 1.0)
    p1 = expit(2 * x)  # exact posterior for equal priors (log-likelihood ratio 2x)
    w, iters = em_prior_shift(np.c_[1 - p1, p1], np.array([0.5, 0.5]))
    assert w == pytest.approx([0.2, 0.8], abs=0.01) and iters < 1000
    # no shift: the source priors are a fixed point
    w0, _ = em_prior_shift(np.full((4, 2), 0.5), np.array([0.5, 0.5]))
    np.testing.assert_allclose(w0, [0.5, 0.5])


def test_calibration_map_rejects_bad_logits():
    with pytest.raises(ValueError, match=r"\(N, K\)"):
        CalibrationMap("temperature").apply(np.zeros(3))


def test_model_card_checks_calibration_against_its_labels():
    from pydantic import ValidationError

    from tests.conftest import tiny_card

    card = tiny_card()  # two labels
    data = card.model_dump()
    data["calibration"] = {"method": "vector", "scale": [1.0, 1.0, 1.0], "bias": [0.0, 0.0, 0.0]}
    with pytest.raises(ValidationError, match="for 3 classes, the model has 2"):
        type(card).model_validate(data)
    data["calibration"] = {"method": "temperature-bias", "bias": [0.0, 0.5],
                           "prior_shift": {"source_priors": [0.2, 0.3, 0.5], "target_priors": [0.1, 0.4, 0.5]}}
    with pytest.raises(ValidationError, match="disagree"):
        type(card).model_validate(data)
    data["calibration"] = {"method": "temperature-bias", "bias": [0.0, 0.5]}
    assert type(card).model_validate(data).calibration.bias == [0.0, 0.5]
