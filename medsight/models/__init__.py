"""Model packages (weights + card), networks, preprocessing and the zoo registry."""

from medsight.models.card import Architecture, Calibration, InputSpec, MetricValue, ModelCard
from medsight.models.package import ModelPackage, load_package, read_card
from medsight.models.registry import ZOO_DIR, list_cards, resolve

__all__ = [
    "Architecture", "Calibration", "InputSpec", "MetricValue", "ModelCard",
    "ModelPackage", "load_package", "read_card", "ZOO_DIR", "list_cards", "resolve",
]
