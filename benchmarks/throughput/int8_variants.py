"""Compare int8 quantisation recipes of one zoo model: speed (interleaved) and the accuracy rule.

How the recipe in medsight/predict/quantize.py was chosen (docs/performance.md). Each variant is
built from the model's fp32 export with ``onnxruntime.quantization.quantize_static``, calibrated on
the same 256 seeded training images as ``medsight runtime tune``, then scored like tune scores it
(test AUC drop vs PyTorch, OOD referral agreement) and timed at batch 32 and 128 (median of 5
repeats of >= 0.3 s each, variants interleaved so load from other jobs hits all alike).

Usage: .venv/bin/python benchmarks/throughput/int8_variants.py brain-tumor-mri [--variants a,b] [--data-root ../shared/data]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from medsight.models.registry import load  # noqa: E402
from medsight.predict.ood import load_ood  # noqa: E402
from medsight.predict.backends import OnnxBackend, TorchBackend  # noqa: E402
from medsight.predict.cache import onnx_model_path  # noqa: E402
from medsight.predict.quantize import DatasetCalibrationReader, _preprocess, calibration_sample  # noqa: E402
from medsight.predict.settings import RuntimeSettings  # noqa: E402
from medsight.evaluate.tune import _forward, auc, ood_agreement, split_inputs  # noqa: E402
from medsight.train.recipe import Recipe, recipe_splits  # noqa: E402

STEM = ["/conv1/Conv", "/act/Relu", "/maxpool/MaxPool"]
BLOCK_OPS = ["Conv", "Gemm", "Relu", "MaxPool", "Add"]
VARIANTS = {
    "qdq-conv-gemm": dict(fmt=QuantFormat.QDQ, ops=["Conv", "Gemm"]),
    "qdq-blocks": dict(fmt=QuantFormat.QDQ, ops=BLOCK_OPS),
    "qdq-blocks-fp32-stem": dict(fmt=QuantFormat.QDQ, ops=BLOCK_OPS, exclude=STEM),
    "qop-conv-gemm": dict(fmt=QuantFormat.QOperator, ops=["Conv", "Gemm"]),
    "qop-blocks": dict(fmt=QuantFormat.QOperator, ops=BLOCK_OPS),
    "qop-blocks-fp32-stem": dict(fmt=QuantFormat.QOperator, ops=BLOCK_OPS, exclude=STEM),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--variants", default="qdq-conv-gemm,qdq-blocks,qdq-blocks-fp32-stem,qop-conv-gemm,qop-blocks-fp32-stem")
    ap.add_argument("--data-root", type=Path, default=ROOT.parent / "shared" / "data")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    unknown = [v for v in args.variants.split(",") if v not in VARIANTS]
    if unknown:
        ap.error(f"unknown variant(s) {unknown}; choose from {', '.join(VARIANTS)}")
    torch.set_num_threads(args.threads)
    settings = RuntimeSettings(intra_op_threads=args.threads, decode_workers=0)
    pkg = load(args.model)
    card = pkg.card
    splits = recipe_splits(Recipe.load(ROOT / "recipes" / f"{card.name}.json").data, args.data_root)
    train, test = splits["train"], splits["test"]
    fp32 = onnx_model_path(pkg, settings)
    calib = train.subset(calibration_sample(train, 256, 0))
    out = Path(tempfile.mkdtemp(prefix="int8-variants-"))
    _preprocess(fp32, out / "pre.onnx")
    backends = {"onnx (fp32)": OnnxBackend(fp32, settings, "onnx")}
    for v in args.variants.split(","):
        c = VARIANTS[v]
        quantize_static(str(out / "pre.onnx"), str(out / f"{v}.onnx"), DatasetCalibrationReader(calib, card.input),
                        quant_format=c["fmt"], per_channel=True, reduce_range=True, activation_type=QuantType.QUInt8,
                        weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod.MinMax, op_types_to_quantize=c["ops"],
                        nodes_to_exclude=c.get("exclude", []))
        backends[v] = OnnxBackend(out / f"{v}.onnx", settings, v)
    detector = load_ood(pkg)
    inputs = split_inputs(pkg, test, keep_images=detector is not None and detector.uses_images)
    x, y, images = inputs.x, test.y[inputs.rows], inputs.images
    ref = _forward(TorchBackend(pkg.network), x, 32)
    ref_auc = auc(card, y, ref.logits)
    rows = {}
    for v, b in backends.items():
        o = _forward(b, x, 32)
        rows[v] = {"auc_drop": ref_auc - auc(card, y, o.logits), "ood": ood_agreement(detector, o, ref, images).get("ood_flag_agreement", 1.0)}
    xx = x[:128] if len(x) >= 128 else x.repeat(128 // len(x) + 1, 1, 1, 1)[:128]
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        pkg.network(xx[:1])
    rates: dict[tuple[str, int], list[float]] = {}
    for _ in range(5):
        for v, b in backends.items():
            for bs in (32, 128):
                batches = [xx[i : i + bs] for i in range(0, 128, bs)]
                b.forward(batches[0])
                n, t = 0, time.perf_counter()
                while time.perf_counter() - t < 0.3:
                    for q in batches:
                        b.forward(q)
                        n += len(q)
                rates.setdefault((v, bs), []).append(n / (time.perf_counter() - t))
    import os

    print(f"{card.name}: {len(test)} test images; load average {os.getloadavg()[0]:.2f}; GFLOP/image {fc.get_total_flops() / 1e9:.3f}")
    print("| variant | images/s bs 32 | bs 128 | test AUC drop | OOD referral agreement |\n|---|---|---|---|---|")
    for v in backends:
        print(f"| {v} | {statistics.median(rates[(v, 32)]):.0f} | {statistics.median(rates[(v, 128)]):.0f} | "
              f"{rows[v]['auc_drop']:.4f} | {rows[v]['ood']:.3f} |")


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
