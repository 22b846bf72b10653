"""``medsight predict --engine ray SOURCE``: the CLI side of :mod:`medsight.scale`.

Kept here so ``medsight/cli/main.py`` only hands over its options; the command prints a
JSON summary on stdout (results go to ``OUT/results.parquet`` and ``OUT/results.csv``)
and exits 1 when some inputs could not be analysed, 2 on a usage or setup error.
"""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from medsight.errors import MedSightError
from medsight.scale.engine import BatchJob, RayOptions, run_ray

ENGINES = ("local", "ray")


def run_engine_cmd(engine: str, paths: list[Path], model: str, backend: str, out_dir: Path, heatmap: bool,
                   batch_size: int, address: str | None, workers: int, err: Console) -> None:
    """Run a batch engine other than the default in-process one and report on stdout."""

    def fail(msg: str) -> None:
        err.print(f"[red]error:[/red] {msg}", markup=True, highlight=False, soft_wrap=True)
        raise typer.Exit(2)

    if engine not in ENGINES:
        fail(f"--engine must be one of {', '.join(ENGINES)}, not {engine!r}")
    if len(paths) != 1:
        fail("--engine ray takes exactly one SOURCE: a folder, a CSV manifest (.csv with a 'path' column) or an .npz")
    job = BatchJob(source=paths[0], model=model, out_dir=out_dir, backend=backend, heatmaps=heatmap, batch_size=batch_size)
    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                        console=err, transient=True, disable=not err.is_terminal)
    with progress:
        task = progress.add_task("predicting (ray)", total=None)
        try:
            summary = run_ray(job, RayOptions(address=address, workers=workers, progress=err.is_terminal),
                              on_progress=lambda done, total: progress.update(task, completed=done, total=total))
        except MedSightError as e:
            fail(str(e))
    print(json.dumps({"engine": summary.engine, "n": summary.n, "failed": summary.failed, "seconds": round(summary.seconds, 3),
                      "images_per_second": round(summary.images_per_second, 2), "parquet": str(summary.parquet),
                      "csv": str(summary.csv), **summary.extra}, indent=2))
    if summary.failed:
        err.print(f"{summary.failed} of {summary.n} inputs could not be analysed (see the 'error' column)")
        raise typer.Exit(1)
