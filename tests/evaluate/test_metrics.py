import numpy as np
import pytest
from sklearn.metrics import (
    accuracy_score, brier_score_loss, f1_score, precision_score, recall_score, roc_auc_score,
)

from medsight.errors import DataSetError
from medsight.evaluate.metrics import (
    Scorer, binary_metrics, bootstrap_metrics, expected_calibration_error, multiclass_metrics,
)


@pytest.fixture
def binary_case():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 300)
    p = np.clip(0.35 * y + rng.uniform(0, 0.65, 300), 0, 1)
    return y, p


def test_binary_metrics_match_sklearn(binary_case):
    y, p = binary_case
    m = binary_metrics(y, p, threshold=0.5)
    pred = (p >= 0.5).astype(int)
    assert m["auc"] == pytest.approx(roc_auc_score(y, p))
    assert m["accuracy"] == pytest.approx(accuracy_score(y, pred))
    assert m["sensitivity"] == pytest.approx(recall_score(y, pred))
    assert m["specificity"] == pytest.approx(recall_score(1 - y, 1 - pred))
    assert m["ppv"] == pytest.approx(precision_score(y, pred))
    assert m["npv"] == pytest.approx(precision_score(1 - y, 1 - pred))
    assert m["fpr"] == pytest.approx(1 - m["specificity"])
    assert m["f1"] == pytest.approx(f1_score(y, pred))
    assert m["brier"] == pytest.approx(brier_score_loss(y, p))


def test_binary_hand_computed_confusion():
    # 4 positives, 4 negatives; at threshold 0.5: TP=3, FN=1, TN=2, FP=2
    y = np.array([1, 1, 1, 1, 0, 0, 0, 0])
    p = np.array([0.9, 0.8, 0.6, 0.2, 0.7, 0.55, 0.3, 0.1])
    m = binary_metrics(y, p)
    assert (m["sensitivity"], m["specificity"], m["ppv"], m["npv"]) == pytest.approx((0.75, 0.5, 0.6, 2 / 3))
    assert m["accuracy"] == pytest.approx(5 / 8)


def test_multiclass_metrics_match_sklearn():
    rng = np.random.default_rng(2)
    y = rng.integers(0, 4, 400)
    logits = rng.normal(size=(400, 4)) + 1.5 * np.eye(4)[y]
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    m = multiclass_metrics(y, probs)
    pred = probs.argmax(1)
    assert m["auc"] == pytest.approx(roc_auc_score(y, probs, multi_class="ovr", average="macro"))
    assert m["accuracy"] == pytest.approx(accuracy_score(y, pred))
    assert m["sensitivity"] == pytest.approx(recall_score(y, pred, average="macro"))
    assert m["ppv"] == pytest.approx(precision_score(y, pred, average="macro"))
    assert m["f1"] == pytest.approx(f1_score(y, pred, average="macro"))
    spec = np.mean([recall_score(y != c, pred != c) for c in range(4)])
    assert m["specificity"] == pytest.approx(spec)
    assert m["brier"] == pytest.approx(np.mean(np.sum((probs - np.eye(4)[y]) ** 2, 1)))


def test_ece_hand_computed():
    # two bins used (15 bins): conf 0.95 x2 (1 correct), conf 0.25 x2 (both correct)
    conf = np.array([0.95, 0.95, 0.25, 0.25])
    correct = np.array([1, 0, 1, 1])
    expected = 0.5 * abs(0.5 - 0.95) + 0.5 * abs(1.0 - 0.25)
    assert expected_calibration_error(conf, correct) == pytest.approx(expected)


def test_ece_perfectly_calibrated_is_small():
    rng = np.random.default_rng(3)
    conf = rng.uniform(0.5, 1, 200_000)
    correct = rng.uniform(size=conf.size) < conf
    assert expected_calibration_error(conf, correct) < 0.01


def test_auc_not_computable_with_one_class_is_none_not_nan():
    m = binary_metrics(np.ones(10, int), np.linspace(0, 1, 10))
    assert m["auc"] is None and m["specificity"] is None and m["sensitivity"] is not None


def test_bootstrap_ci_brackets_point_and_is_deterministic(binary_case):
    y, p = binary_case
    probs = np.stack([1 - p, p], 1)
    a = bootstrap_metrics(Scorer("binary", 1), y, probs, n_boot=200, seed=7)
    b = bootstrap_metrics(Scorer("binary", 1), y, probs, n_boot=200, seed=7)
    assert a == b
    for name, v in a.items():
        lo, hi = v["ci"]
        assert lo <= v["value"] <= hi, name
    assert a["auc"]["ci"][1] - a["auc"]["ci"][0] < 0.2


def test_bootstrap_ci_none_when_metric_undefined():
    y = np.zeros(20, int)
    probs = np.tile([0.8, 0.2], (20, 1))
    r = bootstrap_metrics(Scorer("binary", 1), y, probs, n_boot=50)
    assert r["auc"] == {"value": None, "ci": None}


def test_empty_data_set_is_an_error():
    with pytest.raises(DataSetError):
        Scorer("binary", 1)(np.zeros(0, int), np.zeros((0, 2)))


def test_positive_index_zero_is_respected():
    # positive class is index 0 (e.g. BreastMNIST 'malignant')
    y = np.array([0, 0, 1, 1])
    probs = np.array([[0.9, 0.1], [0.6, 0.4], [0.3, 0.7], [0.45, 0.55]])
    m = Scorer("binary", positive_index=0)(y, probs)
    assert m["sensitivity"] == 1.0 and m["specificity"] == 1.0 and m["auc"] == 1.0
