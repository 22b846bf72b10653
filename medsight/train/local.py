"""Training on a clinic's own data: splits and a starting card when no recipe exists."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from medsight.errors import DataSetError
from medsight.io.datasets import LabeledDataset, load_dataset, load_npz
from medsight.models.card import Architecture, InputSpec, ModelCard
from medsight.models.package import ModelPackage
from medsight.models.preprocess import match_channels
from medsight.train.splits import group_split


def local_splits(source: str | Path, label_names: list[str] | None = None, val: float = 0.15, seed: int = 0) -> dict[str, LabeledDataset]:
    """train / val (/ test when the data defines one) for any supported data form.

    Official splits are used when present (.npz keys, a ``split`` column, or
    ``train/``+``val/`` folders); otherwise a seeded, stratified validation split
    is carved, by ``patient_id`` when the manifest has one.
    """
    p = Path(source)
    if not p.exists():
        raise DataSetError(f"{p}: data set not found")
    if p.suffix == ".npz":
        splits = {"train": load_npz(p, "train", label_names), "val": load_npz(p, "val", label_names)}
        try:
            splits["test"] = load_npz(p, "test", splits["train"].label_names)
        except DataSetError:
            pass
        return splits
    if p.is_dir() and (p / "train").is_dir() and (p / "val").is_dir():
        tr = load_dataset(p / "train", None, label_names)
        out = {"train": tr, "val": load_dataset(p / "val", None, tr.label_names)}
        if (p / "test").is_dir():
            out["test"] = load_dataset(p / "test", None, tr.label_names)
        return out
    full = load_dataset(p, None, label_names)
    if "split" in full.meta.columns and {"train", "val"} <= set(full.meta["split"].astype(str)):
        s = full.meta["split"].astype(str).to_numpy()
        return {k: full.subset(np.where(s == k)[0]) for k in ("train", "val", "test") if (s == k).any()}
    groups = full.meta["patient_id"] if "patient_id" in full.meta.columns else None
    labels = full.meta.assign(_y=full.y.astype(str))["_y"]
    assign = group_split(labels, groups, val, 0.0, seed)
    return {k: full.subset(np.where(assign == k)[0]) for k in ("train", "val")}


def default_card(name: str, train: LabeledDataset, size: int | None = None, modality: str = "unspecified", body_part: str = "unspecified") -> ModelCard:
    """A card for training from scratch, with input statistics measured on the training split."""
    first = train.image(0)
    channels = 3 if first.channels == 3 else 1
    side = size or int(min(max(first.height, first.width), 64))
    sample = [match_channels(train.image(int(i)).pixels, channels) for i in np.linspace(0, len(train) - 1, min(len(train), 200)).astype(int)]
    flat = np.concatenate([s.reshape(-1, channels) for s in sample])
    mean, std = flat.mean(axis=0), flat.std(axis=0).clip(1e-3)
    k = len(train.label_names)
    task = "multilabel" if train.multilabel else ("binary" if k == 2 else "multiclass")
    return ModelCard(
        name=name, task=task, labels=list(train.label_names), modality=modality, body_part=body_part,
        description=f"Trained locally on {train.name}.",
        architecture=Architecture(stem_stride=1 if side <= 32 else 2, dropout=0.2),
        input=InputSpec(size=side, channels=channels, mean=[round(float(m), 4) for m in mean], std=[round(float(s), 4) for s in std]),
        intended_use="Locally trained model: validate on local data before any use.",
        limitations=["Trained by a local user; see training provenance."],
    )


def finetune_card(base: ModelPackage, name: str, train: LabeledDataset) -> ModelCard:
    """The base card with the new label set; preprocessing and architecture are inherited."""
    card = base.card.model_copy(deep=True)
    labels = list(train.label_names)
    k = len(labels)
    task = "multilabel" if train.multilabel else ("binary" if k == 2 else "multiclass")
    same = labels == base.card.labels
    return ModelCard.model_validate({
        **card.model_dump(exclude={"test_metrics", "validation_metrics", "thresholds", "calibration", "weights_sha256", "ood", "published_baselines"}),
        "name": name, "task": task, "labels": labels,
        "positive_label": card.positive_label if same and task == "binary" else None,
        "critical_findings": [f for f in card.critical_findings if f in labels],
        "version": _bump(card.version) if same else "1.0.0",
        "description": f"{card.description} Fine-tuned on {train.name}.",
        "training": {"base": f"{base.card.name}@{base.card.version}"},
    })


def _bump(version: str) -> str:
    parts = version.split(".")
    try:
        parts[1] = str(int(parts[1]) + 1)
        parts[2:] = ["0"] * len(parts[2:])
        return ".".join(parts)
    except (IndexError, ValueError):
        return version + ".1"
