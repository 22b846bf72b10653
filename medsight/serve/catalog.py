"""Which installed model reads which study, and loaded predictors for the worker.

A study is only ever sent to a model whose card's ``applicability`` it fits in every
respect its header states (modality, body part, view, age, photometric interpretation,
laterality; :func:`medsight.models.applicability.route`, docs/routing.md), so neither a
CT nor a shoulder MR nor an adult's chest film reaches a model trained on something else.

Predictors run on the model's recorded fast backend (``auto``: the fastest backend
that met the accuracy rule on the model's test split, recorded in ``card.runtime`` by
``medsight runtime tune``; torch when nothing is recorded). Heat maps come from the
same forward pass on every backend (:mod:`medsight.predict.cam`), so the service
loses nothing by not running eager PyTorch.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

from medsight.errors import UnknownModelError, UnsupportedModalityError
from medsight.models.applicability import RoutingDecision, RoutingRule, StudyAttributes, route
from medsight.models.card import ModelCard
from medsight.models.policy import finding_labels
from medsight.models.registry import default_search_paths, list_cards, resolve
from medsight.predict.backends import CHOICES
from medsight.predict.load import load_model
from medsight.predict.predictor import Predictor
from medsight.predict.settings import RuntimeSettings

#: ``finding_labels`` is the card's policy (medsight.models.policy), named here too for the API routes
__all__ = ["ModelCatalog", "card_modalities", "finding_labels"]

log = logging.getLogger(__name__)


def card_modalities(card: ModelCard) -> set[str]:
    """DICOM modality codes named at the start of a card's ``modality`` field."""
    head = card.modality.strip().split(" ", 1)[0] if card.modality.strip() else ""
    return {m.strip().upper() for m in head.split("/") if m.strip()}


class ModelCatalog:
    """Installed models and a small LRU cache of loaded predictors.

    ``backend`` (torch | onnx | onnx-int8 | auto) is how every predictor runs;
    ``runtime`` sets its threads and ONNX cache (default: all cores this process may
    use, ``$MEDSIGHT_CACHE_DIR``).
    """

    def __init__(self, extra_paths: list[Path] | None = None, default_models: dict[str, str] | None = None,
                 cache_size: int = 4, refresh_s: float = 30.0, use_zoo: bool = True, backend: str = "auto",
                 runtime: RuntimeSettings | None = None, routing_rules: Sequence[RoutingRule] = ()):
        if backend not in CHOICES:  # fail when the service starts, not on the first study
            raise ValueError(f"unknown inference backend {backend!r}; choose one of {', '.join(CHOICES)}")
        self.backend = backend
        self.runtime = runtime
        self.search_paths = [*(extra_paths or []), *(default_search_paths() if use_zoo else [])]
        self.default_models = {k.upper(): v for k, v in (default_models or {}).items()}
        self.routing_rules = list(routing_rules)  # the site's words for body parts (ServiceSettings.routing_rules)
        self._cache: OrderedDict[str, Predictor] = OrderedDict()
        self._cache_size = cache_size
        self._cards: list[ModelCard] = []
        self._cards_at = -1e9
        self._refresh_s = refresh_s

    def cards(self) -> list[ModelCard]:
        """Installed cards, re-scanned at most every ``refresh_s`` (new packages appear without a restart)."""
        if time.monotonic() - self._cards_at > self._refresh_s:
            self._cards = list_cards(self.search_paths)
            self._cards_at = time.monotonic()
        return self._cards

    def card(self, name: str) -> ModelCard:
        for c in self.cards():
            if c.name == name:
                return c
        self._cards_at = -1e9
        for c in self.cards():
            if c.name == name:
                return c
        raise UnknownModelError(name, [c.name for c in self.cards()])

    def route(self, modality: str, attributes: Sequence[StudyAttributes] = (),
              requested: str | None = None) -> RoutingDecision:
        """Which installed model applies to a study of ``modality`` whose images' headers say ``attributes``."""
        records = [a.with_modality(modality.upper()) for a in attributes] or [StudyAttributes(modality=modality.upper())]
        if requested:
            self.card(requested)  # an unknown name is an unknown model, not "does not apply"
        return route(records, self.cards(), self.routing_rules, self.default_models, requested)

    def choose(self, modality: str, requested: str | None = None, attributes: Sequence[StudyAttributes] = (),
               override: bool = False) -> ModelCard:
        """The model for a study: the one that applies (the modality's default among several), or the
        requested one if it applies. Raises :class:`~medsight.errors.UnsupportedModalityError` ("not analysed:
        no model applies (SHOULDER MR): ...") otherwise; without ``attributes`` only the modality is known,
        so no model that constrains anything else applies.

        ``override``: an operator's explicit decision to run the ``requested`` model on a study it does not
        apply to (e.g. a PNG whose header cannot say its body part); it is logged here with the reasons,
        and the caller records it in the audit trail. It never applies without a requested model.
        """
        decision = self.route(modality, attributes, requested)
        if decision.model is not None:
            return self.card(decision.model)
        if override and requested:
            log.warning("operator override: %s runs although %s", requested, decision.message)
            return self.card(requested)
        raise UnsupportedModalityError(decision.message, decision)

    def predictor(self, name: str) -> Predictor:
        """A loaded model (weights sha256-checked by the core loader) on the catalog's backend, kept in a small LRU cache.

        The ONNX files of a fast backend are built into the cache on first use (seconds, once per
        weights); ``auto`` falls back to torch with a logged warning when they cannot be built.
        """
        if name in self._cache:
            self._cache.move_to_end(name)
            return self._cache[name]
        pred = load_model(resolve(name, self.search_paths), self.backend, self.runtime)
        self._cache[name] = pred
        while len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return pred
