"""``medsight validate``, ``medsight calibrate`` and ``medsight ood fit``: thin wrappers over the library.

Registered in :mod:`medsight.cli` with one line each. Like every MedSight command,
an expected failure prints ``error: ...`` on stderr and exits with code 2.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from medsight.errors import MedSightError

err = Console(stderr=True)
ood_app = typer.Typer(help="Out-of-distribution detector of a model package.", no_args_is_help=True)

ModelOpt = Annotated[str, typer.Option("--model", "-m", help="zoo name or model package directory")]
DataOpt = Annotated[Path, typer.Option("--data", "-d", help=".npz, CSV manifest or class-folder data set")]


def _fail(e: Exception) -> None:
    err.print(f"[red]error:[/red] {e}", markup=True, highlight=False, soft_wrap=True)
    raise typer.Exit(2)


def validate_cmd(
    model: ModelOpt,
    data: DataOpt,
    out: Annotated[Path, typer.Option("--out", "-o", help="folder for report.html and report.json")],
    split: Annotated[Optional[str], typer.Option(help="train | val | test (.npz default: test)")] = None,
    subgroup: Annotated[Optional[list[str]], typer.Option("--subgroup", "-g", help="manifest column (repeatable); derived: age_bin, intensity_tertile")] = None,
    prevalence: Annotated[Optional[float], typer.Option(help="local prevalence (0-1) for alarms per 1,000, PPV and NPV")] = None,
    min_cases: Annotated[int, typer.Option(min=1, help="subgroups with fewer cases are 'too small to judge'")] = 30,
    n_boot: Annotated[int, typer.Option(min=10, help="bootstrap resamples for CIs and bands")] = 1000,
    gallery: Annotated[int, typer.Option(min=0, help="false positives / false negatives shown")] = 6,
    seed: int = 0,
) -> None:
    """Write a self-contained HTML validation report (+ the same numbers as JSON) for a model on labelled data."""
    from pydantic import ValidationError

    from medsight.evaluate.report import ValidationOptions, validate, write_report

    try:
        opts = ValidationOptions(subgroups=subgroup or [], prevalence=prevalence, min_cases=min_cases, n_boot=n_boot,
                                 gallery_size=gallery, seed=seed)
    except ValidationError as e:
        _fail(ValueError("; ".join(f"{'.'.join(map(str, x['loc']))}: {x['msg']}" for x in e.errors())))
    try:
        result = validate(model, data, split, opts)
    except MedSightError as e:
        _fail(e)
    html, js = write_report(result, out)
    for w in result["warnings"]:
        err.print(f"[yellow]warning:[/yellow] {w['text']}", markup=True, highlight=False, soft_wrap=True)
    m = result["metrics"]["values"]
    print(json.dumps({"report": str(html), "json": str(js), "model": result["model"]["id"], "n": result["data"]["n_analysed"],
                      "auc": m["auc"]["value"], "ece": result["calibration"]["after"]["ece"], "warnings": len(result["warnings"])}, indent=2))


def calibrate_cmd(
    model: ModelOpt,
    data: DataOpt,
    out: Annotated[Path, typer.Option("--out", "-o", help="folder for the NEW package (must not exist or be empty)")],
    split: Annotated[Optional[str], typer.Option(help="split of --data to calibrate on")] = "val",
    target_sensitivity: Annotated[Optional[float], typer.Option(help="binary: pick the highest threshold with at least this sensitivity (default: Youden's J)")] = None,
    version: Annotated[Optional[str], typer.Option(help="version of the new package (default: next minor)")] = None,
    n_boot: Annotated[int, typer.Option(min=10)] = 1000,
    fit_ood: Annotated[bool, typer.Option("--fit-ood", help="also fit an OOD detector (on --ood-split; threshold on --split)")] = False,
    ood_data: Annotated[Optional[Path], typer.Option(help="data for the OOD fit (default: --data)")] = None,
    ood_split: Annotated[str, typer.Option(help="split of the OOD data to fit on")] = "train",
    method: Annotated[str, typer.Option(help="auto (5-fold cross-validation on the calibration data) | temperature | "
                                             "temperature-bias | vector | isotonic")] = "auto",
    adapt_priors: Annotated[Optional[list[Path]], typer.Option(
        "--adapt-priors", help="unlabelled local images (files or folders; repeatable): re-estimate the class mix there "
                               "by EM and adapt the probabilities to it")] = None,
) -> None:
    """Recalibrate on local data and write a new model package version (never overwrites the original)."""
    from medsight.evaluate.recalibrate import recalibrate

    try:
        summary = recalibrate(model, data, out, split=split, target_sensitivity=target_sensitivity, version=version,
                              n_boot=n_boot, fit_ood_split=ood_split if fit_ood else None, ood_data=ood_data,
                              method=method, unlabelled=adapt_priors)
    except (MedSightError, ValueError) as e:
        _fail(e)
    keys = ("base_model", "data", "n", "method", "temperature_before", "temperature_after", "ece_before", "ece_after",
            "prior_shift", "threshold_rule", "thresholds_before", "thresholds_after")
    print(json.dumps({"package": str(out), **{k: summary[k] for k in keys}}, indent=2))


@ood_app.command("fit")
def ood_fit_cmd(
    package: Annotated[Path, typer.Option("--model", "-m", help="model package DIRECTORY to add the detector to (written in place)")],
    data: DataOpt,
    split: Annotated[Optional[str], typer.Option(help="split to fit on (in-distribution training images)")] = "train",
    val_split: Annotated[Optional[str], typer.Option(help="validation split, part of the threshold set ('' = none: cross-fit uses "
                                                      "the out-of-fold scores alone, val holds out 20 percent of the fit split)")] = "val",
    flag_rate: Annotated[float, typer.Option(min=0.0, max=0.5, help="share of threshold-set images allowed to be flagged")] = 0.01,
    image_statistics: Annotated[bool, typer.Option("--image-statistics", help="also score image-level statistics "
                                                   "(colour, grey-level histogram) next to the network's layer statistics")] = False,
    threshold_rule: Annotated[str, typer.Option(help="threshold set: 'cross-fit' = out-of-fold scores of the fit split pooled "
                                                     "with the validation split; 'val' = the validation split alone")] = "cross-fit",
    folds: Annotated[int, typer.Option(min=2, help="folds of the fit split for the cross-fitted threshold")] = 10,
) -> None:
    """Fit the out-of-distribution detector and store it in the package (ood.safetensors + card.ood).

    The threshold flags at most --flag-rate of the threshold set; by default that set is the
    fit split's out-of-fold scores (each image scored by a detector fitted on the other folds)
    pooled with the validation split, far larger than a small validation split alone, and the
    stored detector is one of the fold detectors (fitted on all folds but one)."""
    from medsight.io.datasets import load_dataset
    from medsight.models.package import read_card
    from medsight.evaluate.ood_fit import fit_ood
    from medsight.predict.ood import BLOCKS, LAYERS

    if not package.is_dir():
        _fail(ValueError(f"{package}: not a package directory; to add a detector to a zoo model, use "
                         "'medsight calibrate --fit-ood --out NEW' which writes a new package"))
    try:
        labels = read_card(package).labels
        train = load_dataset(data, split, label_names=labels)
        val = load_dataset(data, val_split, label_names=labels) if val_split else None
        info = fit_ood(package, train, val, val_flag_rate=flag_rate, blocks=BLOCKS if image_statistics else LAYERS,
                       threshold_rule=threshold_rule, folds=folds)
    except (MedSightError, ValueError) as e:
        _fail(e)
    print(json.dumps({"package": str(package), **info}, indent=2))
