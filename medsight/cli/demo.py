"""The README's main job: classify the bundled sample studies with the shipped models.

Writes heat-map overlays (PNG) and a one-page HTML summary to an output folder,
and prints a findings table. Everything runs offline from files in the package
(and DICOM files of the installed ``pydicom-data`` package).
"""

from __future__ import annotations

import html
import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from jinja2 import Environment, PackageLoader, select_autoescape
from rich.console import Console
from rich.table import Table

from medsight.errors import MedSightError
from medsight.explain.overlay import save_overlay
from medsight.io.samples import sample_entries, sample_path
from medsight.models.policy import reported_finding
from medsight.predict.load import load_model
from medsight.predict.predictor import Predictor

def run_demo(out_dir: Path, console: Console | None = None) -> list[dict[str, Any]]:
    console = console or Console()
    out_dir.mkdir(parents=True, exist_ok=True)
    entries = sample_entries()
    predictors: dict[str, Predictor] = {}
    rows: list[dict[str, Any]] = []
    for i, e in enumerate(entries):
        name = e["model"]
        if name not in predictors:
            predictors[name] = load_model(name)
        path = sample_path(e)
        row: dict[str, Any] = {"sample": path.name, "model": name, "truth": e.get("truth"), "note": e.get("note", ""),
                               "source": e.get("source", ""), "licence": e.get("licence", "")}
        try:
            pred = predictors[name].predict(path)
        except MedSightError as err:
            row.update(error=str(err))
            rows.append(row)
            continue
        overlay = save_overlay(pred.image, pred.heatmap, out_dir / "overlays" / f"{i:02d}_{path.stem}.png")
        row.update(pred.to_dict(heatmap_path=str(overlay.relative_to(out_dir))), sample=path.name)
        rows.append(row)
    _print_table(rows, console)
    _write_html(rows, predictors, out_dir)
    (out_dir / "results.json").write_text(json.dumps(rows, indent=2))
    console.print(f"\nOverlays: {out_dir / 'overlays'}\nSummary:  {out_dir / 'summary.html'}", highlight=False)
    return rows


def _print_table(rows: list[dict[str, Any]], console: Console) -> None:
    t = Table(title="MedSight demo: bundled sample studies")
    for c in ("sample", "model", "truth", "finding", "probabilities (calibrated)", "confidence statement"):
        t.add_column(c, overflow="fold")
    for r in rows:
        if "error" in r:
            t.add_row(r["sample"], r["model"], r["truth"] or "-", "[red]error[/red]", "", html.escape(r["error"]))
            continue
        probs = "  ".join(f"{k} {v:.2f}" for k, v in r["probabilities"].items())
        colour = "yellow" if r["refer"] else "green"
        finding = reported_finding(r["label"], r["refer"]) or "refer to a human"  # never a label where none is reported
        t.add_row(r["sample"], r["model"], r["truth"] or "-", f"[{colour}]{finding}[/{colour}]", probs, r["statement"])
    console.print(t)


def _write_html(rows: list[dict[str, Any]], predictors: dict[str, Predictor], out_dir: Path) -> None:
    env = Environment(loader=PackageLoader("medsight", "templates"), autoescape=select_autoescape())
    cards = {n: p.card for n, p in predictors.items()}
    page = env.get_template("summary.html").render(
        rows=rows, cards=cards, generated=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"))
    (out_dir / "summary.html").write_text(page)
