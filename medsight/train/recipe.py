"""Training recipes: a JSON file that reproduces a shipped model from the raw data.

A recipe names the data (relative to a data root such as ``../shared/data``), how
to split it when it has no official split, the card fields, and the training
settings. :func:`run_recipe` trains on train, selects on val, then measures the
test split exactly once and writes those numbers into the card.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from datetime import date
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict

from medsight.errors import DataSetError
from medsight.evaluate.metrics import Scorer, bootstrap_metrics
from medsight.io.datasets import LabeledDataset, ReadFailure, dataset_from_frame, load_npz
from medsight.models.card import MetricValue, ModelCard
from medsight.models.package import ModelPackage
from medsight.train.config import TrainConfig
from medsight.train.splits import group_split
from medsight.train.trainer import EpochReport, fit

log = logging.getLogger(__name__)


class SplitSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    column: str | None = None  # use an existing split column for test (and train)
    group: str | None = None  # group ID column (patient, lesion, duplicate group)
    val: float = 0.15
    test: float = 0.2
    seed: int = 0


class DataSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    source: str
    label_names: list[str]
    label_column: str = "label"
    split: SplitSpec | None = None
    drop_duplicate_column: str | None = None  # rows sharing this value with conflicting labels are dropped


class Recipe(BaseModel):
    model_config = ConfigDict(extra="forbid")
    card: dict[str, Any]
    data: DataSpec
    train: TrainConfig = TrainConfig()
    published_baselines: dict[str, Any] = {}

    @classmethod
    def load(cls, path: str | Path) -> "Recipe":
        return cls.model_validate(json.loads(Path(path).read_text()))


def recipe_splits(spec: DataSpec, data_root: Path) -> dict[str, LabeledDataset]:
    src = data_root / spec.source
    if not src.exists():
        raise DataSetError(f"{src}: data not found (set --data-root to the folder holding it)")
    if src.suffix == ".npz":
        return {s: load_npz(src, s, spec.label_names) for s in ("train", "val", "test")}
    manifest = src / "manifest.csv" if src.is_dir() else src
    df = pd.read_csv(manifest)
    if spec.drop_duplicate_column:
        col = spec.drop_duplicate_column
        conflicting = df.groupby(col)[spec.label_column].transform("nunique") > 1
        df = df[~conflicting].reset_index(drop=True)
    sp = spec.split or SplitSpec()
    groups = df[sp.group] if sp.group else None
    if sp.column:
        assign = df[sp.column].astype(str).to_numpy().copy()
        train_rows = np.where(assign == "train")[0]
        sub = group_split(df[spec.label_column].iloc[train_rows], groups.iloc[train_rows] if groups is not None else None, sp.val, 0.0, sp.seed)
        assign[train_rows] = sub
    else:
        assign = group_split(df[spec.label_column], groups, sp.val, sp.test, sp.seed)
    df = df.assign(split=assign)
    return {
        s: dataset_from_frame(df[df["split"] == s], manifest.parent, spec.label_names, spec.label_column, f"{src.name}:{s}")
        for s in ("train", "val", "test")
    }


def evaluate_split(pkg: ModelPackage, ds: LabeledDataset, n_boot: int = 1000,
                   failures: list[ReadFailure] | None = None) -> dict[str, dict[str, Any]]:
    """Metrics with CIs for a package on the readable images of a labelled set, through the one inference path
    (unreadable ones are skipped into ``failures``)."""
    from medsight.predict.load import load_model

    probs, rows = load_model(pkg).dataset_probs(ds, failures=failures)
    return bootstrap_metrics(Scorer.for_card(pkg.card), ds.y[rows], probs, n_boot=n_boot)


def published_comparison(test: dict[str, Any], published: dict[str, Any]) -> dict[str, Any] | None:
    """Whether test AUC *and* ACC beat the best published numbers, in words a card reader can use."""
    if "best_auc" not in published or "best_acc" not in published:
        return None
    auc = test["auc"]["value"] if isinstance(test["auc"], dict) else test["auc"].value
    acc = test["accuracy"]["value"] if isinstance(test["accuracy"], dict) else test["accuracy"].value
    beats = auc is not None and auc > published["best_auc"] and acc > published["best_acc"]
    verdict = "beats" if beats else "does not yet beat"
    return {
        "beats_best_published": bool(beats),
        "statement": (f"This model {verdict} the best published result on this test split: test AUC {auc:.3f} vs "
                      f"{published['best_auc']:.3f} ({published.get('best_auc_method', '?')}), test ACC {acc:.3f} vs "
                      f"{published['best_acc']:.3f} ({published.get('best_acc_method', '?')})."),
    }


def run_recipe(
    recipe: Recipe, data_root: Path, out_dir: Path, resume: bool = False,
    on_epoch: Callable[[EpochReport], None] | None = None, epochs: int | None = None,
) -> ModelPackage:
    splits = recipe_splits(recipe.data, data_root)
    cfg = recipe.train if epochs is None else recipe.train.model_copy(update={"epochs": epochs})
    card = ModelCard.model_validate(recipe.card)
    card.training.update(
        dataset=recipe.data.source, split={s: len(d) for s, d in splits.items()},
        split_rule=recipe.data.split.model_dump() if recipe.data.split else "official", trained_on=str(date.today()),
    )
    pkg = fit(card, splits["train"], splits["val"], cfg, out_dir, resume=resume, on_epoch=on_epoch)
    unreadable: list[ReadFailure] = []
    test = evaluate_split(pkg, splits["test"], failures=unreadable)
    pkg.card.test_metrics = {k: MetricValue(**v) for k, v in test.items()}
    pkg.card.training["n_test"] = len(splits["test"]) - len(unreadable)
    pkg.card.training["skipped_unreadable"] = pkg.card.training.get("skipped_unreadable", 0) + len(unreadable)
    for f in unreadable:
        log.warning("skipped unreadable test image: %s", f.error)
    pkg.card.published_baselines = dict(recipe.published_baselines)
    comparison = published_comparison(test, recipe.published_baselines)
    if comparison:
        pkg.card.published_baselines["comparison"] = comparison
    pkg.save(out_dir)
    return pkg
