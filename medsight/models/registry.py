"""Find model packages by name: the shipped zoo plus any directories the caller adds.

Names resolve in order: an existing package directory path, then each search
directory's ``<name>/card.json``. Search paths are explicit arguments (default:
the zoo inside the installed package, plus ``MEDSIGHT_MODEL_PATH`` entries), so
tests and the service can inject their own without global state.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from medsight.errors import ModelCardError, UnknownModelError
from medsight.models.card import ModelCard
from medsight.models.package import CARD_FILE, ModelPackage, load_package, read_card

ZOO_DIR = Path(__file__).resolve().parent.parent / "zoo"


def default_search_paths() -> list[Path]:
    extra = [Path(p) for p in os.environ.get("MEDSIGHT_MODEL_PATH", "").split(os.pathsep) if p]
    return [*extra, ZOO_DIR]


def _package_dirs(search_paths: Iterable[Path]) -> list[Path]:
    found: list[Path] = []
    for root in search_paths:
        if (root / CARD_FILE).is_file():
            found.append(root)
        elif root.is_dir():
            found.extend(sorted(p.parent for p in root.glob(f"*/{CARD_FILE}")))
    return found


def list_cards(search_paths: Iterable[Path] | None = None) -> list[ModelCard]:
    """Cards of every package found (first wins when two share a name)."""
    cards: dict[str, ModelCard] = {}
    for d in _package_dirs(search_paths or default_search_paths()):
        try:
            card = read_card(d)
        except ModelCardError:
            continue
        cards.setdefault(card.name, card)
    return list(cards.values())


def resolve(name_or_path: str | Path, search_paths: Iterable[Path] | None = None) -> Path:
    """Package directory for a zoo name or a path."""
    p = Path(name_or_path)
    if (p / CARD_FILE).is_file():
        return p
    paths = list(search_paths or default_search_paths())
    for d in _package_dirs(paths):
        if d.name == str(name_or_path):
            return d
        try:
            if read_card(d).name == str(name_or_path):
                return d
        except ModelCardError:
            continue
    raise UnknownModelError(str(name_or_path), [c.name for c in list_cards(paths)])


def load(name_or_path: str | Path, search_paths: Iterable[Path] | None = None) -> ModelPackage:
    return load_package(resolve(name_or_path, search_paths))


def zoo_summary(search_paths: Iterable[Path] | None = None) -> list[dict]:
    """The zoo: one dict per model with modality, labels and measured test performance
    (``medsight.list_models``, ``medsight models``): read from the cards alone, no weights loaded."""
    return [
        {
            "name": c.name, "version": c.version, "task": c.task, "modality": c.modality,
            "body_part": c.body_part, "labels": c.labels, "input_size": c.input.size,
            "test_auc": c.test_metrics.get("auc").value if "auc" in c.test_metrics else None,
            "test_accuracy": c.test_metrics.get("accuracy").value if "accuracy" in c.test_metrics else None,
            "description": c.description,
        }
        for c in list_cards(search_paths)
    ]
