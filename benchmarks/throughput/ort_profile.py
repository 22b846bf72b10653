"""Where an ONNX Runtime model spends its time: per-operator and per-node kernel times (ORT's profiler).

Runs a zoo model's cached ONNX file (fp32 or int8, built on demand) on real test images of its recipe
with the session settings MedSight uses (intra-op threads, spinning off), and prints the share of
kernel time per operator type and the slowest nodes with their output shapes. This is how the int8
recipe in medsight/predict/quantize.py was chosen (docs/performance.md).

Usage: .venv/bin/python benchmarks/throughput/ort_profile.py brain-tumor-mri [--backend onnx-int8] [--batch 32]
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from medsight.models.preprocess import batch_to_tensor  # noqa: E402
from medsight.models.registry import load  # noqa: E402
from medsight.predict.cache import int8_model_path, onnx_model_path  # noqa: E402
from medsight.predict.settings import RuntimeSettings  # noqa: E402
from medsight.train.recipe import Recipe, recipe_splits  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--backend", choices=("onnx", "onnx-int8"), default="onnx-int8")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--top", type=int, default=25, help="slowest nodes to list")
    ap.add_argument("--data-root", type=Path, default=ROOT.parent / "shared" / "data")
    args = ap.parse_args()
    import onnxruntime as ort

    settings = RuntimeSettings(intra_op_threads=args.threads, decode_workers=0)
    pkg = load(args.model)
    path = onnx_model_path(pkg, settings) if args.backend == "onnx" else int8_model_path(pkg, settings)
    test = recipe_splits(Recipe.load(ROOT / "recipes" / f"{pkg.card.name}.json").data, args.data_root)["test"]
    images = [test.image(i % len(test)) for i in range(args.batch)]
    x = batch_to_tensor(images, pkg.card.input).numpy()
    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = args.threads, 1
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.enable_profiling = True
    so.profile_file_prefix = str(Path(tempfile.mkdtemp(prefix="ort-profile-")) / "profile")
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    warm = 5
    for _ in range(warm):
        sess.run(None, {"input": x})
    t = time.perf_counter()
    for _ in range(args.runs):
        sess.run(None, {"input": x})
    wall = (time.perf_counter() - t) / args.runs
    events = json.loads(Path(sess.end_profiling()).read_text())
    per_node: collections.Counter[str] = collections.Counter()
    op, shape = {}, {}
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            name = e["name"][: -len("_kernel_time")]
            per_node[name] += e["dur"]
            op[name], shape[name] = e["args"]["op_name"], e["args"].get("output_type_shape")
    total, runs = sum(per_node.values()), warm + args.runs
    print(f"{pkg.card.name} {args.backend} batch {args.batch}: {wall * 1000:.2f} ms/run wall, {args.batch / wall:.0f} images/s; "
          f"kernels {total / runs / 1000:.2f} ms/run")
    per_op: collections.Counter[str] = collections.Counter()
    for name, us in per_node.items():
        per_op[op[name]] += us
    for name, us in per_op.most_common():
        print(f"  {name:22s} {us / runs / 1000:7.3f} ms  {100 * us / total:5.1f}%")
    print("slowest nodes:")
    for name, us in per_node.most_common(args.top):
        print(f"  {op[name]:18s} {us / runs / 1000:6.3f} ms {100 * us / total:5.1f}%  {name[:55]:55s} {shape[name]}")


if __name__ == "__main__":
    main()
