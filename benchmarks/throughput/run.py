"""CPU inference throughput against the machine's FLOP-bound limit, in one run.

For every shipped model, on the same preprocessed real test images (the recipe's
test split from the data root; the bundled samples when the data are absent):

* images/s for eager PyTorch, ONNX Runtime fp32 and ONNX Runtime int8 at batch
  sizes 1/8/32/128 (median of ``--repeats`` timed runs, each running whole batches for
  at least ``--seconds``, interleaved across backends so load from other jobs hits
  all of them alike);
* FLOPs per image (``torch.utils.flop_counter.FlopCounterMode``: convolutions and
  the linear head, 2 FLOPs per multiply-add);
* this machine's fp32 matmul peak (best of ``torch.mm`` and ONNX Runtime ``MatMul``) and int8 matmul
  peak (best of ``torch._int_mm`` and ONNX Runtime ``MatMulInteger``), measured in the same run, hence
  achieved GFLOP/s and the fraction of the FLOP-bound limit;
* p50/p95 single-image latency (backend forward, and the whole Predictor on a decoded image
  including calibration, decision and heat map);
* end-to-end latency for one DICOM file (pydicom-data ``RG1_J2KR.dcm``, a 1955x1841
  JPEG 2000 chest radiograph) -> result + heat-map PNG on disk, with the JPEG 2000 decode
  time of each pydicom plugin and the overlay's drawing and PNG-encoding times;
* files -> results throughput with decoding in the caller vs in a worker process
  (``medsight.predict.stream``).

Writes ``results.json`` and ``results.md`` next to this file (or ``--out``).
Usage: .venv/bin/python benchmarks/throughput/run.py [--data-root ../shared/data] [--models a,b]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))

from medsight.errors import BackendError, DataSetError  # noqa: E402
from medsight.explain.overlay import save_overlay  # noqa: E402
from medsight.io.readers import read_image  # noqa: E402
from medsight.models.package import ModelPackage  # noqa: E402
from medsight.models.preprocess import batch_to_tensor  # noqa: E402
from medsight.models.registry import list_cards, load  # noqa: E402
from medsight.predict.backends import BACKENDS, InferenceBackend, recorded_choice  # noqa: E402
from medsight.predict.load import load_model  # noqa: E402
from medsight.predict.predictor import Predictor  # noqa: E402
from medsight.predict.settings import RuntimeSettings, available_cores  # noqa: E402
from medsight.evaluate.tune import cpu_model  # noqa: E402
from medsight.train.recipe import Recipe, recipe_splits  # noqa: E402

SAMPLES = ROOT / "medsight" / "samples"
E2E_MODEL_PREFERENCE = ("covid-cxr", "pneumonia-cxr")


def matmul_peak(threads: int, dtype: str = "fp32", sizes: tuple[int, ...] = (256, 384, 512, 768, 1024, 2048), repeats: int = 20) -> dict[str, Any]:
    """This machine's GEMM limit: best GFLOP/s (GOP/s for int8) of square matmuls over a few sizes.

    fp32: ``torch.mm`` (oneDNN/MKL sgemm). int8: ``torch._int_mm`` (int8 x int8 -> int32,
    AVX512-VNNI where present), the limit for the int8 backend. The best of ``repeats``
    runs is taken, not the median: other jobs on the machine can only slow a run down,
    so the fastest run is the closest to what the hardware can do. Small sizes are
    included because the convolutions' GEMMs fit in cache; a large matmul streams from
    memory and understates the limit.
    """
    per_size = {}
    for n in sizes:
        if dtype == "fp32":
            a, b = torch.randn(n, n), torch.randn(n, n)
            mm = torch.mm
        elif dtype == "fp32-ort":
            a, b = np.random.rand(n, n).astype(np.float32), None
            mm = _ort_matmul(n, threads)
        elif dtype == "int8-ort":
            a, b = np.random.randint(0, 256, (n, n)).astype(np.uint8), None
            mm = _ort_matmul(n, threads, integer=True)
        else:
            a, b = torch.randint(-128, 128, (n, n), dtype=torch.int8), torch.randint(-128, 128, (n, n), dtype=torch.int8)
            mm = torch._int_mm
        mm(a, b)
        best = float("inf")
        for _ in range(repeats):
            t = time.perf_counter()
            mm(a, b)
            best = min(best, time.perf_counter() - t)
        per_size[n] = 2 * n**3 / best / 1e9
    top = max(per_size, key=per_size.get)
    op = {"fp32": "torch.mm", "fp32-ort": "onnxruntime MatMul", "int8": "torch._int_mm", "int8-ort": "onnxruntime MatMulInteger"}[dtype]
    return {"gflops": round(per_size[top], 1), "best_size": top, "per_size": {str(k): round(v, 1) for k, v in per_size.items()},
            "threads": threads, "dtype": dtype, "op": op, "method": f"best of {repeats} {op}(n x n) runs per size, best size"}


def _ort_matmul(n: int, threads: int, integer: bool = False):
    """An ONNX Runtime session computing A @ B (B a constant), as a callable mm(a, _).

    ``integer``: uint8 A x int8 B -> int32 (``MatMulInteger``, the u8s8 kernels onnx-int8 runs on).
    """
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    if integer:
        b = numpy_helper.from_array(np.random.randint(-128, 128, (n, n)).astype(np.int8), "B")
        node, a_type, c_type = "MatMulInteger", TensorProto.UINT8, TensorProto.INT32
    else:
        b = numpy_helper.from_array(np.random.rand(n, n).astype(np.float32), "B")
        node, a_type, c_type = "MatMul", TensorProto.FLOAT, TensorProto.FLOAT
    graph = helper.make_graph([helper.make_node(node, ["A", "B"], ["C"])], "mm",
                              [helper.make_tensor_value_info("A", a_type, [n, n])],
                              [helper.make_tensor_value_info("C", c_type, [n, n])], initializer=[b])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    onnx.checker.check_model(model)
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return lambda a, _: sess.run(None, {"A": a})


def flops_per_image(pkg: ModelPackage) -> int:
    x = torch.zeros(1, pkg.card.input.channels, pkg.card.input.size, pkg.card.input.size)
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        pkg.network(x)
    return int(fc.get_total_flops())


def real_test_images(name: str, data_root: Path, n: int) -> tuple[list, str]:
    """Up to ``n`` decoded real test images of the model's recipe (or the bundled samples)."""
    recipe = ROOT / "recipes" / f"{name}.json"
    try:
        test = recipe_splits(Recipe.load(recipe).data, data_root)["test"]
        k = min(n, len(test))
        return [test.image(i) for i in range(k)], f"{test.name}, first {k}"
    except (DataSetError, FileNotFoundError):
        files = sorted(p for p in SAMPLES.iterdir() if p.suffix in (".png", ".jpg"))
        return [read_image(f) for f in files], f"bundled samples ({len(files)}; recipe data not found)"


def test_files(name: str, data_root: Path, n: int) -> list[Path]:
    """Real image files of a folder-based test split (for the decode-overlap measurement)."""
    try:
        test = recipe_splits(Recipe.load(ROOT / "recipes" / f"{name}.json").data, data_root)["test"]
    except (DataSetError, FileNotFoundError):
        return []
    return [Path(p) for p in test.images[:n]] if isinstance(test.images, list) else []


def one_rate(backend: InferenceBackend, batches: list[torch.Tensor], seconds: float) -> float:
    """images/s of whole batches run back to back for at least ``seconds``."""
    n, t0 = 0, time.perf_counter()
    while True:
        for b in batches:
            backend.forward(b)
            n += len(b)
        if time.perf_counter() - t0 >= seconds:
            return n / (time.perf_counter() - t0)


def batches_of(x: torch.Tensor, bs: int) -> list[torch.Tensor]:
    return [x[i : i + bs] for i in range(0, len(x) - bs + 1, bs)] or [x[:bs]]


def throughput(backend: InferenceBackend, x: torch.Tensor, bs: int, seconds: float, repeats: int) -> float:
    """Median images/s over ``repeats`` timed runs of batches of ``bs`` (after a warm-up batch)."""
    batches = batches_of(x, bs)
    backend.forward(batches[0])
    return statistics.median(one_rate(backend, batches, seconds) for _ in range(repeats))


def interleaved_throughput(backends: dict[str, InferenceBackend], x: torch.Tensor, sizes: list[int], seconds: float,
                           repeats: int) -> dict[str, dict[str, float]]:
    """Median images/s per (backend, batch size), with the repeats interleaved across backends.

    Round-robin order means a burst of load from another job slows every backend
    alike instead of one, so the ratios between backends stay meaningful.
    """
    plans = {(b, bs): batches_of(x, bs) for b in backends for bs in sizes}
    for (b, bs), batches in plans.items():
        backends[b].forward(batches[0])  # warm-up: first runs allocate and plan
    rates: dict[tuple[str, int], list[float]] = {k: [] for k in plans}
    for _ in range(repeats):
        for (b, bs), batches in plans.items():
            rates[(b, bs)].append(one_rate(backends[b], batches, seconds))
    return {b: {str(bs): round(statistics.median(rates[(b, bs)]), 1) for bs in sizes} for b in backends}


def percentiles(samples_s: list[float]) -> dict[str, float]:
    ms = np.asarray(samples_s) * 1000
    return {"p50_ms": round(float(np.percentile(ms, 50)), 2), "p95_ms": round(float(np.percentile(ms, 95)), 2), "runs": len(ms)}


def latency(fn, runs: int) -> dict[str, float]:
    fn(0)
    out = []
    for i in range(runs):
        t = time.perf_counter()
        fn(i)
        out.append(time.perf_counter() - t)
    return percentiles(out)


def bench_model(name: str, args: argparse.Namespace, settings: RuntimeSettings, peaks: dict[str, float]) -> dict[str, Any]:
    pkg = load(name)
    images, image_set = real_test_images(name, args.data_root, max(args.batch_sizes))
    x = batch_to_tensor(images, pkg.card.input)
    if len(x) < max(args.batch_sizes):  # tile the few bundled samples up to the largest batch
        x = x.repeat((max(args.batch_sizes) + len(x) - 1) // len(x), 1, 1, 1)[: max(args.batch_sizes)]
    flops = flops_per_image(pkg)
    out: dict[str, Any] = {"model": f"{pkg.card.name}@{pkg.card.version}", "input": f"{pkg.card.input.size}px x{pkg.card.input.channels}",
                           "images": image_set, "flops_per_image": flops, "backends": {}}
    choice, reason = recorded_choice(pkg.card)
    out["auto"] = {"backend": choice, "reason": reason}
    predictors: dict[str, Predictor] = {}
    for bname in BACKENDS:
        try:
            predictors[bname] = load_model(pkg, bname, settings)
        except BackendError as e:
            out["backends"][bname] = {"skipped": str(e)}
    backends: dict[str, InferenceBackend] = {k: p.backend for k, p in predictors.items()}
    all_rates = interleaved_throughput(backends, x, args.batch_sizes, args.seconds, args.repeats)
    one = [images[i % len(images)] for i in range(len(images))]
    for bname, pred in predictors.items():
        backend = pred.backend
        rates = all_rates[bname]
        best = max(rates.values())
        peak = peaks["int8" if bname == "onnx-int8" else "fp32"]
        out["backends"][bname] = {
            "images_per_s": rates,
            "best_images_per_s": best,
            "gflops_at_best": round(best * flops / 1e9, 1),
            "fraction_of_peak": round(best * flops / 1e9 / peak, 3),
            "peak_used": "int8" if bname == "onnx-int8" else "fp32",
            "latency_forward_bs1": latency(lambda i: backend.forward(x[i % len(x) : i % len(x) + 1]), args.latency_runs),
            "latency_predict_one_image": latency(lambda i: pred.predict(one[i % len(one)], explain=True), args.latency_runs),
        }
        print(f"  {name} {bname}: {rates} img/s, {out['backends'][bname]['fraction_of_peak']:.0%} of limit", flush=True)
    eager = out["backends"]["torch"]["images_per_s"]
    for bname, r in out["backends"].items():
        if "images_per_s" in r:
            r["speedup_vs_eager"] = {bs: round(v / eager[bs], 2) for bs, v in r["images_per_s"].items()}
    return out


def bench_dicom_e2e(args: argparse.Namespace, settings: RuntimeSettings) -> dict[str, Any]:
    from pydicom.data import get_testdata_file

    dcm = Path(get_testdata_file("RG1_J2KR.dcm"))
    shipped = {c.name for c in list_cards()}
    name = next((m for m in E2E_MODEL_PREFERENCE if m in shipped), None)
    if name is None:
        return {"skipped": "no chest X-ray model shipped"}
    pkg = load(name)
    out: dict[str, Any] = {"file": f"pydicom-data {dcm.name} (CR, JPEG 2000 lossless, 1955x1841)", "model": name, "backends": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for bname in BACKENDS:
            try:
                pred = load_model(pkg, bname, settings)
            except BackendError as e:
                out["backends"][bname] = {"skipped": str(e)}
                continue
            parts: dict[str, list[float]] = {"read": [], "predict": [], "png": [], "total": []}

            for i in range(args.e2e_runs + 1):
                t0 = time.perf_counter()
                img = read_image(dcm)
                t1 = time.perf_counter()
                res = pred.predict(img, explain=True)
                t2 = time.perf_counter()
                save_overlay(res.image, res.heatmap, Path(tmp) / f"{i}.png")
                t3 = time.perf_counter()
                if i == 0:
                    continue  # warm-up
                for k, v in zip(("read", "predict", "png", "total"), (t1 - t0, t2 - t1, t3 - t2, t3 - t0)):
                    parts[k].append(v)
            out["backends"][bname] = {"total": percentiles(parts["total"]),
                                      "median_ms": {k: round(statistics.median(v) * 1000, 1) for k, v in parts.items()},
                                      "label": res.label}
            print(f"  e2e {bname}: {out['backends'][bname]['total']}", flush=True)
        out["png_compress_level"] = png_levels(res, Path(tmp), args.e2e_runs // 4 or 1)
        out["decode_plugins"] = decode_plugins(dcm, args.e2e_runs // 4 or 1)
    return out


def png_levels(res, tmp: Path, runs: int) -> dict[str, dict[str, float]]:
    """The overlay's two steps: drawing it (lookup tables + PIL compositing) and encoding the PNG, at
    PIL's default zlib settings (level 6) and at save_overlay's (level 1, Z_RLE strategy)."""
    from medsight.explain.overlay import PNG_COMPRESS_LEVEL, PNG_STRATEGY, overlay_image

    draw = []
    for _ in range(runs):
        t = time.perf_counter()
        im = overlay_image(res.image, res.heatmap)
        draw.append(time.perf_counter() - t)
    out: dict[str, dict[str, float]] = {"draw": {"median_ms": round(statistics.median(draw) * 1000, 1)}}
    for key, kw in (("6", {"compress_level": 6}), ("1", {"compress_level": PNG_COMPRESS_LEVEL, "compress_type": PNG_STRATEGY})):
        times = []
        for i in range(runs):
            t = time.perf_counter()
            im.save(tmp / f"level{key}_{i}.png", format="PNG", **kw)
            times.append(time.perf_counter() - t)
        out[key] = {"median_ms": round(statistics.median(times) * 1000, 1), "kib": round((tmp / f"level{key}_0.png").stat().st_size / 1024)}
    return out


def decode_plugins(dcm: Path, runs: int) -> dict[str, Any]:
    """JPEG 2000 decode time of each installed pydicom plugin on the file (median of ``runs``), and the one
    medsight.io.dicom tries first."""
    import pydicom
    from pydicom.pixels import get_decoder

    from medsight.io.dicom import PREFERRED_PLUGIN

    ds = pydicom.dcmread(dcm)
    ts = ds.file_meta.TransferSyntaxUID
    decoder = get_decoder(ts)
    out: dict[str, Any] = {"preferred": PREFERRED_PLUGIN.get(ts), "OPJ_NUM_THREADS": os.environ.get("OPJ_NUM_THREADS"), "median_ms": {}}
    for plugin in decoder.available_plugins:
        times = []
        for _ in range(runs + 1):
            t = time.perf_counter()
            decoder.as_array(ds, decoding_plugin=plugin)
            times.append(time.perf_counter() - t)
        out["median_ms"][plugin] = round(statistics.median(times[1:]) * 1000, 1)
    return out


def bench_decode_overlap(args: argparse.Namespace, settings: RuntimeSettings) -> dict[str, Any]:
    """Files -> predictions (heat maps on) with decoding in the caller or in worker processes, per thread split."""
    name = next((m for m in ("covid-cxr", "brain-tumor-mri", "breast-us-busi", "skin-lesion-ham") if m in {c.name for c in list_cards()}), None)
    files = test_files(name, args.data_root, args.pipeline_files) if name else []
    if not files:
        return {"skipped": "no folder-based test split available"}
    pkg = load(name)
    backend_name = recorded_choice(pkg.card)[0]
    cores = settings.intra_op_threads
    configs = sorted({(cores, 0), (cores, 1), (max(1, cores - 1), 1), (cores, max(1, cores // 4))})
    out: dict[str, Any] = {"model": name, "backend": backend_name, "files": len(files), "batch_size": 16, "explain": True, "runs": []}
    for threads, workers in configs:
        s = RuntimeSettings(cache_dir=settings.cache_dir, intra_op_threads=threads, decode_workers=workers)
        torch.set_num_threads(threads)
        pred = load_model(pkg, backend_name, s)
        list(pred.stream(files[:16], batch_size=16, workers=0))  # warm-up
        t = time.perf_counter()
        n = sum(1 for _ in pred.stream(files, batch_size=16, workers=workers))
        rate = round(n / (time.perf_counter() - t), 1)
        out["runs"].append({"inference_threads": threads, "decode_workers": workers, "files_per_s": rate})
        print(f"  pipeline threads={threads} workers={workers}: {rate} files/s", flush=True)
    torch.set_num_threads(cores)
    return out


def bench_spinning(args: argparse.Namespace, settings: RuntimeSettings) -> dict[str, Any]:
    """ONNX Runtime thread spinning on vs off: single-image Predictor latency and batch-32 throughput."""
    name = next((m for m in E2E_MODEL_PREFERENCE if m in {c.name for c in list_cards()}), None)
    if name is None:
        return {"skipped": "no chest X-ray model shipped"}
    pkg = load(name)
    images, _ = real_test_images(name, args.data_root, 64)
    x = batch_to_tensor(images, pkg.card.input)
    out: dict[str, Any] = {"model": name, "runs": []}
    for bname in ("onnx", "onnx-int8"):
        for spin in (True, False):
            s = RuntimeSettings(cache_dir=settings.cache_dir, intra_op_threads=settings.intra_op_threads, decode_workers=0, ort_spinning=spin)
            try:
                pred = load_model(pkg, bname, s)
            except BackendError:
                continue
            backend = pred.backend
            out["runs"].append({"backend": bname, "spinning": spin,
                                "predict_one_image": latency(lambda i: pred.predict(images[i % len(images)]), args.latency_runs),
                                "images_per_s_bs32": round(throughput(backend, x, 32, args.seconds, args.repeats), 1)})
            print(f"  spinning {bname} {spin}: {out['runs'][-1]}", flush=True)
    return out


def markdown(res: dict[str, Any]) -> str:
    m = res["machine"]
    lines = [
        "# CPU inference throughput", "",
        f"Measured {res['date']} on {m['cpu']}, {m['cores']} cores, {m['threads']} inference threads "
        f"(1-minute load average {m['load_average_start']} at start, {m['load_average_end']} at end; the run itself keeps both cores busy, "
        "so a higher figure at the end than at the start does not by itself mean other jobs ran), "
        f"torch {m['torch']}, onnxruntime {m['onnxruntime']}. Run: `{res['command']}` ({res['seconds']:.0f} s).", "",
        f"**FLOP-bound limits, measured in the same run: fp32 {res['matmul_peak']['gflops']} GFLOP/s** "
        f"({res['matmul_peak']['op']} {res['matmul_peak']['best_size']}^2, the faster of torch.mm and ONNX Runtime MatMul), **int8 {res['int8_matmul_peak']['gflops']} GOP/s** "
        f"({res['int8_matmul_peak']['op']} {res['int8_matmul_peak']['best_size']}^2, the faster of torch._int_mm and ONNX Runtime MatMulInteger; the limit for onnx-int8). "
        "FLOPs per image count convolutions and the linear layer (2 per multiply-add); "
        "'% of limit' = achieved GFLOP/s at the best batch size / the limit of the backend's arithmetic.", "",
        "## Images/s by backend and batch size (median of timed repeats)", "",
        "| model | input | GFLOP/img | backend | bs 1 | bs 8 | bs 32 | bs 128 | x eager (best bs) | GFLOP/s | % of limit | fwd p50/p95 ms (bs 1) | predict p50/p95 ms |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in res["models"]:
        for b, v in r["backends"].items():
            if "skipped" in v:
                lines.append(f"| {r['model']} | {r['input']} | {r['flops_per_image'] / 1e9:.3f} | {b} | skipped: {v['skipped']} |||||||||")
                continue
            ips = v["images_per_s"]
            eager_best = max(r["backends"]["torch"]["images_per_s"].values())
            lf, lp = v["latency_forward_bs1"], v["latency_predict_one_image"]
            lines.append(
                f"| {r['model']} | {r['input']} | {r['flops_per_image'] / 1e9:.3f} | {b}{' (auto)' if r['auto']['backend'] == b else ''} | "
                + " | ".join(f"{ips[k]:.0f}" for k in ("1", "8", "32", "128") if k in ips)
                + f" | {v['best_images_per_s'] / eager_best:.2f} | {v['gflops_at_best']} | {100 * v['fraction_of_peak']:.0f}% | "
                f"{lf['p50_ms']}/{lf['p95_ms']} | {lp['p50_ms']}/{lp['p95_ms']} |")
    lines += ["", "## Targets (issue 7) for each model's auto backend", "",
              "| model | auto | x eager at best batch (target >= 3) | % of its FLOP-bound limit (target >= 60%) |", "|---|---|---|---|"]
    for r in res["models"]:
        a = r["backends"].get(r["auto"]["backend"], {})
        if "images_per_s" in a:
            eager_best = max(r["backends"]["torch"]["images_per_s"].values())
            x = a["best_images_per_s"] / eager_best
            f = 100 * a["fraction_of_peak"]
            lines.append(f"| {r['model']} | {r['auto']['backend']} | {x:.2f} {'met' if x >= 3 else 'missed'} | "
                         f"{f:.0f}% of the {a['peak_used']} limit {'met' if f >= 60 else 'missed'} |")
    e = res["dicom_end_to_end"]
    lines += ["", "## One DICOM study end to end (read + decode J2K + predict + heat map + overlay PNG)", ""]
    if "skipped" in e:
        lines.append(f"skipped: {e['skipped']}")
    else:
        lines += [f"{e['file']}, model {e['model']}.", "",
                  "| backend | p50 ms | p95 ms | read ms | predict ms | PNG ms |", "|---|---|---|---|---|---|"]
        for b, v in e["backends"].items():
            if "skipped" in v:
                lines.append(f"| {b} | skipped: {v['skipped']} |||||")
            else:
                md = v["median_ms"]
                lines.append(f"| {b} | {v['total']['p50_ms']} | {v['total']['p95_ms']} | {md['read']} | {md['predict']} | {md['png']} |")
    if "png_compress_level" in e:
        lv = e["png_compress_level"]
        lines += ["", f"Overlay: drawing {lv['draw']['median_ms']} ms; PNG at zlib level 6 (PIL default): {lv['6']['median_ms']} ms, "
                  f"{lv['6']['kib']} KiB; at level 1 with Z_RLE (what save_overlay uses): {lv['1']['median_ms']} ms, {lv['1']['kib']} KiB."]
    if "decode_plugins" in e:
        dp = e["decode_plugins"]
        lines += ["", f"JPEG 2000 decode of the file by each pydicom plugin (median ms; OPJ_NUM_THREADS={dp['OPJ_NUM_THREADS']}, "
                  f"medsight tries {dp['preferred']} first): " + ", ".join(f"{k} {v}" for k, v in dp["median_ms"].items()) + "."]
    p = res["decode_overlap"]
    lines += ["", "## Files -> results: decoding overlapped with inference (`medsight.predict.stream`)", ""]
    if "skipped" in p:
        lines.append(f"skipped: {p['skipped']}")
    else:
        lines += [f"{p['files']} real test files of {p['model']} (backend {p['backend']}, batch 16, heat maps on).", "",
                  "| inference threads | decode threads | files/s |", "|---|---|---|"]
        lines += [f"| {r['inference_threads']} | {r['decode_workers']} | {r['files_per_s']} |" for r in p["runs"]]
    sp = res["ort_spinning"]
    lines += ["", "## ONNX Runtime thread spinning (sessions are created with it off)", ""]
    if "skipped" in sp:
        lines.append(f"skipped: {sp['skipped']}")
    else:
        lines += [f"Model {sp['model']}.", "", "| backend | spinning | predict one image p50/p95 ms | images/s at batch 32 |", "|---|---|---|---|"]
        lines += [f"| {r['backend']} | {'on' if r['spinning'] else 'off'} | {r['predict_one_image']['p50_ms']}/{r['predict_one_image']['p95_ms']} | "
                  f"{r['images_per_s_bs32']} |" for r in sp["runs"]]
    lines += ["", "## auto backend per model (recorded by `medsight runtime tune`)", "", "| model | auto | why |", "|---|---|---|"]
    lines += [f"| {r['model']} | {r['auto']['backend']} | {r['auto']['reason']} |" for r in res["models"]]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-root", type=Path, default=ROOT.parent / "shared" / "data")
    ap.add_argument("--models", default="", help="comma-separated zoo names (default: every shipped model)")
    ap.add_argument("--batch-sizes", default="1,8,32,128")
    ap.add_argument("--seconds", type=float, default=0.3, help="minimum duration of one timed repeat")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--latency-runs", type=int, default=40)
    ap.add_argument("--e2e-runs", type=int, default=20)
    ap.add_argument("--pipeline-files", type=int, default=96)
    ap.add_argument("--threads", type=int, default=available_cores())
    ap.add_argument("--out", type=Path, default=HERE)
    args = ap.parse_args()
    args.batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    import onnxruntime

    t_start = time.perf_counter()
    torch.set_num_threads(args.threads)
    settings = RuntimeSettings(intra_op_threads=args.threads, decode_workers=0)
    load_start = round(os.getloadavg()[0], 2)
    # The fp32 limit is the best GEMM either library reaches (oneDNN via torch, MLAS via ONNX Runtime).
    peak = max((matmul_peak(args.threads, "fp32"), matmul_peak(args.threads, "fp32-ort")), key=lambda p: p["gflops"])
    peak8 = max((matmul_peak(args.threads, "int8"), matmul_peak(args.threads, "int8-ort")), key=lambda p: p["gflops"])
    print(f"matmul peak fp32 {peak['gflops']} GFLOP/s ({peak['op']}), int8 {peak8['gflops']} GOP/s", flush=True)
    names = [n for n in args.models.split(",") if n] or [c.name for c in list_cards()]
    models = [bench_model(n, args, settings, {"fp32": peak["gflops"], "int8": peak8["gflops"]}) for n in names]
    e2e = bench_dicom_e2e(args, settings)
    overlap = bench_decode_overlap(args, settings)
    spinning = bench_spinning(args, settings)
    res = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": "python benchmarks/throughput/run.py " + " ".join(sys.argv[1:]),
        "machine": {"cpu": cpu_model(), "cores": available_cores(), "threads": args.threads, "torch": torch.__version__,
                    "onnxruntime": onnxruntime.__version__, "load_average_start": load_start,
                    "load_average_end": round(os.getloadavg()[0], 2)},
        "matmul_peak": peak, "int8_matmul_peak": peak8, "models": models, "dicom_end_to_end": e2e, "decode_overlap": overlap,
        "ort_spinning": spinning,
        "seconds": round(time.perf_counter() - t_start, 1),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(res, indent=2) + "\n")
    (args.out / "results.md").write_text(markdown(res))
    print(markdown(res))


if __name__ == "__main__":
    main()
