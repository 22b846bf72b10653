"""The shipped zoo's models with their official data splits, for benchmarks and reports.

Each zoo model has a training recipe (``recipes/<name>.json``) whose data spec and
seeded split rule reproduce its train/val/test split from the raw data
(:func:`medsight.train.recipe.recipe_splits`). Benchmarks must evaluate on exactly
those splits, so they get them from here rather than re-deriving them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medsight.errors import DataSetError
from medsight.io.datasets import LabeledDataset, load_manifest, load_npz
from medsight.models.card import ModelCard
from medsight.models.package import CARD_FILE, read_card
from medsight.models.registry import ZOO_DIR
from medsight.train.recipe import Recipe, recipe_splits
from medsight.train.trainer import CHECKPOINT

#: every data set in shared/data, with the imaging family it belongs to (same family = near-OOD for each other)
DATA_SETS = {
    "pneumoniamnist.npz": "chest X-ray",
    "covid_chestxray_ieee8023": "chest X-ray",
    "breastmnist.npz": "breast ultrasound",
    "busi_256": "breast ultrasound",
    "ham10000_subset224": "dermoscopy",
    "brain_tumor_mri_4class": "brain MRI",
}


@dataclass
class ShippedModel:
    name: str
    directory: Path
    card: ModelCard
    recipe: Recipe

    @property
    def source(self) -> str:
        return self.recipe.data.source

    def splits(self, data_root: Path) -> dict[str, LabeledDataset]:
        return recipe_splits(self.recipe.data, data_root)


def is_finished(directory: Path) -> bool:
    """Training is over: the card has test metrics and no resumable checkpoint is left."""
    if not (directory / CARD_FILE).is_file() or (directory / CHECKPOINT).exists():
        return False
    return bool(read_card(directory).test_metrics)


def shipped_models(recipes_dir: Path, zoo_dir: Path = ZOO_DIR, only: list[str] | None = None) -> list[ShippedModel]:
    """Finished zoo models that have a recipe, sorted by name (``only`` filters by name)."""
    out = []
    for d in sorted(p.parent for p in zoo_dir.glob(f"*/{CARD_FILE}")):
        card = read_card(d)
        if only and card.name not in only:
            continue
        recipe_path = recipes_dir / f"{card.name}.json"
        if not recipe_path.is_file() or not is_finished(d):
            continue
        out.append(ShippedModel(card.name, d, card, Recipe.load(recipe_path)))
    return out


def sample_of(source: str, data_root: Path, n: int, seed: int = 0) -> LabeledDataset:
    """Up to ``n`` images of a data set (its test split for .npz files), seeded, labels ignored by callers."""
    path = data_root / source
    if not path.exists():
        raise DataSetError(f"{path}: data set not found")
    ds = load_npz(path, "test") if path.suffix == ".npz" else load_manifest(path / "manifest.csv")
    if len(ds) <= n:
        return ds
    idx = np.sort(np.random.default_rng(seed).choice(len(ds), n, replace=False))
    return ds.subset(idx)
