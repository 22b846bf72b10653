"""Start-up time of the command line, next to the interpreter's own floor, in one run.

Each case is a fresh process, timed from spawn to exit (wall clock), ``--runs`` times,
interleaved across cases so that load from other jobs on the machine hits them alike:

* ``python -c pass``: the interpreter alone;
* ``python -c "import typer"`` and ``python -c "import typer, rich.console, pydantic"``: the
  libraries every command needs to parse its arguments (and, for ``models``, to read a card),
  i.e. what is left once MedSight imports nothing else up front;
* ``medsight --help``, ``medsight models``, ``medsight models --json``: the installed entry point.

Target (MedSight architecture issue): ``medsight --help`` and ``medsight models`` start in
<= 0.6 s (median). Writes ``results.json`` and ``results.md`` next to this file (or ``--out``).
Usage: .venv/bin/python benchmarks/cli_startup/run.py [--runs 10]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.results import write_results  # noqa: E402
from medsight.evaluate.tune import cpu_model  # noqa: E402  (this process only: the timed commands are fresh processes)

PY = sys.executable
MEDSIGHT = str(Path(PY).with_name("medsight"))
TARGET_S = 0.6

CASES: dict[str, list[str]] = {
    "python -c pass": [PY, "-c", "pass"],
    'python -c "import typer"': [PY, "-c", "import typer"],
    'python -c "import typer, rich.console, pydantic"': [PY, "-c", "import typer, rich.console, pydantic"],
    "medsight --help": [MEDSIGHT, "--help"],
    "medsight models": [MEDSIGHT, "models"],
    "medsight models --json": [MEDSIGHT, "models", "--json"],
}
TARGETED = ("medsight --help", "medsight models")


def wall_s(cmd: list[str]) -> float:
    t = time.perf_counter()
    subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
    return time.perf_counter() - t


def summary(samples: list[float]) -> dict[str, Any]:
    q1, _, q3 = statistics.quantiles(samples, n=4)
    return {"median_s": round(statistics.median(samples), 3), "min_s": round(min(samples), 3),
            "max_s": round(max(samples), 3), "iqr_s": round(q3 - q1, 3), "runs_s": [round(s, 3) for s in samples]}


def markdown(res: dict[str, Any]) -> str:
    m = res["machine"]
    lines = [
        "# Command-line start-up",
        "",
        f"Measured {res['date']} on {m['cpu']}, {m['cores']} cores, Python {m['python']} (1-minute load average "
        f"{m['load_average_start']} at start, {m['load_average_end']} at end; the machine is shared, so other jobs may "
        f"have run alongside). Run: `{res['command']}`. Each case is a fresh process, timed spawn to exit, "
        f"{res['runs']} runs interleaved across cases.",
        "",
        "| command | median s | min s | max s | IQR s | median - import floor s |",
        "|---|---|---|---|---|---|",
    ]
    floor = res["cases"]['python -c "import typer, rich.console, pydantic"']["median_s"]
    for name, r in res["cases"].items():
        extra = f"{r['median_s'] - floor:+.3f}" if name.startswith("medsight") else ""
        lines.append(f"| `{name}` | {r['median_s']} | {r['min_s']} | {r['max_s']} | {r['iqr_s']} | {extra} |")
    lines += ["", f"## Target: `medsight --help` and `medsight models` in <= {TARGET_S} s (median)", ""]
    for name in TARGETED:
        r = res["cases"][name]
        lines.append(f"* `{name}`: {r['median_s']} s, {'met' if r['median_s'] <= TARGET_S else 'missed'}")
    lines += ["", "The import floor is what any command needs before MedSight's own code runs: the interpreter, "
              "typer (argument parsing), rich (output) and pydantic (model cards).", ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--out", type=Path, default=HERE)
    args = ap.parse_args()
    load_start = round(os.getloadavg()[0], 2)
    for cmd in CASES.values():  # one untimed run each: bytecode compiled, files in the page cache
        wall_s(cmd)
    samples: dict[str, list[float]] = {name: [] for name in CASES}
    for _ in range(args.runs):
        for name, cmd in CASES.items():
            samples[name].append(wall_s(cmd))
    res = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": "python benchmarks/cli_startup/run.py" + (f" --runs {args.runs}" if args.runs != 10 else ""),
        "runs": args.runs,
        "machine": {"cpu": cpu_model(), "cores": len(os.sched_getaffinity(0)), "python": platform.python_version(),
                    "load_average_start": load_start, "load_average_end": round(os.getloadavg()[0], 2)},
        "target_s": TARGET_S,
        "cases": {name: summary(s) for name, s in samples.items()},
    }
    res["met"] = {name: res["cases"][name]["median_s"] <= TARGET_S for name in TARGETED}
    write_results(args.out, res, markdown(res))


if __name__ == "__main__":
    main()
