"""Ray Data batch inference on this machine: 1 and 2 workers against the local engine.

Source: a CSV manifest of a model's real image files (default: all 5,984 HAM10000 JPEGs
of skin-lesion-ham's recipe), written to a temporary folder. The set is large enough
that start-up (Ray, actors) is visible but does not swamp the per-image work.
Each configuration classifies every file with the card's ``auto`` backend and writes
Parquet + CSV; the local engine is the in-process reference.

Reported per configuration: wall time (everything the user waits for, including Ray
start-up and actor creation), steady-state files/s (from the first to the last result
batch, i.e. without start-up), and the overhead against the local engine. Ray is
started once (``ray.init(num_cpus=2)``), its start-up time reported separately.

Usage: .venv/bin/python benchmarks/ray_scaling/run.py [--model skin-lesion-ham] [--data-root ../shared/data]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pandas as pd

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))

from medsight.models.registry import load  # noqa: E402
from medsight.predict.backends import recorded_choice  # noqa: E402
from medsight.predict.settings import RuntimeSettings, available_cores  # noqa: E402
from medsight.evaluate.tune import cpu_model  # noqa: E402
from medsight.scale.engine import BatchJob, BatchSummary, RayOptions, run_local, run_ray  # noqa: E402
from medsight.train.recipe import Recipe, recipe_splits  # noqa: E402


class Clock:
    """Timestamps of result batches, for steady-state throughput without start-up."""

    def __init__(self) -> None:
        self.marks: list[tuple[float, int]] = []

    def __call__(self, done: int, total: int) -> None:
        self.marks.append((time.perf_counter(), done))

    def steady(self) -> float | None:
        if len(self.marks) < 2:
            return None
        (t0, n0), (t1, n1) = self.marks[0], self.marks[-1]
        return (n1 - n0) / (t1 - t0) if t1 > t0 else None


def row(name: str, s: BatchSummary, clock: Clock, local_wall: float | None) -> dict[str, Any]:
    steady = clock.steady()
    return {"config": name, "n": s.n, "failed": s.failed, "wall_s": round(s.seconds, 2),
            "files_per_s_wall": round(s.n / s.seconds, 1), "files_per_s_steady": None if steady is None else round(steady, 1),
            "wall_vs_local": None if local_wall is None else round(s.seconds / local_wall, 2), **s.extra}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="skin-lesion-ham")
    ap.add_argument("--data-root", type=Path, default=ROOT.parent / "shared" / "data")
    ap.add_argument("--split", default="all", choices=["all", "train", "val", "test"],
                    help="which of the recipe's splits to classify (all: every image of the data set)")
    ap.add_argument("--limit", type=int, default=0, help="use only the first N files (0 = all)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--out", type=Path, default=HERE)
    args = ap.parse_args()
    import ray

    t_start = time.perf_counter()
    load_start = round(os.getloadavg()[0], 2)
    splits = recipe_splits(Recipe.load(ROOT / "recipes" / f"{args.model}.json").data, args.data_root)
    names = ("train", "val", "test") if args.split == "all" else (args.split,)
    files = [f for s in names for f in splits[s].images][: args.limit or None]
    source_name = f"{splits['test'].name.split(':')[0]}:{args.split}"
    backend = recorded_choice(load(args.model).card)[0]
    cores = available_cores()
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        manifest = Path(tmp) / "manifest.csv"
        pd.DataFrame({"path": files}).to_csv(manifest, index=False)
        job = lambda out: BatchJob(manifest, args.model, Path(tmp) / out, backend=backend, batch_size=args.batch_size)  # noqa: E731

        settings = RuntimeSettings(intra_op_threads=cores)  # the local engine's defaults (decode-ahead thread)
        clock = Clock()
        local = run_local(job("local"), settings, clock)
        results.append(row(f"local engine ({cores} threads, {settings.decode_workers} decode thread)", local, clock, None))
        print(results[-1], flush=True)
        reference = pd.read_csv(local.csv)

        t = time.perf_counter()
        ray.init(num_cpus=cores, include_dashboard=False, log_to_driver=False)
        ray_init_s = time.perf_counter() - t
        configs = [("ray, 1 worker x 1 CPU", 1, 1.0), ("ray, 1 worker x 2 CPUs", 1, 2.0), ("ray, 2 workers x 1 CPU", 2, 1.0)]
        for name, workers, cpus in configs:
            clock = Clock()
            s = run_ray(job(name.replace(" ", "_").replace(",", "")), RayOptions(workers=workers, cpus_per_worker=cpus, progress=False),
                        settings, clock)
            r = row(name, s, clock, local.seconds)
            got = pd.read_csv(s.csv)
            r["same_labels_as_local"] = bool((got["label"].fillna("") == reference["label"].fillna("")).all())
            r["max_abs_prob_diff_vs_local"] = float((got.filter(like="p_") - reference.filter(like="p_")).abs().max().max())
            results.append(r)
            print(r, flush=True)
        ray.shutdown()

    res = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": "python benchmarks/ray_scaling/run.py " + " ".join(sys.argv[1:]),
        "machine": {"cpu": cpu_model(), "cores": cores, "ray": ray.__version__, "load_average_start": load_start,
                    "load_average_end": round(os.getloadavg()[0], 2)},
        "model": args.model, "backend": backend, "source": f"{source_name}: {len(files)} files (CSV manifest)",
        "batch_size": args.batch_size, "ray_init_s": round(ray_init_s, 2), "results": results,
        "seconds": round(time.perf_counter() - t_start, 1),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(res, indent=2) + "\n")
    (args.out / "results.md").write_text(markdown(res))
    print(markdown(res))


def markdown(res: dict[str, Any]) -> str:
    m = res["machine"]
    lines = [
        "# Ray Data scaling on one machine", "",
        f"Measured {res['date']} on {m['cpu']}, {m['cores']} cores (load average {m['load_average_start']} at start, "
        f"{m['load_average_end']} at end), Ray {m['ray']}. Model {res['model']} (backend {res['backend']}), "
        f"{res['source']}, batch {res['batch_size']}, no heat maps. `ray.init` took {res['ray_init_s']} s (not in the rows). "
        f"Run: `{res['command']}` ({res['seconds']:.0f} s).", "",
        "| configuration | files | failed | wall s | files/s (wall) | files/s (steady) | wall vs local | same labels as local | max abs prob diff |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in res["results"]:
        lines.append(f"| {r['config']} | {r['n']} | {r['failed']} | {r['wall_s']} | {r['files_per_s_wall']} | {r['files_per_s_steady']} | "
                     f"{r['wall_vs_local'] if r['wall_vs_local'] is not None else '1.00'} | {r.get('same_labels_as_local', '-')} | "
                     f"{r.get('max_abs_prob_diff_vs_local', '-')} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
