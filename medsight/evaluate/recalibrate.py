"""``medsight calibrate``: refit calibration and the operating threshold on a clinic's own data.

A model's probabilities are calibrated on its developer's validation split; on a
new site's scanners and population they drift. This refits the calibration on local
labelled data (``method="auto"``: temperature, temperature + bias, vector scaling or
isotonic regression, chosen by 5-fold cross-validation on that same local data,
:func:`medsight.evaluate.calibration.select_calibration`; or one named method),
optionally adapts the class priors to the site's *unlabelled* images (EM, Saerens et
al. 2002: for a clinic whose case mix differs from its labelled sample), picks the
operating threshold (a sensitivity target or Youden's J), and writes a *new* package
version:

* the weights file is copied byte for byte (same sha256), so the network is
  provably the original one; the OOD parameters are copied too, and the int8
  calibration ranges, so the new version runs the recorded backend (``auto``) the
  new calibration was fitted on;
* the card gets a bumped version, the new calibration and threshold, the local
  validation metrics (with bootstrap CIs), and a ``training.recalibration``
  provenance record (base model and weights hash, data, split, rule, before/after
  numbers, date, MedSight version);
* the original package is never written to: writing into the source directory or
  into an existing non-empty directory is refused, and the new package is
  assembled in a temporary directory and renamed into place only once it loads.

Why a choice of methods: on the shipped models no single method is best
(``benchmarks/calibration``). Temperature scaling keeps the ranking and cannot
overfit; the others can fix more but need more data, which the cross-validation
weighs on the local data itself.
"""

from __future__ import annotations

import re
import shutil
import tempfile
from datetime import date
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medsight._version import __version__
from medsight.errors import DataSetError, ModelCardError, PackageOutputError, UnsupportedTaskError
from medsight.evaluate.calibration import (
    METHODS, calibrated_probabilities, calibration_map, em_prior_shift, fit_calibration, nll, select_calibration,
)
from medsight.evaluate.collect import collect_outputs
from medsight.evaluate.metrics import Scorer, bootstrap_metrics, expected_calibration_error
from medsight.evaluate.ood_fit import fit_ood
from medsight.evaluate.thresholds import threshold_for_sensitivity, youden_threshold
from medsight.io.datasets import LabeledDataset, load_dataset
from medsight.io.image import MedImage
from medsight.models.card import Calibration, MetricValue, ModelCard
from medsight.models.package import load_package, write_card
from medsight.models.registry import resolve
from medsight.predict.ood import OOD_FILE
from medsight.predict.load import load_model
from medsight.predict.predictor import Predictor
from medsight.predict.stream import Prepared, decoded_batches

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


def _unlabelled_logits(pred: Predictor, images: list[Path] | list[MedImage], batch_size: int = 64) -> tuple[np.ndarray, int]:
    """Logits of the unlabelled images that can be read (unreadable ones are counted, not fatal)."""
    parts, bad = [], 0
    for batch in decoded_batches(images, batch_size, workers=pred.settings.decode_workers, spec=pred.card.input):
        ready = [d.tensor for d in batch if isinstance(d, Prepared)]
        bad += len(batch) - len(ready)
        if ready:
            parts.append(pred.logits(torch.stack(ready)))
    if not parts:
        raise DataSetError(f"none of the {len(images)} unlabelled images could be read")
    return np.concatenate(parts), bad


def recalibrate_dataset(
    package_dir: str | Path, ds: LabeledDataset, out: str | Path, *, data_label: str = "", target_sensitivity: float | None = None,
    version: str | None = None, n_boot: int = 1000, ood_train: LabeledDataset | None = None, method: str = "auto",
    unlabelled: list[Path] | list[MedImage] | None = None, unlabelled_label: str = "",
) -> dict[str, Any]:
    """Write the recalibrated package to ``out``; returns a summary (also stored in the new card).

    ``method``: "auto" (chosen by cross-validation on ``ds``) or one of
    :data:`medsight.evaluate.calibration.METHODS`. ``unlabelled``: the site's own images
    without labels; when given, the class priors are re-estimated on them by EM and the
    package reweights its probabilities to them.
    """
    src, dst = Path(package_dir), Path(out)
    _check_output(src, dst)
    pkg = load_package(src)
    card = pkg.card
    if card.task == "multilabel":
        raise UnsupportedTaskError(f"{card.name}: recalibration supports binary and multi-class models")
    if target_sensitivity is not None and not 0 < target_sensitivity < 1:
        raise ValueError("target sensitivity must be between 0 and 1")
    if method != "auto" and method not in METHODS:
        raise ValueError(f"unknown calibration method {method!r}; choose auto or one of {', '.join(METHODS)}")
    if ds.label_names != card.labels:
        raise DataSetError(f"{ds.name}: labels {ds.label_names} do not match the model's {card.labels}")
    if unlabelled is not None and len(unlabelled) == 0:
        raise DataSetError("no unlabelled images given for the prior adaptation")
    pred = load_model(pkg)
    outputs = collect_outputs(pred, ds)
    y = np.asarray(ds.y)[outputs.index].astype(int)
    if len(np.unique(y)) < 2:
        raise DataSetError(f"{ds.name}: only one class present; calibration and a threshold need cases of at least two classes")
    if method == "auto":
        cmap, selection = select_calibration(outputs.logits, y)
    else:
        cmap, selection = fit_calibration(outputs.logits, y, method), {"criterion": "named by the user", "chosen": method}
    old_probs = calibrated_probabilities(outputs.logits, card.calibration)
    new_probs = cmap.apply(outputs.logits)
    raw_probs = calibration_map(Calibration(method="none")).apply(outputs.logits)
    new_cal = Calibration(fitted_on=f"{data_label or ds.name} (local)", nll_before=nll(raw_probs, y), nll_after=nll(new_probs, y),
                          selection=selection, **cmap.params())
    prior = None
    if unlabelled is not None:
        u_logits, n_bad = _unlabelled_logits(pred, list(unlabelled))
        source = np.bincount(y, minlength=card.num_outputs) / len(y)
        if (source == 0).any():
            raise DataSetError(f"{ds.name}: every class needs labelled cases to adapt priors (missing: "
                               f"{[card.labels[i] for i in np.flatnonzero(source == 0)]})")
        target, iters = em_prior_shift(cmap.apply(u_logits), source)
        prior = {"method": "EM (Saerens, Latinne & Decaestecker 2002) on unlabelled local images",
                 "source_priors": [float(v) for v in source], "target_priors": [float(v) for v in target],
                 "fitted_on": unlabelled_label or "unlabelled local images", "n": int(len(u_logits)),
                 "n_unreadable": int(n_bad), "iterations": int(iters)}
        new_cal.prior_shift = prior
    # the operating threshold is chosen on what the package will output (prior shift included: it is monotone
    # for a binary model, so the threshold keeps the sensitivity it was chosen for on the labelled data)
    final_probs = calibrated_probabilities(outputs.logits, new_cal)
    thresholds, rule = _choose_threshold(card, y, final_probs, target_sensitivity)

    new = card.model_copy(deep=True)
    new.version = version or bump_version(card.version)
    new.calibration = new_cal
    new.thresholds = thresholds
    local = bootstrap_metrics(Scorer.for_card(new), y, final_probs, n_boot=n_boot)
    new.validation_metrics = {k: MetricValue(**v) for k, v in local.items()}
    new.test_metrics = {}
    summary = {
        "base_model": f"{card.name}@{card.version}", "base_weights_sha256": card.weights_sha256,
        "data": data_label or ds.name, "n": int(len(y)), "n_unreadable": len(outputs.errors),
        "class_counts": {lab: int(c) for lab, c in zip(card.labels, np.bincount(y, minlength=card.num_outputs))},
        "method": cmap.method, "method_selection": selection, "threshold_rule": rule, "target_sensitivity": target_sensitivity,
        "calibration_before": card.calibration.model_dump(exclude={"selection"}),
        "temperature_before": card.calibration.temperature, "temperature_after": cmap.temperature,
        "ece_before": top_label_ece(old_probs, y), "ece_after": top_label_ece(new_probs, y),
        "prior_shift": prior,
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
        int8_ranges = ((card.runtime or {}).get("int8") or {}).get("calibration_file")
        if int8_ranges and (src / int8_ranges).is_file():
            shutil.copy2(src / int8_ranges, tmp / int8_ranges)
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
    method: str = "auto", unlabelled: list[str | Path] | None = None,
) -> dict[str, Any]:
    """CLI entry: model name/dir + data path; optionally also fit the OOD detector on ``ood_data``/``fit_ood_split``
    and adapt the class priors to ``unlabelled`` (image files and folders, searched recursively)."""
    src = resolve(model)
    labels = load_package(src).card.labels
    ds = load_dataset(data, split, label_names=labels)
    ood_train = load_dataset(ood_data or data, fit_ood_split, label_names=labels) if fit_ood_split else None
    label = f"{data}" + (f":{split}" if split else "")
    files = None
    if unlabelled:
        files = list(unlabelled_files(unlabelled))
    return recalibrate_dataset(src, ds, out, data_label=label, target_sensitivity=target_sensitivity, version=version,
                               n_boot=n_boot, ood_train=ood_train, method=method, unlabelled=files,
                               unlabelled_label=", ".join(str(u) for u in unlabelled or []))


def unlabelled_files(paths: list[str | Path]) -> list[Path]:
    """Image files named directly or found (recursively) in the folders given; a missing path is an error."""
    from medsight.io.readers import is_probably_image

    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            out.extend(f for f in sorted(p.rglob("*")) if f.is_file() and is_probably_image(f))
        elif p.is_file():
            out.append(p)
        else:
            raise DataSetError(f"{p}: no such file or folder (unlabelled images for the prior adaptation)")
    if not out:
        raise DataSetError(f"no image files found in {', '.join(map(str, paths))}")
    return out
