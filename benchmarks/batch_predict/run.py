"""Whole-process batch prediction of a folder, against the decode + resize floor, in one run.

Rows, each one ``medsight predict FOLDER --model MODEL --json > /dev/null`` as a user runs
it (a fresh process from a fresh working folder, default options: heat-map overlays written
to ``./medsight-out``), timed from spawn to exit:

* ``--backend auto`` and ``--backend torch``;
* the same two with ``--no-heatmap``.

The floor, measured in the same run: every file read with MedSight's reader
(:func:`medsight.io.readers.read_image`) and resized to the model's input with its
preprocessing (:func:`medsight.models.preprocess.to_tensor`), in as many threads as the
cores the predict command may use, nothing else. Rows and the floor are interleaved over
``--repeats`` so that load from other jobs hits them alike; medians are reported.

Beside them, what one image costs in CPU time on one thread (median over ``--cost-images``
files): reading it, resizing it, and drawing + PNG-encoding its heat-map overlay
(:func:`medsight.explain.overlay.save_overlay`), which is what the default options add.

Targets (MedSight architecture issue), default options: ``auto`` >= 3x the images/s of
``torch`` as a whole process, and >= 50% of the floor's images/s.
Writes ``results.json`` and ``results.md`` next to this file (or ``--out``).
Usage: .venv/bin/python benchmarks/batch_predict/run.py [--data-root ../shared/data] [--limit N] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from benchmarks.results import write_results  # noqa: E402
from medsight.evaluate.tune import cpu_model  # noqa: E402
from medsight.explain.overlay import save_overlay  # noqa: E402
from medsight.io.readers import is_probably_image, read_image  # noqa: E402
from medsight.models.package import read_card  # noqa: E402
from medsight.models.preprocess import to_tensor  # noqa: E402
from medsight.models.registry import resolve  # noqa: E402
from medsight.predict.load import load_model  # noqa: E402
from medsight.predict.settings import available_cores  # noqa: E402

MEDSIGHT = str(Path(sys.executable).with_name("medsight"))
FOLDER = "ham10000_subset224/images"
ROWS = {  # name -> extra options of ``medsight predict``
    "auto": ["--backend", "auto"],
    "torch": ["--backend", "torch"],
    "auto --no-heatmap": ["--backend", "auto", "--no-heatmap"],
    "torch --no-heatmap": ["--backend", "torch", "--no-heatmap"],
}
TARGET_X_TORCH = 3.0
TARGET_OF_FLOOR = 0.5


def image_files(folder: Path, limit: int | None) -> list[Path]:
    files = sorted(f for f in folder.rglob("*") if f.is_file() and is_probably_image(f))
    return files[:limit] if limit else files


def subset_folder(files: list[Path], into: Path) -> Path:
    """A folder of links to ``files`` (``--limit``): the command is then run on a folder, as a user would."""
    into.mkdir(parents=True)
    for f in files:
        (into / f.name).symlink_to(f)
    return into


def floor_rate(files: list[Path], model: str, threads: int) -> float:
    """Images/s of read + resize alone, in ``threads`` threads (torch kept to one thread each, as in a decode thread)."""
    spec = read_card(resolve(model)).input
    torch.set_num_threads(1)
    t = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        for _ in pool.map(lambda f: to_tensor(read_image(f), spec), files, chunksize=16):
            pass
    return len(files) / (time.perf_counter() - t)


def cpu_ms(fn, items: list) -> float:
    """Median CPU time (ms, this thread) of ``fn(item)``."""
    times = []
    for item in items:
        t = time.thread_time()
        fn(item)
        times.append((time.thread_time() - t) * 1e3)
    return statistics.median(times)


def per_image_costs(files: list[Path], model: str, tmp: Path) -> dict[str, float]:
    """CPU ms of each step for one image on one thread: read, resize, overlay (draw + encode + write)."""
    spec = read_card(resolve(model)).input
    torch.set_num_threads(1)
    images = [read_image(f) for f in files]
    predictions = list(load_model(model).stream(files, workers=0))  # the heat maps the command would draw
    return {
        "read_ms": round(cpu_ms(read_image, files), 3),
        "resize_ms": round(cpu_ms(lambda im: to_tensor(im, spec), images), 3),
        "overlay_ms": round(cpu_ms(lambda r: save_overlay(r.image, r.heatmap, tmp / f"{id(r)}.png"), predictions), 3),
    }


def predict_wall_s(folder: Path, model: str, options: list[str], workdir: Path) -> tuple[float, int]:
    """(wall seconds, bytes of overlays written) of one whole ``medsight predict`` process."""
    workdir.mkdir(parents=True)
    cmd = [MEDSIGHT, "predict", str(folder), "--model", model, "--json", *options]
    t = time.perf_counter()
    subprocess.run(cmd, cwd=workdir, stdout=subprocess.DEVNULL, check=True)
    wall = time.perf_counter() - t
    out = workdir / "medsight-out"
    return wall, sum(f.stat().st_size for f in out.iterdir()) if out.is_dir() else 0


def markdown(res: dict[str, Any]) -> str:
    m, n = res["machine"], res["images"]
    lines = [
        "# Batch prediction of a folder, whole process",
        "",
        f"Measured {res['date']} on {m['cpu']}, {m['cores']} cores (1-minute load average {m['load_average_start']} at "
        f"start, {m['load_average_end']} at end; the machine is shared and the run keeps both cores busy). Run: "
        f"`{res['command']}` ({res['seconds']:.0f} s).",
        "",
        f"{n} images of `{res['folder']}`, model `{res['model']}`; each row is `medsight predict FOLDER --model "
        f"{res['model']} --json > /dev/null` plus the options shown, a fresh process from a fresh folder (so heat-map "
        f"overlays go to `./medsight-out`), timed spawn to exit; median of {res['repeats']} interleaved repeats.",
        "",
        "| row | wall s (median) | images/s | x torch (same heat-map setting) | % of the decode + resize floor | overlays MiB |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in res["rows"].items():
        lines.append(f"| `{name}` | {r['wall_s']} | {r['images_per_s']} | {r['x_torch']} | {r['of_floor']:.0%} | "
                     f"{r['overlay_bytes'] / 2**20:.1f} |")
    f, c = res["floor"], res["per_image_cpu_ms"]
    lines += [
        "",
        f"Floor: read + resize alone (`read_image` + `to_tensor`, {f['threads']} threads, the cores `medsight predict` "
        f"may use): **{f['images_per_s']} images/s** (median; runs {f['runs']}).",
        "",
        "CPU time of one image on one thread (median of "
        f"{res['cost_images']} files): read {c['read_ms']} ms, resize to the model's input {c['resize_ms']} ms, "
        f"heat-map overlay drawn, PNG-encoded and written {c['overlay_ms']} ms.",
        "",
        "## Targets (default options, i.e. the `auto` and `torch` rows)",
        "",
    ]
    for name, t in res["targets"].items():
        lines.append(f"* {name}: {t['value']} (target >= {t['target']}), {'met' if t['met'] else 'missed'}")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-root", type=Path, default=ROOT.parent / "shared" / "data")
    ap.add_argument("--folder", type=Path, default=None, help=f"image folder (default: DATA_ROOT/{FOLDER})")
    ap.add_argument("--model", default="skin-lesion-ham")
    ap.add_argument("--limit", type=int, default=None, help="only the first N images (sorted by name): a quick run")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--cost-images", type=int, default=200, help="files the per-image CPU costs are measured on")
    ap.add_argument("--out", type=Path, default=HERE)
    args = ap.parse_args()
    folder = args.folder or args.data_root / FOLDER
    files = image_files(folder, args.limit)
    threads = available_cores()
    load_start, started = round(os.getloadavg()[0], 2), time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="medsight-batch-") as tmp:
        tmp = Path(tmp)
        target = subset_folder(files, tmp / "images") if args.limit else folder
        floor_rate(files, args.model, threads)  # untimed: files in the page cache
        for name, options in ROWS.items():  # untimed, one image: ONNX files built into the cache if missing
            subprocess.run([MEDSIGHT, "predict", str(files[0]), "--model", args.model, "--json", *options],
                           cwd=tmp, stdout=subprocess.DEVNULL, check=True)
        walls: dict[str, list[float]] = {name: [] for name in ROWS}
        overlay: dict[str, int] = {}
        floors: list[float] = []
        costs = per_image_costs(files[: args.cost_images], args.model, tmp / "costs")
        for rep in range(args.repeats):
            floors.append(floor_rate(files, args.model, threads))
            for name, options in ROWS.items():
                wall, overlay[name] = predict_wall_s(target, args.model, options, tmp / f"run-{rep}-{name.replace(' ', '')}")
                walls[name].append(wall)
    n, floor = len(files), statistics.median(floors)
    rate = {name: n / statistics.median(w) for name, w in walls.items()}
    rows = {}
    for name, w in walls.items():
        ref = "torch" + name.removeprefix("auto").removeprefix("torch")
        rows[name] = {"wall_s": round(statistics.median(w), 2), "runs_s": [round(x, 2) for x in w],
                      "images_per_s": round(rate[name], 1), "x_torch": round(rate[name] / rate[ref], 2),
                      "of_floor": round(rate[name] / floor, 3), "overlay_bytes": overlay[name]}
    targets = {
        "auto vs torch, whole process (x)": {"value": rows["auto"]["x_torch"], "target": TARGET_X_TORCH,
                                             "met": rows["auto"]["x_torch"] >= TARGET_X_TORCH},
        "auto, share of the floor's images/s": {"value": rows["auto"]["of_floor"], "target": TARGET_OF_FLOOR,
                                                "met": rows["auto"]["of_floor"] >= TARGET_OF_FLOOR},
    }
    command = "python benchmarks/batch_predict/run.py" + (f" --limit {args.limit}" if args.limit else "") + \
        (f" --repeats {args.repeats}" if args.repeats != 3 else "")
    res = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "command": command,
        "seconds": round(time.perf_counter() - started, 1),
        "machine": {"cpu": cpu_model(), "cores": threads, "torch": torch.__version__,
                    "load_average_start": load_start, "load_average_end": round(os.getloadavg()[0], 2)},
        "folder": str(folder.relative_to(args.data_root) if folder.is_relative_to(args.data_root) else folder),
        "model": args.model, "images": n, "repeats": args.repeats, "cost_images": min(args.cost_images, n),
        "floor": {"images_per_s": round(floor, 1), "threads": threads, "runs": [round(x, 1) for x in floors]},
        "rows": rows, "per_image_cpu_ms": costs, "targets": targets,
    }
    write_results(args.out, res, markdown(res))


if __name__ == "__main__":
    main()
