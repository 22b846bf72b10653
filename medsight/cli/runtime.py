"""``medsight runtime ...``: build, tune and inspect the fast-inference backends of a model."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from medsight.errors import MedSightError

runtime_app = typer.Typer(help="Fast CPU inference: ONNX export, int8 quantisation, backend choice.", no_args_is_help=True)
_err = Console(stderr=True)


def _fail(e: Exception) -> None:
    _err.print(f"[red]error:[/red] {e}", markup=True, highlight=False, soft_wrap=True)
    raise typer.Exit(2)


@runtime_app.command("tune")
def tune_cmd(
    model: Annotated[str, typer.Argument(help="zoo name or model package directory (its card is updated)")],
    data_root: Annotated[Path, typer.Option(help="folder the recipe's data paths are relative to")] = Path("../shared/data"),
    recipe: Annotated[Optional[Path], typer.Option(help="training recipe (default: recipes/<model name>.json)")] = None,
    calibration_images: Annotated[int, typer.Option(min=8, help="training images used to measure int8 ranges")] = 256,
    threads: Annotated[Optional[int], typer.Option(min=1, help="inference threads while timing (default: all cores)")] = None,
    dry_run: Annotated[bool, typer.Option(help="measure and print, but do not write the card")] = False,
) -> None:
    """Measure torch / onnx / onnx-int8 on the official test split and record the fastest that keeps accuracy."""
    from medsight.models.package import read_card
    from medsight.models.registry import resolve
    from medsight.predict.settings import RuntimeSettings
    from medsight.evaluate.tune import TuneConfig, tune
    from medsight.train.recipe import Recipe, recipe_splits

    try:
        d = resolve(model)
        name = read_card(d).name
        rpath = recipe or Path("recipes") / f"{name}.json"
        if not rpath.is_file():
            raise FileNotFoundError(f"{rpath}: recipe not found (pass --recipe)")
        splits = recipe_splits(Recipe.load(rpath).data, data_root)
        settings = RuntimeSettings() if threads is None else RuntimeSettings().with_threads(threads)
        rt = tune(d, splits["train"], splits["test"], settings, TuneConfig(calibration_images=calibration_images), write=not dry_run)
    except (MedSightError, FileNotFoundError) as e:
        _fail(e)
    shown = {k: v for k, v in rt.items() if k != "int8"} | {"int8": {k: v for k, v in rt["int8"].items() if k != "calibration"}}
    print(json.dumps(shown, indent=2))


@runtime_app.command("export")
def export_cmd(
    model: Annotated[str, typer.Argument(help="zoo name or model package directory")],
    backend: Annotated[str, typer.Option(help="onnx | onnx-int8")] = "onnx",
) -> None:
    """Build (or find) the cached ONNX file of a model and print its path."""
    from medsight.models.registry import load
    from medsight.predict.cache import int8_model_path, onnx_model_path
    from medsight.predict.settings import RuntimeSettings

    if backend not in ("onnx", "onnx-int8"):
        _fail(ValueError(f"--backend must be onnx or onnx-int8, not {backend!r}"))
    try:
        pkg = load(model)
        path = onnx_model_path(pkg, RuntimeSettings()) if backend == "onnx" else int8_model_path(pkg, RuntimeSettings())
    except MedSightError as e:
        _fail(e)
    print(path)


@runtime_app.command("show")
def show_cmd(model: Annotated[str, typer.Argument(help="zoo name or model package directory")]) -> None:
    """What ``--backend auto`` means for a model, and the measurements behind it."""
    from medsight.models.package import read_card
    from medsight.models.registry import resolve
    from medsight.predict.backends import recorded_choice

    try:
        card = read_card(resolve(model))
    except MedSightError as e:
        _fail(e)
    choice, reason = recorded_choice(card)
    rt = card.runtime or {}
    print(json.dumps({"model": card.name, "auto": choice, "reason": reason, "candidates": rt.get("candidates"),
                      "machine": rt.get("machine")}, indent=2))
