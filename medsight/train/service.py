"""One entry point for the CLI (and later the service) to train or fine-tune."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from medsight.errors import DataSetError
from medsight.models.package import ModelPackage
from medsight.train.config import TrainConfig
from medsight.train.trainer import EpochReport, fit


def train(
    out_dir: Path, data: Path | None = None, recipe: Path | None = None, data_root: Path = Path("../shared/data"),
    base: str | None = None, name: str | None = None, epochs: int | None = None, batch_size: int | None = None,
    lr: float | None = None, size: int | None = None, seed: int = 0, resume: bool = False,
    on_epoch: Callable[[EpochReport], None] | None = None,
) -> ModelPackage:
    from medsight.models.card import MetricValue
    from medsight.models.registry import load
    from medsight.train.local import default_card, finetune_card, local_splits
    from medsight.train.recipe import Recipe, evaluate_split, run_recipe

    if recipe is not None:
        return run_recipe(Recipe.load(recipe), data_root, out_dir, resume=resume, on_epoch=on_epoch, epochs=epochs)
    if data is None:
        raise DataSetError("no training data given")
    base_pkg = load(base) if base else None
    splits = local_splits(data, label_names=None, seed=seed)
    model_name = name or Path(out_dir).resolve().name
    if base_pkg is not None:
        card = finetune_card(base_pkg, model_name, splits["train"])
        overrides = {"lr": 5e-4, "epochs": 15, "freeze_backbone_epochs": 2, "patience": 6}
    else:
        card = default_card(model_name, splits["train"], size)
        overrides = {}
    overrides["seed"] = seed
    for k, v in {"epochs": epochs, "batch_size": batch_size, "lr": lr}.items():
        if v is not None:
            overrides[k] = v
    cfg = TrainConfig(**overrides)
    card.training.update(dataset=str(data), split={k: len(v) for k, v in splits.items()})
    pkg = fit(card, splits["train"], splits["val"], cfg, out_dir, base=base_pkg, resume=resume, on_epoch=on_epoch)
    if "test" in splits:
        pkg.card.test_metrics = {k: MetricValue(**v) for k, v in evaluate_split(pkg, splits["test"]).items()}
        pkg.card.training["n_test"] = len(splits["test"])
        pkg.save(out_dir)
    return pkg
