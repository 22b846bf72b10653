"""The clinical policy a model card states, in one place: what is reported, when a human must look, what is critical.

A card carries the rules (``thresholds``, ``confidence.refer_below``, ``ood``,
``critical_findings``, ``modality``) but not the arithmetic that applies them. Keeping
that arithmetic here, beside the card and reading nothing else, is what lets the
Predictor, the validation report, the service's worklist and its catalog agree on
every decision: none of them writes its own copy of a rule.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from medsight.models.card import ModelCard

#: what a multi-label model reports when no label reaches its threshold
NO_FINDING = "no finding"
DEFAULT_THRESHOLD = 0.5


class Decision(NamedTuple):
    """What is reported for one image, and which class its heat map explains."""

    label: str
    confidence: float  # calibrated probability of the reported label (multi-label "no finding": of none present)
    heatmap_class: int  # binary: always the positive class, so the map shows the evidence for the finding


# -- the decision rule -----------------------------------------------------------------------
def label_threshold(card: ModelCard, label: str) -> float:
    """The probability at which ``label`` is reported (the card's threshold, else 0.5)."""
    return card.thresholds.get(label, DEFAULT_THRESHOLD)


def operating_threshold(card: ModelCard) -> float:
    """The operating point metrics are computed at: the binary threshold on the positive label (0.5 otherwise)."""
    return label_threshold(card, card.positive_label or "")


def decided_classes(card: ModelCard, probs: np.ndarray) -> np.ndarray:
    """Class index reported for each row of ``probs`` (N, K): binary, the card's threshold on the positive
    class; otherwise the most probable class (a multi-label model reports it only above its own threshold)."""
    if card.task == "binary":
        pos = card.positive_index
        return np.where(probs[:, pos] >= operating_threshold(card), pos, 1 - pos)
    return probs.argmax(axis=1)


def decide(card: ModelCard, p: np.ndarray) -> Decision:
    """The reported label of one image's calibrated probabilities ``p`` (K,)."""
    k = int(decided_classes(card, p[None])[0])
    if card.task == "binary":
        pos = card.positive_index
        return Decision(card.labels[k], float(p[pos] if k == pos else 1 - p[pos]), pos)
    if card.task == "multilabel" and p[k] < label_threshold(card, card.labels[k]):
        return Decision(NO_FINDING, float(np.prod(1 - p)), k)
    return Decision(card.labels[k], float(p[k]), k)


# -- the referral ----------------------------------------------------------------------------
def out_of_distribution(card: ModelCard, scores: np.ndarray | float) -> np.ndarray:
    """Whether OOD scores are above the card's OOD threshold (all False for a card without a detector)."""
    if not card.ood:
        return np.zeros(np.shape(scores), dtype=bool)
    return np.asarray(scores) > float(card.ood["threshold"])


def referred(card: ModelCard, confidence: np.ndarray | float, ood_scores: np.ndarray | float | None = None) -> np.ndarray:
    """Which results go to a human (:func:`referral` for many at once): unlike the training data, or
    less probable than the card's ``confidence.refer_below`` floor."""
    uncertain = np.asarray(confidence) < card.confidence.refer_below
    return uncertain if ood_scores is None else uncertain | out_of_distribution(card, ood_scores)


def referral(card: ModelCard, label: str, confidence: float, ood_score: float | None = None) -> tuple[bool, str]:
    """(refer to a human, the statement shown with the result).

    An image unlike the training data is referred whatever the model says about it; otherwise a
    decision less probable than the card's ``confidence.refer_below`` floor is referred.
    """
    if ood_score is not None and bool(out_of_distribution(card, ood_score)):
        return True, (f"Refer to a human: the image looks unlike the model's training data "
                      f"(out-of-distribution score {ood_score:.1f} is above the threshold {float(card.ood['threshold']):.1f}); "
                      f"no finding is reported.")
    if referred(card, confidence):
        # names no label: the statement travels with the result (burned into the PACS overlay too), and
        # a label there would read as the finding the referral withholds
        return True, (f"Refer to a human: the model is uncertain (the calibrated probability of its most likely "
                      f"class, {confidence:.2f}, is below the {card.confidence.refer_below:.2f} referral floor); "
                      f"no finding is reported.")
    return False, f"Model finding: '{label}' with calibrated probability {confidence:.2f}; confirm clinically."


def reported_finding(label: str, refer: bool) -> str | None:
    """The finding a result states, or None: a referred image and a "no finding" decision state none.

    Every output (DICOM SR and overlay, FHIR, HL7) headlines this and nothing else, so a referral can
    never reach a PACS or RIS looking like a finding; the decided ``label`` stays in the record.
    """
    return None if refer or label == NO_FINDING else label


# -- findings --------------------------------------------------------------------------------
def finding_labels(card: ModelCard) -> list[str]:
    """Labels a reviewer confirms or corrects: the positive class of a binary model, every class otherwise."""
    if card.task == "binary":
        return [card.positive_label or card.labels[1]]
    return list(card.labels)


def classes_of_interest(card: ModelCard) -> list[int]:
    """The findings a validation looks at: the positive class of a binary model, else the critical findings
    (every class when the card names none)."""
    if card.task == "binary":
        return [card.positive_index]
    named = [card.labels.index(f) for f in card.critical_findings]
    return named or list(range(card.num_outputs))


def critical_probability(card: ModelCard, probabilities: dict[str, float]) -> float:
    """Calibrated probability that an image shows one of the card's critical findings.

    Binary and multi-class classes are mutually exclusive, so the sum of the critical ones *is* the
    probability of "any critical finding"; for a multi-label model the largest one (a lower bound that
    assumes nothing about dependence).
    """
    ps = [float(probabilities.get(f, 0.0)) for f in card.critical_findings]
    if not ps:
        return 0.0
    return min(1.0, max(ps) if card.task == "multilabel" else sum(ps))


def is_critical(card: ModelCard, label: str, probabilities: dict[str, float]) -> bool:
    """Whether a result reports a critical finding (multi-label: any critical label at or above its threshold)."""
    if label in card.critical_findings:
        return True
    if card.task == "multilabel":
        return any(probabilities.get(f, 0.0) >= label_threshold(card, f) for f in card.critical_findings)
    return False

