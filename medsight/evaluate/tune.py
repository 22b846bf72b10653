"""Choose a model's fastest backend that keeps its accuracy, and record the choice in its card.

For one package and its recipe's data this

1. exports the network to ONNX and measures the largest logit difference from
   PyTorch over the whole official test split (rule: <= 1e-4);
2. measures int8 activation ranges on a seeded sample of *training* images, builds the
   int8 model, and measures its test AUC (rule: at most 0.005 below PyTorch's) and,
   when the model has an OOD detector, how often its referral flag agrees with
   PyTorch's (rule: on at least 99% of test images);
3. times every backend on the same test images (median of repeated passes at
   the engine's batch size);
4. writes the int8 calibration ranges to ``int8_calibration.json`` in the package
   (its sha256 goes in the card, like the weights'), so any machine can rebuild the
   same int8 model without the training data, and ``card.runtime``: the choice
   (fastest backend meeting its rule), why, and all measurements.

Only ``card.runtime`` is changed, on a card re-read just before writing, so fields
other tools maintain (``ood``, metrics) are never overwritten with stale values.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import date
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medsight._version import __version__
from medsight.errors import BackendError
from medsight.evaluate.calibration import probabilities
from medsight.evaluate.metrics import Scorer
from medsight.io.datasets import LabeledDataset, ReadFailure
from medsight.io.image import MedImage
from medsight.models.card import ModelCard
from medsight.models.package import ModelPackage, load_package, read_card, sha256_of, write_card
from medsight.models.preprocess import batch_to_tensor
from medsight.predict.ood import OODDetector, load_ood
from medsight.predict.backends import ForwardOutput, InferenceBackend, OnnxBackend, TorchBackend
from medsight.predict.cache import CALIBRATION_FILE, int8_model_path, onnx_model_path
from medsight.predict.cam import class_activation_maps
from medsight.predict.quantize import METHOD, calibration_sample, measure_calibration
from medsight.predict.settings import RuntimeSettings


@dataclass(frozen=True)
class AccuracyRule:
    max_abs_logit_diff: float = 1e-4  # fp32 ONNX vs PyTorch, every test image
    max_auc_drop: float = 0.005  # int8 vs PyTorch, official test split
    # int8 also changes the early-layer statistics the OOD detector scores: the referral decision
    # it drives (flag / no flag) must stay the same on at least this share of test images
    min_ood_flag_agreement: float = 0.99


@dataclass(frozen=True)
class TuneConfig:
    rule: AccuracyRule = AccuracyRule()
    calibration_images: int = 256
    batch_size: int = 32
    timing_images: int = 256
    timing_repeats: int = 5
    seed: int = 0


@dataclass(frozen=True)
class SplitInputs:
    """A split's readable images through the one preprocessing path."""

    x: torch.Tensor
    rows: np.ndarray  # their rows in the split: ``ds.y[rows]`` are their labels
    images: list[MedImage] | None  # kept when asked: a detector that scores image statistics needs them
    n_unreadable: int


def split_inputs(pkg: ModelPackage, ds: LabeledDataset, keep_images: bool = False, batch: int = 256) -> SplitInputs:
    """Every readable image of ``ds`` preprocessed (unreadable ones are skipped and counted)."""
    failures: list[ReadFailure] = []
    xs, rows, images = [], [], []
    for b in ds.batches(batch, failures):
        xs.append(batch_to_tensor(b.images, pkg.card.input))
        rows.append(b.index)
        if keep_images:
            images.extend(b.images)
    return SplitInputs(torch.cat(xs), np.concatenate(rows), images if keep_images else None, len(failures))


def _forward(backend: InferenceBackend, x: torch.Tensor, batch_size: int) -> ForwardOutput:
    return ForwardOutput.concat([backend.forward(x[i : i + batch_size]) for i in range(0, len(x), batch_size)])


def ood_agreement(detector: OODDetector | None, out: ForwardOutput, ref: ForwardOutput,
                  images: Sequence[MedImage] | None = None) -> dict[str, float]:
    """How far a backend's OOD scores and referral flags move from PyTorch's (empty without a detector).

    ``images``: the scored images, needed when the detector also scores image-level statistics
    (those are the same for every backend; only the layer statistics differ)."""
    if detector is None:
        return {}
    got = detector.score_statistics(detector.inputs(out.statistics, images))
    want = detector.score_statistics(detector.inputs(ref.statistics, images))
    return {"ood_flag_agreement": float(np.mean(detector.flags(got) == detector.flags(want))),
            "ood_max_abs_score_diff": float(np.abs(got - want).max())}


def heatmap_agreement(pkg: ModelPackage, backend: InferenceBackend, reference: InferenceBackend, x: torch.Tensor,
                      batch_size: int) -> dict[str, float]:
    """Pearson correlation of each image's heat map (reference's top class) with the reference backend's."""
    w = pkg.network.class_weights()
    size = pkg.card.input.size
    corr = []
    for i in range(0, len(x), batch_size):
        ref = reference.forward(x[i : i + batch_size])
        got = backend.forward(x[i : i + batch_size])
        k = ref.logits.argmax(axis=1).tolist()
        a, b = class_activation_maps(ref.feature_maps, w, k, size), class_activation_maps(got.feature_maps, w, k, size)
        corr += [float(np.corrcoef(u.ravel(), v.ravel())[0, 1]) for u, v in zip(a, b) if u.std() > 0 and v.std() > 0]
    return {"heatmap_corr_median": round(float(np.median(corr)), 4), "heatmap_corr_min": round(float(np.min(corr)), 4)} if corr else {}


def auc(card: ModelCard, y: np.ndarray, logits: np.ndarray) -> float | None:
    """The card's test metric AUC (binary: positive class; multi-class: macro one-vs-rest)."""
    p = probabilities(logits, card.calibration.temperature, card.task == "multilabel")
    return Scorer.for_card(card)(y, p).get("auc")


def images_per_second(backend: InferenceBackend, x: torch.Tensor, batch_size: int, repeats: int) -> float:
    """Median throughput over ``repeats`` passes over ``x`` (after one warm-up pass)."""
    def one_pass() -> float:
        t = time.perf_counter()
        for i in range(0, len(x), batch_size):
            backend.forward(x[i : i + batch_size])
        return time.perf_counter() - t

    one_pass()
    return len(x) / statistics.median(one_pass() for _ in range(repeats))


def machine() -> dict[str, Any]:
    import onnxruntime

    from medsight.predict.settings import available_cores

    # The load average says how much other work shared the CPU while timing (timings are relative).
    return {"cpu": cpu_model(), "cores": available_cores(), "load_average_1min": round(os.getloadavg()[0], 2),
            "torch": torch.__version__, "onnxruntime": onnxruntime.__version__, "date": str(date.today())}


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def choose(candidates: dict[str, dict[str, Any]]) -> tuple[str, str]:
    """Fastest eligible backend, and a sentence saying why."""
    eligible = {k: v for k, v in candidates.items() if v["eligible"]}
    best = max(eligible, key=lambda k: eligible[k]["images_per_s"])
    speed = ", ".join(f"{k} {v['images_per_s']:.0f}/s" for k, v in candidates.items())
    excluded = [f"{k} ({v['why']})" for k, v in candidates.items() if not v["eligible"]]
    return best, (f"fastest backend meeting the accuracy rule ({speed})"
                  + (f"; excluded: {'; '.join(excluded)}" if excluded else ""))


def tune(package_dir: str | Path, train: LabeledDataset, test: LabeledDataset, settings: RuntimeSettings | None = None,
         cfg: TuneConfig = TuneConfig(), write: bool = True) -> dict[str, Any]:
    """Measure every backend on ``test``, choose, and (``write``) store ``card.runtime``. Returns it."""
    settings = settings or RuntimeSettings()
    d = Path(package_dir)
    pkg = load_package(d)
    card = pkg.card
    detector = load_ood(pkg)
    inputs = split_inputs(pkg, test, keep_images=detector is not None and detector.uses_images)
    x, y, images = inputs.x, test.y[inputs.rows], inputs.images
    torch_b = TorchBackend(pkg.network)
    onnx_b = OnnxBackend(onnx_model_path(pkg, settings), settings, "onnx")
    calib_ds = train.subset(calibration_sample(train, cfg.calibration_images, cfg.seed))
    calibration = measure_calibration(onnx_b.model_path, calib_ds, card.input)
    int8_b = OnnxBackend(int8_model_path(pkg, settings, calibration), settings, "onnx-int8")

    ref_out = _forward(torch_b, x, cfg.batch_size)
    ref = ref_out.logits
    ref_auc = auc(card, y, ref)
    timing_x = x[: cfg.timing_images]
    candidates: dict[str, dict[str, Any]] = {}
    for b in (torch_b, onnx_b, int8_b):
        out = ref_out if b is torch_b else _forward(b, x, cfg.batch_size)
        a = auc(card, y, out.logits)
        diff = float(np.abs(out.logits - ref).max())
        entry: dict[str, Any] = {"images_per_s": round(images_per_second(b, timing_x, cfg.batch_size, cfg.timing_repeats), 1),
                                 "test_auc": a, "max_abs_logit_diff": diff,
                                 "auc_drop": None if a is None or ref_auc is None else ref_auc - a}
        if b is not torch_b:
            entry.update(heatmap_agreement(pkg, b, torch_b, timing_x, cfg.batch_size))
            entry.update(ood_agreement(detector, out, ref_out, images))
        if b is torch_b:
            entry.update(eligible=True, why="reference")
        elif b is onnx_b:
            ok = diff <= cfg.rule.max_abs_logit_diff
            entry.update(eligible=ok, why=f"max |logit - torch| {diff:.2e} {'<=' if ok else '>'} {cfg.rule.max_abs_logit_diff:g}")
        else:
            auc_ok = entry["auc_drop"] is not None and entry["auc_drop"] <= cfg.rule.max_auc_drop
            agree = entry.get("ood_flag_agreement", 1.0)
            ood_ok = agree >= cfg.rule.min_ood_flag_agreement
            drop = "n/a" if entry["auc_drop"] is None else f"{entry['auc_drop']:.4f}"
            why = f"test AUC drop {drop} {'<=' if auc_ok else '>'} {cfg.rule.max_auc_drop}"
            if detector is not None:
                why += f", OOD referral agreement {agree:.3f} {'>=' if ood_ok else '<'} {cfg.rule.min_ood_flag_agreement}"
            entry.update(eligible=auc_ok and ood_ok, why=why)
        candidates[b.name] = entry
    choice, reason = choose(candidates)
    skipped = f"; {inputs.n_unreadable} unreadable images left out" if inputs.n_unreadable else ""
    runtime = {
        "backend": choice, "reason": reason, "weights_sha256": card.weights_sha256,
        "rule": asdict(cfg.rule), "test_set": f"{test.name} (n={len(y)}{skipped})",
        "timing": {"batch_size": cfg.batch_size, "images": int(len(timing_x)), "repeats": cfg.timing_repeats,
                   "threads": settings.intra_op_threads},
        "machine": machine(), "candidates": candidates, "medsight_version": __version__,
        "int8": {"method": METHOD, "calibration_set": f"{train.name}: {len(calib_ds)} images (seed {cfg.seed})",
                 "calibration_file": CALIBRATION_FILE, "calibration_sha256": None},
    }
    if write:
        runtime["int8"]["calibration_sha256"] = _write_json(d / CALIBRATION_FILE, calibration)
        fresh = read_card(d)
        if fresh.weights_sha256 != card.weights_sha256:
            raise BackendError(f"{d}: weights changed while tuning; run again")
        fresh.runtime = runtime
        write_card(fresh, d)
    return runtime


def _write_json(path: Path, data: dict[str, Any]) -> str:
    """Atomic write (a reader never sees half a file); returns the file's sha256."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".calib-", suffix=".json")
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, sort_keys=True)
        f.write("\n")
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
    return sha256_of(path)
