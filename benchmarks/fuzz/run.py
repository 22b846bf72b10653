"""Long mutation fuzz of MedSight's readers (issue 13): every input reads or raises a MedSightError.

Seeds: small pydicom-data files of several transfer syntaxes and the bundled PNG/JPEG samples.
Mutations (seeded): byte flips, overwrites, insertions, deletions, truncation, splices of two seeds.
Each worker process runs under RLIMIT_AS (default 1.5 GiB); an exception that is not a
MedSightError, a worker killed by a signal or the memory limit, is a finding (saved under findings/).

    .venv/bin/python benchmarks/fuzz/run.py --cases 100000 --workers 2
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import random
import resource
import sys
import time
import traceback
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
OUT = Path(__file__).resolve().parent
SUFFIX = {"dicom": ".dcm", "png": ".png", "jpeg": ".jpg"}


def seeds() -> list[tuple[str, str, bytes]]:
    import data_store

    data = Path(data_store.__file__).parent / "data"
    names = ["CT_small.dcm", "MR_small.dcm", "MR_small_bigendian.dcm", "MR_small_implicit.dcm", "MR_small_deflate.dcm",
             "MR_small_jp2klossless.dcm", "MR_small_RLE.dcm", "JPEG2000.dcm", "SC_rgb_small_odd.dcm", "US1_J2KR.dcm",
             "693_J2KR.dcm", "RG1_UNCR.dcm", "OBXXXX1A_rle.dcm", "JPEG-LL.dcm", "JPEG-lossy.dcm", "JPGLosslessP14SV1_1s_1f_8b.dcm"]
    found = []
    for n in names:
        hit = next(data.rglob(n), None)
        if hit is None:
            from pydicom.data import get_testdata_file

            p = get_testdata_file(n)
            hit = Path(p) if p else None
        if hit is not None and hit.stat().st_size < 8_000_000:
            found.append(("dicom", n, hit.read_bytes()))
    for f in sorted((ROOT / "medsight" / "samples").iterdir()):
        if f.suffix.lower() in (".png", ".jpg"):
            found.append(("png" if f.suffix.lower() == ".png" else "jpeg", f.name, f.read_bytes()))
    return found


def mutate(data: bytes, other: bytes, rnd: random.Random) -> bytes:
    b = bytearray(data)
    for _ in range(rnd.randint(1, 4)):
        op = rnd.randrange(6)
        if not b:
            break
        i = rnd.randrange(len(b))
        if op == 0:
            b[i] ^= 1 << rnd.randrange(8)
        elif op == 1:
            b[i:i + 4] = rnd.randbytes(min(4, len(b) - i))
        elif op == 2:
            b[i:i] = rnd.randbytes(rnd.randint(1, 64))
        elif op == 3:
            del b[i:i + rnd.randint(1, 256)]
        elif op == 4:
            b = b[: max(1, i)]
        else:
            j = rnd.randrange(len(other))
            b = b[:i] + other[j:]
        # most header fields of interest sit in the first few KB: bias half the edits there
        if rnd.random() < 0.5 and len(b) > 8:
            k = rnd.randrange(min(len(b), 4096))
            b[k] = rnd.randrange(256)
    return bytes(b)


def worker(args: tuple[int, int, int, float, str]) -> dict:
    wid, start, count, limit_gb, tmp = args
    resource.setrlimit(resource.RLIMIT_AS, (int(limit_gb * 2**30), int(limit_gb * 2**30)))
    sys.path.insert(0, str(ROOT))
    import warnings

    warnings.simplefilter("ignore")
    from medsight.errors import MedSightError
    from medsight.io.readers import read_image

    pool = seeds()
    outcomes: Counter = Counter()
    per_kind: Counter = Counter()
    findings: list[dict] = []
    path_dir = Path(tmp) / f"w{wid}"
    path_dir.mkdir(parents=True, exist_ok=True)
    for case in range(start, start + count):
        rnd = random.Random(case)
        kind, name, data = pool[case % len(pool)]
        other = pool[rnd.randrange(len(pool))][2]
        blob = mutate(data, other, rnd)
        path = path_dir / f"case{SUFFIX[kind]}"
        path.write_bytes(blob)
        per_kind[kind] += 1
        try:
            read_image(path)
            outcomes["read"] += 1
        except MedSightError as e:
            outcomes[type(e).__name__] += 1
        except MemoryError:
            outcomes["MemoryError (finding)"] += 1
            findings.append({"case": case, "seed": name, "error": "MemoryError"})
        except Exception as e:  # noqa: BLE001 - anything else is what we look for
            outcomes[f"{type(e).__name__} (finding)"] += 1
            if len(findings) < 50:
                findings.append({"case": case, "seed": name, "error": f"{type(e).__name__}: {e}"[:300],
                                 "where": traceback.format_exc().splitlines()[-3][:200]})
                (OUT / "findings").mkdir(exist_ok=True)
                (OUT / "findings" / f"case{case}{SUFFIX[kind]}").write_bytes(blob)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"outcomes": outcomes, "kinds": per_kind, "findings": findings, "peak_rss_mb": peak_mb}


def worker_to_file(job: tuple[int, int, int, float, str]) -> None:
    r = worker(job)
    (Path(job[4]) / f"chunk{job[1]}.json").write_text(json.dumps(r))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", type=int, default=100_000)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--chunk", type=int, default=500)
    ap.add_argument("--memory-limit-gb", type=float, default=1.5)
    args = ap.parse_args()
    import tempfile

    tmp = tempfile.mkdtemp(prefix="medsight-fuzz-")
    jobs = [(i, s, min(args.chunk, args.cases - s), args.memory_limit_gb, tmp) for i, s in enumerate(range(0, args.cases, args.chunk))]
    t0 = time.time()
    outcomes, kinds, findings, peaks, crashed = Counter(), Counter(), [], [], 0
    ctx = mp.get_context("fork")  # the parent has imported nothing heavy; each chunk is a fresh process
    lost: list[tuple[int, int]] = []  # (first case, exit code) of each chunk whose worker died (native abort, signal, memory)
    todo, running = list(jobs), []
    while todo or running:
        while todo and len(running) < args.workers:
            job = todo.pop(0)
            proc = ctx.Process(target=worker_to_file, args=(job,))
            proc.start()
            running.append((job, proc))
        time.sleep(0.05)
        for job, proc in list(running):
            if proc.is_alive():
                continue
            proc.join()
            running.remove((job, proc))
            out = Path(job[4]) / f"chunk{job[1]}.json"
            if proc.exitcode != 0 or not out.exists():
                lost.append((job[1], proc.exitcode))
                continue
            r = json.loads(out.read_text())
            outcomes.update(r["outcomes"]), kinds.update(r["kinds"])
            findings += r["findings"]
            peaks.append(r["peak_rss_mb"])
            print(f"{sum(kinds.values())}/{args.cases} cases, {len(lost)} chunks lost, {time.time() - t0:.0f} s", flush=True)
    done = sum(kinds.values())
    crashed = len(lost)
    result = {"cases": done, "requested": args.cases, "seconds": round(time.time() - t0, 1), "workers": args.workers,
              "memory_limit_gb": args.memory_limit_gb, "per_format": dict(kinds), "outcomes": dict(outcomes.most_common()),
              "findings": findings, "n_findings": sum(v for k, v in outcomes.items() if "finding" in k),
              "crashed_chunks": crashed, "crashed_chunk_first_cases": lost, "chunk": args.chunk, "peak_rss_mb_max": round(max(peaks), 1), "seeds": [n for _, n, _ in seeds()]}
    (OUT / "results.json").write_text(json.dumps(result, indent=2))
    lines = ["# Reader fuzz (issue 13)", "", f"    .venv/bin/python benchmarks/fuzz/run.py --cases {args.cases} --workers {args.workers}", "",
             f"Run {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}: {done:,} mutated inputs through `medsight.io.readers.read_image` "
             f"in {result['seconds']} s on {args.workers} worker processes, each under RLIMIT_AS {args.memory_limit_gb} GiB; seeded "
             "(case number = seed), so any case can be replayed.", "",
             f"* per format: {', '.join(f'{k} {v:,}' for k, v in kinds.items())}",
             f"* findings (an exception other than MedSightError, or MemoryError): **{result['n_findings']}**",
             f"* worker processes killed (a chunk of {args.chunk} cases lost each; (first case, exit code): {lost[:20]}): **{crashed}**",
             f"* peak RSS of a worker: {result['peak_rss_mb_max']} MB (limit {args.memory_limit_gb * 1024:.0f} MB)", "",
             "| outcome | cases |", "|---|---:|"] + [f"| {k} | {v:,} |" for k, v in outcomes.most_common()]
    if findings:
        lines += ["", "## Findings (first 50)", ""] + [f"* case {f['case']} (seed {f['seed']}): {f['error']}" for f in findings]
    lines += ["", "Not covered by this run: the upload path over HTTP and zip archives (the test suite's bounded checks cover them: "
              "tests/serve/test_upload_limits.py, tests/gateway/test_fuzz.py)."]
    (OUT / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
