"""The card's clinical policy: decision rule, referral, critical findings, each checked by hand."""

from __future__ import annotations

import numpy as np
import pytest

from medsight.models.card import InputSpec, ModelCard
from medsight.models.package import read_card
from medsight.models.policy import (NO_FINDING, classes_of_interest, critical_probability, decide, decided_classes,
                                    finding_labels, is_critical, referral, referred)
from tests.conftest import TINY_ARCH


def _card(task: str, labels: list[str], critical: list[str], **extra) -> ModelCard:
    return ModelCard(name="c", task=task, labels=labels, critical_findings=critical, modality="CR", body_part="X",
                     architecture=TINY_ARCH, input=InputSpec(size=28, channels=1, mean=[0.3], std=[0.2]), **extra)


def test_decision_uses_card_threshold_and_refer_floor(tiny_package):
    card = read_card(tiny_package)
    th = card.thresholds["disc"]
    assert decide(card, np.array([1 - th, th])).label == "disc"
    assert decide(card, np.array([1 - th + 1e-3, th - 1e-3])).label == "bar"
    refer, text = referral(card, "disc", 0.55)
    assert refer and "Refer to a human" in text
    refer, _ = referral(card, "disc", 0.95)
    assert not refer


def test_binary_decision_reports_the_negative_class_with_its_probability_and_maps_the_positive():
    card = _card("binary", ["normal", "pneumonia"], ["pneumonia"], thresholds={"pneumonia": 0.3})
    d = decide(card, np.array([0.75, 0.25]))
    assert (d.label, d.heatmap_class) == ("normal", 1) and d.confidence == pytest.approx(0.75)
    assert decide(card, np.array([0.65, 0.35])).label == "pneumonia"
    probs = np.array([[0.75, 0.25], [0.65, 0.35], [0.1, 0.9]])
    assert decided_classes(card, probs).tolist() == [0, 1, 1]
    assert [card.labels[k] for k in decided_classes(card, probs)] == [decide(card, p).label for p in probs]


def test_multilabel_reports_no_finding_below_every_threshold():
    card = _card("multilabel", ["effusion", "nodule"], ["effusion"], thresholds={"effusion": 0.6})
    d = decide(card, np.array([0.55, 0.2]))
    assert (d.label, d.heatmap_class) == (NO_FINDING, 0) and d.confidence == pytest.approx(0.45 * 0.8)
    assert decide(card, np.array([0.65, 0.2])).label == "effusion"
    assert decide(card, np.array([0.2, 0.5])).label == "nodule"  # no card threshold: 0.5


def test_out_of_distribution_referral_overrides_a_confident_finding():
    card = _card("binary", ["a", "b"], [], ood={"threshold": 3.0})
    refer, text = referral(card, "b", 0.99, ood_score=4.2)
    assert refer and text.startswith("Refer to a human: the image looks unlike the model's training data")
    assert "4.2 is above the threshold 3.0" in text
    assert referral(card, "b", 0.99, ood_score=2.0) == referral(card, "b", 0.99)
    assert not referral(_card("binary", ["a", "b"], []), "b", 0.99, ood_score=99.0)[0]  # no detector in the card
    # many at once: the same rule (floor 0.70 by default)
    conf, scores = np.array([0.99, 0.6, 0.99, 0.6]), np.array([4.2, 2.0, 2.0, 4.2])
    assert referred(card, conf, scores).tolist() == [True, True, False, True]
    assert referred(card, conf, scores).tolist() == [referral(card, "b", c, s)[0] for c, s in zip(conf, scores)]


def test_critical_probability_per_task() -> None:
    assert critical_probability(_card("binary", ["normal", "pneumonia"], ["pneumonia"]), {"normal": 0.3, "pneumonia": 0.7}) == 0.7
    mc = _card("multiclass", ["glioma", "meningioma", "none", "pituitary"], ["glioma", "meningioma", "pituitary"])
    assert critical_probability(mc, {"glioma": 0.1, "meningioma": 0.2, "none": 0.6, "pituitary": 0.1}) == pytest.approx(0.4)
    ml = _card("multilabel", ["effusion", "nodule", "pneumothorax"], ["effusion", "pneumothorax"])
    assert critical_probability(ml, {"effusion": 0.3, "nodule": 0.9, "pneumothorax": 0.6}) == 0.6
    assert critical_probability(_card("binary", ["a", "b"], []), {"a": 0.1, "b": 0.9}) == 0.0


def test_critical_findings_and_findings_of_interest():
    ml = _card("multilabel", ["effusion", "nodule", "pneumothorax"], ["pneumothorax"], thresholds={"pneumothorax": 0.4})
    assert is_critical(ml, "nodule", {"effusion": 0.1, "nodule": 0.9, "pneumothorax": 0.45})
    assert not is_critical(ml, "nodule", {"effusion": 0.1, "nodule": 0.9, "pneumothorax": 0.35})
    mc = _card("multiclass", ["glioma", "none", "pituitary"], ["glioma"])
    assert is_critical(mc, "glioma", {}) and not is_critical(mc, "pituitary", {"glioma": 0.49})
    assert classes_of_interest(mc) == [0] and classes_of_interest(_card("multiclass", ["x", "y", "z"], [])) == [0, 1, 2]
    binary = _card("binary", ["normal", "pneumonia"], [])
    assert classes_of_interest(binary) == [1] and finding_labels(binary) == ["pneumonia"]
    assert finding_labels(mc) == ["glioma", "none", "pituitary"]
