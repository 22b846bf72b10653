"""Out-of-distribution detection on real data, for every shipped model.

For each finished zoo model:

1. fit the feature-statistics detector (``medsight.predict.ood.fit_ood``) on its train split,
   threshold on its val split (at most 1% of val flagged), and store it in the zoo
   package (``ood.safetensors`` + the card's ``ood`` field only; ``--no-write`` fits into
   a temporary copy instead);
2. score its official test split (in-distribution) and up to ``--per-set`` images of
   every OTHER data set in shared/data. Sets of another imaging family (dermoscopy vs
   chest X-ray, ...) are far-OOD: target AUROC >= 0.99 with <= 2% of in-distribution
   test images flagged. Sets of the same family (the two chest X-ray sets, the two
   breast ultrasound sets, which share source images) are reported as near-OOD, not
   held to that target;
3. selective prediction on the test split: the risk-coverage curve when the least
   confident cases are referred, and the deployed policy (refer when OOD or below
   the card's confidence floor).

    .venv/bin/python benchmarks/ood/run.py [--data-root ../shared/data] [--only NAME ...] [--no-write]

Writes benchmarks/ood/results.json, results.md and risk_coverage.png.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import numpy as np
from sklearn.metrics import roc_auc_score

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from medsight import __version__  # noqa: E402
from medsight.evaluate.calibration import probabilities  # noqa: E402
from medsight.evaluate.collect import collect_outputs  # noqa: E402
from medsight.evaluate.curves import risk_coverage  # noqa: E402
from medsight.evaluate.gallery import decisions  # noqa: E402
from medsight.evaluate.report import jsonable  # noqa: E402
from medsight.evaluate.shipped import DATA_SETS, is_finished, sample_of, shipped_models  # noqa: E402
from medsight.models.package import load_package  # noqa: E402
from medsight.predict.ood import dataset_statistics, fit_ood  # noqa: E402
from medsight.predict.predictor import Predictor  # noqa: E402

TARGET_AUROC, TARGET_FLAG = 0.99, 0.02


def run_model(m, data_root: Path, per_set: int, write: bool) -> dict:
    splits = m.splits(data_root)
    tmp = None
    if write:
        if not is_finished(m.directory):
            raise RuntimeError(f"{m.name}: training not finished; not writing into its package")
        target = m.directory
    else:
        tmp = Path(tempfile.mkdtemp())
        target = tmp / m.name
        shutil.copytree(m.directory, target)
    try:
        t = time.time()
        info = fit_ood(target, splits["train"], splits["val"])
        fit_s = time.time() - t
        pkg = load_package(target)
        pred = Predictor(pkg)  # the deployed path: its own detector, preprocessing and calibration
        det = pred.ood
        test = collect_outputs(pred, splits["test"])
        s_in = test.ood_scores
        own_family = DATA_SETS[m.source]
        sets, far_scores = {}, []
        for source, family in DATA_SETS.items():
            if source == m.source:
                continue
            stats, _ = dataset_statistics(pkg, sample_of(source, data_root, per_set))
            s_out = det.score_statistics(stats)
            auroc = roc_auc_score(np.r_[np.zeros(len(s_in)), np.ones(len(s_out))], np.r_[s_in, s_out])
            kind = "near-OOD (same imaging family)" if family == own_family else "far-OOD"
            sets[source] = {"family": family, "kind": kind, "n": int(len(s_out)), "auroc": float(auroc),
                            "flagged": float(det.flags(s_out).mean()), "median_score": float(np.median(s_out))}
            if kind == "far-OOD":
                far_scores.append(s_out)
        far = [k for k, v in sets.items() if v["kind"] == "far-OOD"]
        pooled = None
        if far_scores:
            f = np.concatenate(far_scores)
            pooled = float(roc_auc_score(np.r_[np.zeros(len(s_in)), np.ones(len(f))], np.r_[s_in, f]))
        # selective prediction on the in-distribution test split
        probs = probabilities(test.logits, pkg.card.calibration.temperature)
        y = splits["test"].y[test.index].astype(int)
        dec = decisions(pkg.card, probs)
        conf = probs[np.arange(len(y)), dec]
        correct = dec == y
        rc = risk_coverage(conf, correct)
        answered = ~det.flags(s_in) & (conf >= pkg.card.confidence.refer_below)
        policy = {"refer_below": pkg.card.confidence.refer_below, "coverage": float(answered.mean()),
                  "error_rate_answered": float(1 - correct[answered].mean()) if answered.any() else None,
                  "error_rate_all": float(1 - correct.mean())}
        return {
            "model": f"{m.card.name}@{m.card.version}", "source": m.source, "family": own_family,
            "written_to_zoo": write, "fit_seconds": fit_s, "ood": info,
            "in_distribution": {"n": int(len(s_in)), "flagged": float(det.flags(s_in).mean()), "median_score": float(np.median(s_in))},
            "sets": sets, "far_ood_pooled_auroc": pooled,
            "far_ood_min_auroc": min((sets[k]["auroc"] for k in far), default=None),
            "meets_target": bool(far and min(sets[k]["auroc"] for k in far) >= TARGET_AUROC and det.flags(s_in).mean() <= TARGET_FLAG),
            "risk_coverage": rc, "deployed_policy": policy,
        }
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)


def plot(results: list[dict], path: Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 5.5))
    ax = fig.subplots()
    for r in results:
        rc = r["risk_coverage"]
        ax.plot(rc["coverage"], rc["risk"], lw=2, label=f"{r['model']} (AURC {rc['aurc']:.3f})")
    ax.set(xlabel="coverage (share of test cases answered)", ylabel="error rate among answered cases",
           title="Risk-coverage on each model's test split (least confident referred first)", xlim=(0, 1.01))
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def markdown(results: list[dict], meta: dict) -> str:
    sources = list(DATA_SETS)
    lines = [
        "# OOD benchmark: feature-statistics detector (Mahalanobis + nearest neighbours on early-layer statistics)", "",
        f"Run {meta['date']} with MedSight {meta['medsight_version']} in {meta['seconds']:.0f} s; up to {meta['per_set']} images per "
        f"other data set (seeded). Detector fitted on each model's train split, threshold on its val split (<= 1% flagged). "
        f"Target: far-OOD AUROC >= {TARGET_AUROC} with <= {100 * TARGET_FLAG:.0f}% of in-distribution test images flagged.", "",
        "## AUROC (in-distribution test split vs each other data set) and share flagged at the stored threshold", "",
        "| model (own data) | ID test flagged | " + " | ".join(sources) + " | far-OOD min AUROC | target met |",
        "|---|---:|" + "---|" * len(sources) + "---:|:---:|",
    ]
    for r in results:
        cells = []
        for s in sources:
            v = r["sets"].get(s)
            cells.append("(own data)" if v is None else f"{v['auroc']:.3f} / {100 * v['flagged']:.0f}%" + (" (near)" if v["kind"] != "far-OOD" else ""))
        lines.append(f"| {r['model']} ({r['source']}) | {100 * r['in_distribution']['flagged']:.1f}% | " + " | ".join(cells)
                     + f" | {r['far_ood_min_auroc']:.4f} | {'yes' if r['meets_target'] else 'no'} |")
    lines += ["", "Cells: AUROC / share of that set flagged. (near) = same imaging family; not held to the target "
              "(the breast ultrasound sets even share source images).", "",
              "## Selective prediction on the test split", "",
              "| model | error rate, all answered | AURC | deployed policy: coverage | deployed policy: error rate among answered |",
              "|---|---:|---:|---:|---:|"]
    for r in results:
        p, rc = r["deployed_policy"], r["risk_coverage"]
        err = "-" if p["error_rate_answered"] is None else f"{p['error_rate_answered']:.3f}"
        lines.append(f"| {r['model']} | {p['error_rate_all']:.3f} | {rc['aurc']:.3f} | {100 * p['coverage']:.1f}% | {err} |")
    lines += ["", "Deployed policy: answer only when the image is not flagged OOD and the calibrated confidence is at least the "
              "card's refer_below; otherwise refer to a human. Curves: risk_coverage.png.", ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-root", type=Path, default=ROOT.parent / "shared" / "data")
    ap.add_argument("--only", nargs="*")
    ap.add_argument("--per-set", type=int, default=500)
    ap.add_argument("--no-write", action="store_true", help="fit into a temporary copy; leave the zoo untouched")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent)
    args = ap.parse_args()
    if not args.data_root.is_dir():
        sys.exit(f"error: {args.data_root} not found (pass --data-root)")
    t0 = time.time()
    results = []
    for m in shipped_models(ROOT / "recipes", only=args.only):
        t = time.time()
        r = run_model(m, args.data_root, args.per_set, write=not args.no_write)
        results.append(r)
        print(f"{r['model']}: ID flagged {100 * r['in_distribution']['flagged']:.1f}%, far-OOD min AUROC {r['far_ood_min_auroc']:.4f}, "
              + ", ".join(f"{k} {v['auroc']:.3f}" for k, v in r["sets"].items()) + f" [{time.time() - t:.0f} s]", flush=True)
    meta = {"date": str(date.today()), "medsight_version": __version__, "seconds": time.time() - t0, "per_set": args.per_set,
            "target_auroc": TARGET_AUROC, "target_id_flag_rate": TARGET_FLAG, "data_root": str(args.data_root)}
    (args.out / "results.json").write_text(json.dumps(jsonable({"meta": meta, "results": results}), indent=2) + "\n")
    (args.out / "results.md").write_text(markdown(results, meta))
    plot(results, args.out / "risk_coverage.png")
    print(f"wrote {args.out / 'results.json'}, results.md, risk_coverage.png")


if __name__ == "__main__":
    main()
