"""``medsight`` command line: thin wrappers over the library.

Every command maps MedSight errors to a one-line ``error:`` message on stderr and
exit code 2; a batch in which some inputs failed exits with 1 after reporting them.
Machine-readable output goes to stdout, progress and messages to stderr.
"""

from __future__ import annotations

import csv
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer
from rich.console import Console

from medsight.errors import MedSightError
from medsight.predict.settings import prefer_sleeping_openmp_threads

if TYPE_CHECKING:
    from rich.progress import Progress

prefer_sleeping_openmp_threads()  # before any command imports torch (medsight.predict.settings)

app = typer.Typer(help="MedSight: offline medical image classification with calibrated probabilities and heat maps.",
                  no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False)
out = Console()
err = Console(stderr=True)

ModelOpt = Annotated[str, typer.Option("--model", "-m", help="zoo name or model package directory")]


def _fail(e: Exception, code: int = 2) -> None:
    err.print(f"[red]error:[/red] {e}", markup=True, highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def _progress() -> Progress:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=err, transient=True, disable=not err.is_terminal)


def _expand(paths: list[Path]) -> Iterator[Path]:
    from medsight.io.readers import is_probably_image

    for p in paths:
        if p.is_dir():
            yield from (f for f in sorted(p.rglob("*")) if f.is_file() and is_probably_image(f))
        else:
            yield p


@app.command("models")
def models_cmd(as_json: Annotated[bool, typer.Option("--json", help="JSON list on stdout")] = False) -> None:
    """List the model zoo with modality, labels and measured test performance."""
    from medsight.models.registry import zoo_summary  # the cards' JSON only: no weights, no torch

    rows = zoo_summary()
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    from rich.table import Table

    t = Table(title="MedSight model zoo")
    for c in ("name", "modality", "task", "labels", "input", "test AUC", "test ACC"):
        t.add_column(c)
    for r in rows:
        fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
        t.add_row(r["name"], r["modality"], r["task"], ", ".join(r["labels"]), f'{r["input_size"]}px', fmt(r["test_auc"]), fmt(r["test_accuracy"]))
    out.print(t)


@app.command("predict")
def predict_cmd(
    paths: Annotated[list[Path], typer.Argument(help="image files or folders (DICOM, PNG, JPEG, TIFF, NIfTI)")],
    model: Annotated[Optional[str], typer.Option("--model", "-m", help="zoo name or model package directory (default: each DICOM file goes to the model whose card it fits, docs/routing.md; other files need --model)")] = None,
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="folder for heat-map overlays")] = Path("medsight-out"),
    fmt: Annotated[str, typer.Option("--format", "-f", help="table | json | csv")] = "table",
    as_json: Annotated[bool, typer.Option("--json", help="same as --format json (one JSON object per line)")] = False,
    heatmap: Annotated[bool, typer.Option("--heatmap/--no-heatmap", help="compute and save Grad-CAM overlays")] = True,
    batch_size: Annotated[int, typer.Option(min=1)] = 16,
    backend: Annotated[str, typer.Option(help="torch | onnx | onnx-int8 | auto (the fastest backend that met the accuracy rule, recorded in the card)")] = "auto",
    engine: Annotated[str, typer.Option(help="local | ray (Ray Data over one SOURCE: folder, CSV manifest or .npz; results to OUT/results.parquet+csv)")] = "local",
    address: Annotated[Optional[str], typer.Option(help="--engine ray: address of an existing Ray cluster (default: start a local one)")] = None,
    workers: Annotated[int, typer.Option(min=1, help="--engine ray: actors in the pool, one model copy each")] = 1,
) -> None:
    """Classify images; print findings with calibrated probabilities and a confidence statement."""
    from medsight.explain.overlay import OverlayWriter
    from medsight.predict.load import load_model
    from medsight.predict.result import PredictionError
    from medsight.predict.settings import available_cores

    from medsight.cli.routing import applicability_notes, route_inputs

    if engine != "local":
        from medsight.cli.scale import run_engine_cmd

        if model is None:
            _fail(ValueError("--engine ray needs --model (routing reads each DICOM header: use --engine local)"))
        return run_engine_cmd(engine, paths, model, backend, out_dir, heatmap, batch_size, address, workers, err)

    fmt = "json" if as_json else fmt
    if fmt not in ("table", "json", "csv"):
        _fail(ValueError(f"--format must be table, json or csv, not {fmt!r}"))
    if model is not None:
        try:
            predictor = load_model(model, backend=backend)
        except MedSightError as e:
            _fail(e)
    files = list(_expand(paths))
    if not files:
        _fail(ValueError("no input images found"))
    # without --model each DICOM file goes to the model it fits (or none: a per-file "not analysed" error)
    groups, refused = ({model: files}, []) if model is not None else route_inputs(files)
    rows, failed, tables, n = list(refused), len(refused), [], 0
    for row in refused:
        err.print(f"[yellow]{Path(row['path']).name}:[/yellow] {row['error']}", highlight=False, soft_wrap=True)
        if fmt == "json":
            print(json.dumps(row), flush=True)

    def emit(done: list[dict]) -> None:  # rows whose overlay is on disk, in input order
        for row in done:
            bar.advance(task)
            rows.append(row)
            group_rows.append(row)
            if fmt == "json":
                print(json.dumps(row), flush=True)

    for name, group in groups.items():
        if model is None:
            try:
                predictor = load_model(name, backend=backend)
            except MedSightError as e:
                _fail(e)
        # an operator's --model runs outside its declared use, but says so (docs/routing.md)
        notes = applicability_notes(predictor.card, group) if model is not None else {}
        for path, note in notes.items():
            err.print(f"[yellow]warning:[/yellow] {Path(path).name}: {note}", highlight=False, soft_wrap=True)
        group_rows: list[dict] = []
        # overlays are written in background threads while the next batches are classified
        with _progress() as bar, OverlayWriter(available_cores(), max_pending=2 * batch_size) as overlays:
            task = bar.add_task("predicting", total=len(group))
            for res in predictor.stream(group, explain=heatmap, batch_size=batch_size):  # decoding overlaps inference
                i, n = n, n + 1
                note = {"applicability": notes[str(res.source)]} if str(res.source) in notes else {}
                if isinstance(res, PredictionError):
                    failed += 1
                    emit(overlays.put(res.to_dict()))
                elif res.heatmap is not None and res.image is not None:
                    path = out_dir / f"{i:04d}_{Path(str(res.source)).stem}_overlay.png"
                    emit(overlays.put(res.to_dict(heatmap_path=str(path)) | note, res.image, res.heatmap, path))
                else:
                    emit(overlays.put(res.to_dict() | note))
            emit(overlays.drain())
        tables.append((predictor.card.labels, group_rows))
    if fmt == "table":
        for labels, group_rows in tables:
            _print_prediction_table(group_rows, labels)
        if refused:
            _print_prediction_table(refused, [])
    elif fmt == "csv":
        _write_csv(rows, list(dict.fromkeys(lab for labels, _ in tables for lab in labels)))
    if failed:
        err.print(f"{failed} of {len(files)} inputs could not be analysed (see 'error' entries)")
        raise typer.Exit(1)


def _print_prediction_table(rows: list[dict], labels: list[str]) -> None:
    from rich.table import Table

    from medsight.models.policy import reported_finding

    t = Table(show_lines=False)
    t.add_column("file")
    t.add_column("finding")
    for lab in labels:
        t.add_column(f"P({lab})", justify="right")
    t.add_column("confidence statement")
    for r in rows:
        name = Path(str(r["path"])).name
        if "error" in r:
            t.add_row(name, "[red]ERROR[/red]", *[""] * len(labels), r["error"])
        else:
            style = "yellow" if r["refer"] else "green"
            finding = reported_finding(r["label"], r["refer"]) or "refer to a human"  # never a label where none is reported
            t.add_row(name, f"[{style}]{finding}[/{style}]", *[f"{r['probabilities'][lab]:.3f}" for lab in labels], r["statement"])
    out.print(t)


def _write_csv(rows: list[dict], labels: list[str]) -> None:
    w = csv.writer(sys.stdout)
    w.writerow(["path", "label", *[f"p_{lab}" for lab in labels], "confidence", "refer", "heatmap", "error"])
    for r in rows:
        probs = r.get("probabilities", {})
        w.writerow([r["path"], r.get("label", ""), *[probs.get(lab, "") for lab in labels], r.get("confidence", ""),
                    r.get("refer", ""), r.get("heatmap", ""), r.get("error", "")])


@app.command("explain")
def explain_cmd(
    paths: Annotated[list[Path], typer.Argument(help="image files or folders")],
    model: ModelOpt = "pneumonia-cxr",
    out_dir: Annotated[Path, typer.Option("--out", "-o")] = Path("medsight-out"),
    alpha: Annotated[float, typer.Option(min=0.0, max=1.0, help="overlay opacity")] = 0.45,
) -> None:
    """Write Grad-CAM overlay and raw heat-map PNGs at each image's own resolution."""
    from medsight.predict.load import load_model
    from medsight.explain.overlay import save_heatmap, save_overlay
    from medsight.predict.result import PredictionError

    try:
        predictor = load_model(model)
    except MedSightError as e:
        _fail(e)
    failed = 0
    for i, res in enumerate(predictor.stream(list(_expand(paths)), explain=True)):
        if isinstance(res, PredictionError):
            failed += 1
            err.print(f"[red]error:[/red] {res.error}")
            continue
        stem = f"{i:04d}_{Path(str(res.source)).stem}"
        o = save_overlay(res.image, res.heatmap, out_dir / f"{stem}_overlay.png", alpha)
        h = save_heatmap(res.heatmap, out_dir / f"{stem}_heatmap.png")
        out.print(f"{res.source}: heat map for '{res.heatmap_label}' -> {o} , {h}", highlight=False)
    if failed:
        raise typer.Exit(1)


@app.command("evaluate")
def evaluate_cmd(
    model: ModelOpt,
    data: Annotated[Path, typer.Option("--data", "-d", help=".npz, CSV manifest or class-folder data set")],
    split: Annotated[Optional[str], typer.Option(help="train | val | test (.npz default: test)")] = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
    n_boot: Annotated[int, typer.Option(min=0, help="bootstrap resamples for 95% CIs")] = 1000,
    seed: int = 0,
    save: Annotated[Optional[Path], typer.Option("--save", help="also write the JSON here")] = None,
) -> None:
    """Clinical metrics with 95% bootstrap CIs on a labelled data set."""
    from medsight.evaluate.run import evaluate

    try:
        result = evaluate(model, data, split=split, n_boot=n_boot, seed=seed)
    except MedSightError as e:
        _fail(e)
    if save:
        save.parent.mkdir(parents=True, exist_ok=True)
        save.write_text(json.dumps(result, indent=2))
    if as_json:
        print(json.dumps(result, indent=2))
        return
    from rich.table import Table

    t = Table(title=f"{result['model']} on {result['data']} (n={result['n']})")
    t.add_column("metric")
    t.add_column("value", justify="right")
    t.add_column("95% CI", justify="right")
    for m in result["metric_names"]:
        v = result[m]
        val = "not computable" if v["value"] is None else f"{v['value']:.3f}"
        ci = "-" if not v["ci"] else f"{v['ci'][0]:.3f} - {v['ci'][1]:.3f}"
        t.add_row(m, val, ci)
    out.print(t)


@app.command("train")
def train_cmd(
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="folder for the new model package")],
    data: Annotated[Optional[Path], typer.Option("--data", "-d", help=".npz, CSV manifest or class folders")] = None,
    recipe: Annotated[Optional[Path], typer.Option(help="training recipe JSON (reproduces a zoo model)")] = None,
    data_root: Annotated[Path, typer.Option(help="folder that recipe data paths are relative to")] = Path("../shared/data"),
    base: Annotated[Optional[str], typer.Option(help="zoo model or package to fine-tune")] = None,
    name: Annotated[Optional[str], typer.Option(help="name of the new model (default: the output folder name)")] = None,
    epochs: Annotated[Optional[int], typer.Option(min=1)] = None,
    batch_size: Annotated[Optional[int], typer.Option(min=1)] = None,
    lr: Annotated[Optional[float], typer.Option()] = None,
    size: Annotated[Optional[int], typer.Option(help="input size when training from scratch")] = None,
    seed: int = 0,
    resume: Annotated[bool, typer.Option(help="continue from the checkpoint in --out")] = False,
) -> None:
    """Train from scratch or fine-tune, and write a model package with its card."""
    from medsight.train.service import train

    if (data is None) == (recipe is None):
        _fail(ValueError("give exactly one of --data or --recipe"))
    with _progress() as bar:
        task = bar.add_task("training", total=epochs)

        def on_epoch(r) -> None:
            bar.update(task, total=r.epochs, completed=r.epoch, description=f"epoch {r.epoch}/{r.epochs} val {r.val_score:.3f}")
            err.print(f"epoch {r.epoch:3d}/{r.epochs}  train loss {r.train_loss:.4f}  val loss {r.val_loss:.4f}  "
                      f"val score {r.val_score:.4f}{'  *best' if r.best else ''}  ({r.seconds:.1f}s)", highlight=False)

        try:
            pkg = train(out_dir=out_dir, data=data, recipe=recipe, data_root=data_root, base=base, name=name, epochs=epochs,
                        batch_size=batch_size, lr=lr, size=size, seed=seed, resume=resume, on_epoch=on_epoch)
        except MedSightError as e:
            _fail(e)
    c = pkg.card
    msg = {"package": str(out_dir), "name": c.name, "version": c.version, "labels": c.labels,
           "temperature": c.calibration.temperature, "thresholds": c.thresholds,
           "val": {k: v.value for k, v in c.validation_metrics.items()},
           "test": {k: v.value for k, v in c.test_metrics.items()} or None}
    print(json.dumps(msg, indent=2))


@app.command("demo")
def demo_cmd(out_dir: Annotated[Path, typer.Option("--out", "-o")] = Path("demo-output")) -> None:
    """Classify the bundled sample studies with the shipped models; write overlays and an HTML summary."""
    from medsight.cli.demo import run_demo

    try:
        run_demo(out_dir, out)
    except MedSightError as e:
        _fail(e)


from medsight.cli.dicom import deid_cmd, dicom_app  # noqa: E402  (hospital integration commands)
app.command("deid")(deid_cmd)
app.add_typer(dicom_app, name="dicom")


from medsight.cli.serve import audit_app, db_app, export_reviews_cmd, serve_cmd, storage_app, users_app, worker_cmd  # noqa: E402  (clinical service)
app.command("serve")(serve_cmd)
app.command("worker")(worker_cmd)
app.add_typer(users_app, name="users")
app.add_typer(audit_app, name="audit")
app.add_typer(storage_app, name="storage")
app.command("export-reviews")(export_reviews_cmd)
app.add_typer(db_app, name="db")


from medsight.cli.evaluate import calibrate_cmd, ood_app, validate_cmd  # noqa: E402  (validation, recalibration, OOD)
app.command("validate")(validate_cmd)
app.command("calibrate")(calibrate_cmd)
app.add_typer(ood_app, name="ood")


from medsight.cli.runtime import runtime_app  # noqa: E402  (fast inference backends)
app.add_typer(runtime_app, name="runtime")


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    app()
