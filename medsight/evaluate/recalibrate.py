"""``medsight calibrate``: refit calibration and the operating threshold on a clinic's own data.

A model's probabilities are calibrated on its developer's validation split; on a
new site's scanners and population they drift. This refits temperature scaling
(:func:`medsight.evaluate.calibration.fit_temperature`) on local labelled data,
picks the operating threshold there (a sensitivity target or Youden's J), and
writes a *new* package version:

* the weights file is copied byte for byte (same sha256), so the network is
  provably the original one; the OOD parameters are copied too;
* the card gets a bumped version, the new calibration and threshold, the local
  validation metrics (with bootstrap CIs), and a ``training.recalibration``
  provenance record (base model and weights hash, data, split, rule, before/after
  numbers, date, MedSight version);
* the original package is never written to: writing into the source directory or
  into an existing non-empty directory is refused, and the new package is
  assembled in a temporary directory and renamed into place only once it loads.

Temperature scaling is the method because the card and the Predictor apply a
single temperature, it cannot change which class ranks first (AUC and argmax
decisions are untouched), and one parameter cannot overfit a small local split.
``benchmarks/calibration`` measures the ECE it reaches on each shipped model.
"""

from __future__ import annotations

import re
import shutil
import tempfile
from datetime import date
from pathlib import Path
from typing import Any

import numpy as np

from medsight._version import __version__
from medsight.errors import DataSetError, ModelCardError, PackageOutputError, UnsupportedTaskError
from medsight.evaluate.calibration import fit_temperature, probabilities
from medsight.evaluate.collect import collect_outputs
from medsight.evaluate.metrics import Scorer, bootstrap_metrics, expected_calibration_error
from medsight.evaluate.thresholds import threshold_for_sensitivity, youden_threshold
from medsight.io.datasets import LabeledDataset, load_dataset
from medsight.models.card import Calibration, MetricValue, ModelCard
from medsight.models.package import load_package, write_card
from medsight.models.registry import resolve
from medsight.predict.ood import OOD_FILE, fit_ood
from medsight.predict.predictor import Predictor

_SEMVER = re.compile(r"^(\d+)\.(\d+)\.(\d+)(.*)$")


def bump_version(version: str) -> str:
    """Next minor version: recalibration changes outputs but not the network (1.0.0 -> 1.1.0)."""
    m = _SEMVER.match(version)
    if not m:
        raise ModelCardError(f"version {version!r} is not MAJOR.MINOR.PATCH; pass an explicit new version")
    return f"{m.group(1)}.{int(m.group(2)) + 1}.0"


def top_label_ece(probs: np.ndarray, y: np.ndarray, n_bins: int = 15) -> float:
    return expected_calibration_error(probs.max(axis=1), probs.argmax(axis=1) == y, n_bins)


def _check_output(src: Path, out: Path) -> None:
    if out.resolve() == src.resolve():
        raise PackageOutputError(f"{out}: is the source package; calibrate writes a new package and never overwrites the original")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise PackageOutputError(f"{out}: already exists and is not empty; choose a new folder for the new package")


def _choose_threshold(card: ModelCard, y: np.ndarray, probs: np.ndarray, target: float | None) -> tuple[dict[str, float], str]:
    if card.task != "binary":
        if target is not None:
            raise UnsupportedTaskError(f"{card.name}: a sensitivity target applies to binary models; "
                                       "a multi-class model reports its most probable class")
        return {}, "argmax (multi-class models have no threshold)"
    pos = card.positive_index
    yb, p = (y == pos).astype(int), probs[:, pos]
    if target is None:
        return {card.positive_label: youden_threshold(yb, p)}, "maximum Youden's J on the local data"  # type: ignore[dict-item]
    th = threshold_for_sensitivity(yb, p, target)
    return {card.positive_label: th}, f"highest threshold reaching sensitivity >= {target:.2f} on the local data"  # type: ignore[dict-item]


def recalibrate_dataset(
    package_dir: str | Path, ds: LabeledDataset, out: str | Path, *, data_label: str = "", target_sensitivity: float | None = None,
    version: str | None = None, n_boot: int = 1000, ood_train: LabeledDataset | None = None,
) -> dict[str, Any]:
    """Write the recalibrated package to ``out``; returns a summary (also stored in the new card)."""
    src, dst = Path(package_dir), Path(out)
    _check_output(src, dst)
    pkg = load_package(src)
    card = pkg.card
    if card.task == "multilabel":
        raise UnsupportedTaskError(f"{card.name}: recalibration supports binary and multi-class models")
    if target_sensitivity is not None and not 0 < target_sensitivity < 1:
        raise ValueError("target sensitivity must be between 0 and 1")
    if ds.label_names != card.labels:
        raise DataSetError(f"{ds.name}: labels {ds.label_names} do not match the model's {card.labels}")
    outputs = collect_outputs(Predictor(pkg), ds)
    y = np.asarray(ds.y)[outputs.index].astype(int)
    if len(np.unique(y)) < 2:
        raise DataSetError(f"{ds.name}: only one class present; calibration and a threshold need cases of at least two classes")
    temperature, nll_t1, nll_new = fit_temperature(outputs.logits, y)
    old_probs = probabilities(outputs.logits, card.calibration.temperature)
    new_probs = probabilities(outputs.logits, temperature)
    thresholds, rule = _choose_threshold(card, y, new_probs, target_sensitivity)
    scorer = Scorer(card.task, card.positive_index if card.task == "binary" else 1,
                    thresholds.get(card.positive_label or "", 0.5))
    local = bootstrap_metrics(scorer, y, new_probs, n_boot=n_boot)

    new = card.model_copy(deep=True)
    new.version = version or bump_version(card.version)
    new.calibration = Calibration(method="temperature", temperature=temperature, fitted_on=f"{data_label or ds.name} (local)",
                                  nll_before=nll_t1, nll_after=nll_new)
    new.thresholds = thresholds
    new.validation_metrics = {k: MetricValue(**v) for k, v in local.items()}
    new.test_metrics = {}
    summary = {
        "base_model": f"{card.name}@{card.version}", "base_weights_sha256": card.weights_sha256,
        "data": data_label or ds.name, "n": int(len(y)), "n_unreadable": len(outputs.errors),
        "class_counts": {lab: int(c) for lab, c in zip(card.labels, np.bincount(y, minlength=card.num_outputs))},
        "method": "temperature scaling (NLL, LBFGS)", "threshold_rule": rule, "target_sensitivity": target_sensitivity,
        "temperature_before": card.calibration.temperature, "temperature_after": temperature,
        "ece_before": top_label_ece(old_probs, y), "ece_after": top_label_ece(new_probs, y),
        "thresholds_before": card.thresholds, "thresholds_after": thresholds,
        "base_validation_metrics": {k: v.model_dump() for k, v in card.validation_metrics.items()},
        "base_test_metrics": {k: v.model_dump() for k, v in card.test_metrics.items()},
        "date": str(date.today()), "medsight_version": __version__,
    }
    new.training = {**card.training, "recalibration": summary}
    new.limitations = [*card.limitations,
                       f"Recalibrated on local data ({summary['data']}, n={summary['n']}); its validation metrics are measured on that "
                       "same data. The base model's test metrics are kept under training.recalibration; validate this version on "
                       "separate local test data ('medsight validate')."]
    _assemble(src, dst, new, ood_train, ds)
    return summary


def _assemble(src: Path, dst: Path, card: ModelCard, ood_train: LabeledDataset | None, ood_val: LabeledDataset) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dst.parent, prefix=f".{dst.name}.tmp-"))
    try:
        shutil.copy2(src / card.weights_file, tmp / card.weights_file)
        if card.ood and (src / card.ood.get("file", OOD_FILE)).is_file():
            shutil.copy2(src / card.ood.get("file", OOD_FILE), tmp / card.ood.get("file", OOD_FILE))
        write_card(card, tmp)
        if ood_train is not None:
            fit_ood(tmp, ood_train, ood_val)
        load_package(tmp)  # the new package must load (weights hash, card) before it appears
        if dst.exists():
            dst.rmdir()  # _check_output allowed only an empty directory
        tmp.rename(dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def recalibrate(
    model: str | Path, data: str | Path, out: str | Path, split: str | None = "val", target_sensitivity: float | None = None,
    version: str | None = None, n_boot: int = 1000, fit_ood_split: str | None = None, ood_data: str | Path | None = None,
) -> dict[str, Any]:
    """CLI entry: model name/dir + data path; optionally also fit the OOD detector on ``ood_data``/``fit_ood_split``."""
    src = resolve(model)
    labels = load_package(src).card.labels
    ds = load_dataset(data, split, label_names=labels)
    ood_train = load_dataset(ood_data or data, fit_ood_split, label_names=labels) if fit_ood_split else None
    label = f"{data}" + (f":{split}" if split else "")
    return recalibrate_dataset(src, ds, out, data_label=label, target_sensitivity=target_sensitivity, version=version,
                               n_boot=n_boot, ood_train=ood_train)
