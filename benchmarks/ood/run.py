"""Out-of-distribution detection on real data, for every shipped model.

For each finished zoo model:

1. fit each detector design (``VARIANTS``: the network's layer statistics alone, or with
   the image-level statistics too) on its train split with the default threshold rule of
   ``medsight.evaluate.ood_fit`` (cross-fitted: 10 class-stratified folds of train, the
   threshold flags at most 1% of the pooled out-of-fold train scores + val scores, the
   stored detector is the one fitted on all folds but fold 0), and score its test split
   and the other data sets; two **held-out protocols** choose the design without the data
   it is scored on: (a) *synthetic*: the design with the highest mean AUROC between the
   val images and fixed synthetic corruptions of them (``CORRUPTIONS``: colour swap,
   inversion, gamma, blur, noise, low contrast) -- no real OOD image and no test image
   takes part, so every real set is held out; the package gets this design (``fit_ood``:
   ``ood.safetensors`` + the card's ``ood`` field only; ``--no-write`` fits into a
   temporary copy instead). A package whose card already records a design chosen this
   way keeps it (the current synthetic figures and the design they would pick are
   reported next to it); ``--reselect`` ships the design the current figures pick.
   (b) *leave one imaging modality out*: for each far-OOD modality, the design with the
   highest lowest AUROC on the *other* far-OOD modalities, scored on the held-out one;
2. score its official test split (in-distribution) and up to ``--per-set`` images of
   every OTHER data set in shared/data. Sets of another imaging family (dermoscopy vs
   chest X-ray, ...) are far-OOD: target AUROC >= 0.99 with <= 2% of in-distribution
   test images flagged. Sets of the same family (the two chest X-ray sets, the two
   breast ultrasound sets, which share source images) are reported as near-OOD, not
   held to that target;
3. selective prediction on the test split: the risk-coverage curve when the least
   confident cases are referred, and the deployed policy (refer when OOD or below
   the card's confidence floor).

    .venv/bin/python benchmarks/ood/run.py [--data-root ../shared/data] [--only NAME ...] [--no-write] [--reselect]

Writes benchmarks/ood/results.json, results.md and risk_coverage.png.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
import zlib
from datetime import date
from pathlib import Path

import numpy as np
from sklearn.metrics import roc_auc_score

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from medsight import __version__  # noqa: E402
from medsight.evaluate.collect import collect_outputs  # noqa: E402
from medsight.evaluate.curves import risk_coverage  # noqa: E402
from medsight.models.policy import decided_classes, referred  # noqa: E402
from medsight.evaluate.report import jsonable  # noqa: E402
from benchmarks.shipped import DATA_SETS, is_finished, sample_of, shipped_models  # noqa: E402
from medsight.models.package import load_package  # noqa: E402
from medsight.evaluate.ood_fit import (DEFAULT_FOLDS, DEFAULT_THRESHOLD_RULE, DEFAULT_VAL_FLAG_RATE,  # noqa: E402
                                       dataset_statistics, fit_detector, fit_ood)
from medsight.predict.ood import BLOCKS, LAYERS  # noqa: E402
from medsight.predict.load import load_model  # noqa: E402

TARGET_AUROC, TARGET_FLAG = 0.99, 0.02
THRESHOLD_RULE_TEXT = (f"cross-fitted ({DEFAULT_THRESHOLD_RULE}, medsight.evaluate.ood_fit): the train split in {DEFAULT_FOLDS} seeded, "
                       "class-stratified folds; every train image scored by the detector fitted on the other folds, pooled with "
                       "the val images scored by the stored detector (the one fitted on all folds but fold 0); the threshold "
                       f"flags at most {100 * DEFAULT_VAL_FLAG_RATE:.0f}% of that pool (the earlier rule: at most 1% of val alone)")


#: detector designs compared (in order of simplicity; a tie goes to the earlier one)
VARIANTS = {"network": LAYERS, "network+image": BLOCKS}


#: synthetic distribution shifts of the model's own val images, fixed before any result was seen (generic image
#: changes, not modelled on the other data sets); the shipped design is chosen on these, so every real OOD set is held out
LUMA = np.array([0.299, 0.587, 0.114])


def _colour_swap(px: np.ndarray) -> np.ndarray:
    """Grey -> a magenta tint with the same luma (invisible to a grey model's input); colour -> grey."""
    if px.shape[2] == 3:
        return np.repeat(px @ LUMA[:, None], 3, axis=2)
    d = (LUMA[0] + LUMA[2]) * 0.1 / LUMA[1]
    return np.concatenate([px + 0.1, px - d, px + 0.1], axis=2)


def _blur(px: np.ndarray) -> np.ndarray:
    from scipy.ndimage import uniform_filter

    size = max(3, min(px.shape[:2]) // 8)
    return uniform_filter(px, size=(size, size, 1), mode="nearest")


CORRUPTIONS = {
    "colour swap": _colour_swap,
    "inverted": lambda px: 1.0 - px,
    "gamma 0.4": lambda px: px ** 0.4,
    "blurred": _blur,
    # seeded by the image's own bytes: reproducible, and a different noise field for every image
    "noise 0.1": lambda px: px + np.random.default_rng(zlib.crc32(px.tobytes())).normal(0.0, 0.1, px.shape),
    "low contrast": lambda px: 0.5 * px + 0.25,
}


def corrupted_statistics(pkg, ds, n: int, seed: int = 0) -> dict[str, dict[str, np.ndarray]]:
    """Statistics (every block) of up to ``n`` seeded val images under each synthetic corruption."""
    from medsight.io.image import MedImage
    from medsight.models.preprocess import batch_to_tensor
    from medsight.predict.ood import IMAGE, image_statistics, layer_statistics

    idx = np.arange(len(ds)) if len(ds) <= n else np.sort(np.random.default_rng(seed).choice(len(ds), n, replace=False))
    base = [ds.image(int(i)) for i in idx]
    out = {}
    for name, f in CORRUPTIONS.items():
        ims = [MedImage(np.clip(f(im.pixels.astype(np.float64)), 0, 1).astype(np.float32)) for im in base]
        st = layer_statistics(pkg.network, batch_to_tensor(ims, pkg.card.input))
        st[IMAGE] = image_statistics(ims)
        out[name] = st
    return out


def auroc(s_in: np.ndarray, s_out: np.ndarray) -> float:
    return float(roc_auc_score(np.r_[np.zeros(len(s_in)), np.ones(len(s_out))], np.r_[s_in, s_out]))


def choose_variant(aurocs: dict[str, dict[str, float]], families: list[str]) -> str:
    """The design with the highest lowest AUROC over ``families`` (ties: the simpler design)."""
    return max(VARIANTS, key=lambda v: (round(min(aurocs[v][f] for f in families), 4), -list(VARIANTS).index(v)))


def run_model(m, data_root: Path, per_set: int, write: bool, reselect: bool = False) -> dict:
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
        pkg0 = load_package(target)
        stats = {s: dataset_statistics(pkg0, splits[s]) for s in ("train", "val", "test")}
        own_family = DATA_SETS[m.source]
        others = {src: dataset_statistics(pkg0, sample_of(src, data_root, per_set))[0] for src in DATA_SETS if src != m.source}
        far_families = sorted({DATA_SETS[s] for s in others} - {own_family})
        ytr = _targets(splits["train"])[stats["train"][1]]
        # every design fitted on train, standardised and thresholded on val, scored on test and every other set
        per_variant, detectors = {}, {}
        for name, blocks in VARIANTS.items():
            det, _ = fit_detector(stats["train"][0], ytr, stats["val"][0], blocks=blocks)
            detectors[name] = det
            s_in = det.score_statistics(stats["test"][0])
            sets = {}
            for src, st in others.items():
                s_out = det.score_statistics(st)
                sets[src] = {"family": DATA_SETS[src], "kind": "near-OOD (same imaging family)" if DATA_SETS[src] == own_family else "far-OOD",
                             "n": int(len(s_out)), "auroc": auroc(s_in, s_out), "flagged": float(det.flags(s_out).mean()),
                             "median_score": float(np.median(s_out))}
            # a modality's AUROC is its worst data set's (the target is per set, so this is the conservative figure)
            fam = {f: min(sets[s]["auroc"] for s in others if DATA_SETS[s] == f) for f in far_families}
            per_variant[name] = {"blocks": list(det.blocks), "id_flagged": float(det.flags(s_in).mean()), "sets": sets,
                                 "family_auroc": fam, "min_far_auroc": min(fam.values())}
        # synthetic protocol: each design scored on val vs corrupted val images (no real OOD image, no test image)
        corrupted = corrupted_statistics(pkg0, splits["val"], per_set)
        for name in VARIANTS:
            det = detectors[name]
            s_val = det.score_statistics(stats["val"][0])  # the val images, scored by the detector the package would store
            syn = {c: auroc(s_val, det.score_statistics(st)) for c, st in corrupted.items()}
            per_variant[name]["synthetic_auroc"] = syn
            per_variant[name]["synthetic_mean_auroc"] = float(np.mean(list(syn.values())))
        synthetic_choice = max(VARIANTS, key=lambda v: (round(per_variant[v]["synthetic_mean_auroc"], 4), -list(VARIANTS).index(v)))
        fam_auc = {v: per_variant[v]["family_auroc"] for v in VARIANTS}
        # leave-one-modality-out: the design is chosen on the other far-OOD modalities, scored on the held-out one
        held_out = {}
        for f in far_families:
            v = choose_variant(fam_auc, [g for g in far_families if g != f])
            held_out[f] = {"chosen": v, "auroc": fam_auc[v][f], "id_flagged": per_variant[v]["id_flagged"]}
        ho_min = min(h["auroc"] for h in held_out.values())
        ho_flag = max(h["id_flagged"] for h in held_out.values())
        # the design the package carries: chosen on synthetic corruptions of val only, so every real OOD set is held out;
        # a design already chosen that way and recorded in the card is kept (unless --reselect)
        recorded = ((pkg0.card.ood or {}).get("selection") or {})
        if not reselect and recorded.get("chosen") in VARIANTS:
            shipped, selection = recorded["chosen"], dict(recorded)
            selection.setdefault("kept", "chosen when the detector was thresholded on val alone (the figures above are from "
                                         "then); kept when it was refitted with the cross-fitted threshold")
        else:
            shipped = synthetic_choice
            selection = {"rule": "highest mean AUROC, val images vs synthetic corruptions of them "
                                 f"({', '.join(CORRUPTIONS)}; benchmarks/ood); candidates {list(VARIANTS)}",
                         "chosen": shipped, "synthetic_mean_auroc_by_design": {v: per_variant[v]["synthetic_mean_auroc"] for v in VARIANTS}}
        info = fit_ood(target, splits["train"], splits["val"], blocks=VARIANTS[shipped], selection=selection)
        fit_s = time.time() - t
        pkg = load_package(target)
        # the deployed path (its own detector, preprocessing and calibration) on the torch backend the fit below uses
        pred = load_model(pkg, backend="torch")
        det = pred.ood
        test = collect_outputs(pred, splits["test"])
        s_in = test.ood_scores
        # the package's detector gives the deployed path's scores; the benchmark's own fit must agree with it
        check = fit_detector(stats["train"][0], ytr, stats["val"][0], blocks=VARIANTS[shipped])[0].score_statistics(stats["test"][0])
        assert np.allclose(check, s_in, rtol=1e-4, atol=1e-4), "deployed OOD scores differ from the benchmark's fit"
        sets = per_variant[shipped]["sets"]
        far = [k for k, v in sets.items() if v["kind"] == "far-OOD"]
        # selective prediction on the in-distribution test split
        probs = pred.calibrate(test.logits)
        y = splits["test"].y[test.index].astype(int)
        dec = decided_classes(pkg.card, probs)
        conf = probs[np.arange(len(y)), dec]
        correct = dec == y
        rc = risk_coverage(conf, correct)
        answered = ~referred(pkg.card, conf, s_in)
        policy = {"refer_below": pkg.card.confidence.refer_below, "coverage": float(answered.mean()),
                  "error_rate_answered": float(1 - correct[answered].mean()) if answered.any() else None,
                  "error_rate_all": float(1 - correct.mean())}
        id_flag = float(det.flags(s_in).mean())
        return {
            "model": f"{m.card.name}@{m.card.version}", "source": m.source, "family": own_family,
            "written_to_zoo": write, "fit_seconds": fit_s, "ood": info, "shipped_design": shipped,
            "synthetic_choice_now": synthetic_choice, "design_kept_from_card": shipped == recorded.get("chosen") and not reselect,
            "in_distribution": {"n": int(len(s_in)), "flagged": id_flag, "median_score": float(np.median(s_in))},
            "sets": sets, "designs": per_variant, "held_out": held_out, "lomo_design_on_all_modalities": choose_variant(fam_auc, far_families),
            "held_out_min_far_auroc": ho_min, "held_out_worst_id_flagged": ho_flag,
            "far_ood_min_auroc": min((sets[k]["auroc"] for k in far), default=None),
            "meets_target_held_out": bool(ho_min >= TARGET_AUROC and ho_flag <= TARGET_FLAG),
            "meets_target": bool(far and min(sets[k]["auroc"] for k in far) >= TARGET_AUROC and id_flag <= TARGET_FLAG),
            "risk_coverage": rc, "deployed_policy": policy,
        }
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)


def _targets(ds) -> np.ndarray:
    return np.zeros(len(ds), dtype=int) if ds.multilabel else np.asarray(ds.y).astype(int)


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
    pct = lambda v: f"{100 * v:.1f}%"  # noqa: E731
    lines = [
        "# OOD benchmark: feature-statistics detector (network layers, optionally image-level statistics)", "",
        f"Run {meta['date']} with MedSight {meta['medsight_version']} in {meta['seconds']:.0f} s; up to {meta['per_set']} images per "
        f"other data set (seeded). Threshold rule: {meta['threshold_rule']}. "
        f"AUROC: in-distribution test split vs the other data sets. "
        f"Target: far-OOD AUROC >= {TARGET_AUROC} with <= {100 * TARGET_FLAG:.0f}% of in-distribution test images flagged.", "",
        f"Designs: {', '.join(f'`{k}` = {list(v)}' for k, v in VARIANTS.items())}.", "",
        "## The shipped detector (design chosen on synthetic corruptions of val: every real set below is held out)", "",
        "| model | design (mean synthetic AUROC now: " + " / ".join(VARIANTS) + ") | threshold set: n (flagged: out-of-fold train / val) "
        "| ID test flagged | far-OOD min AUROC (set) | target met |",
        "|---|---|---|---:|---|:---:|",
    ]
    for r in results:
        far = {k: v for k, v in r["sets"].items() if v["kind"] == "far-OOD"}
        worst = min(far, key=lambda k: far[k]["auroc"])
        syn = " / ".join(f"{r['designs'][v]['synthetic_mean_auroc']:.3f}" for v in VARIANTS)
        kept = "" if r["synthetic_choice_now"] == r["shipped_design"] else f"; kept from the card, the figures now pick {r['synthetic_choice_now']}"
        tset = f"{r['ood']['n_threshold_set']} (" + " / ".join(pct(p["flag_rate"]) for p in r["ood"]["threshold_set_parts"]) + ")"
        lines.append(f"| {r['model']} | {r['shipped_design']} ({syn}{kept}) | {tset} | {pct(r['in_distribution']['flagged'])} | "
                     f"{far[worst]['auroc']:.4f} ({worst}) | {'yes' if r['meets_target'] else 'no'} |")
    lines += [
        "", "Synthetic corruptions (of up to the per-set number of val images): " + ", ".join(CORRUPTIONS)
        + ". Colour swap: a grey image gets a tint that keeps its luma (a grey model's input is unchanged), a colour image is made grey.", "",
        "## Second held-out protocol: leave one imaging modality out", "",
        "For each far-OOD modality in turn, the design is chosen on the *other* far-OOD modalities only (highest lowest AUROC) "
        "and scored on the held-out one, so no reported AUROC was used to choose the design that produced it. "
        "A modality's AUROC is that of its worst data set. "
        "The ID flag rate is that of the design chosen (worst over the held-out rounds).", "",
        "| model | held-out min far-OOD AUROC (modality) | ID test flagged | per held-out modality: design chosen without it -> AUROC | target met |",
        "|---|---|---:|---|:---:|",
    ]
    for r in results:
        ho = r["held_out"]
        worst = min(ho, key=lambda f: ho[f]["auroc"])
        cells = "; ".join(f"{f}: {h['chosen']} -> {h['auroc']:.4f}" for f, h in ho.items())
        lines.append(f"| {r['model']} | {r['held_out_min_far_auroc']:.4f} ({worst}) | {pct(r['held_out_worst_id_flagged'])} | {cells} | "
                     f"{'yes' if r['meets_target_held_out'] else 'no'} |")
    lines += ["", "## Designs compared (lowest far-OOD AUROC over modalities / ID test flagged; synthetic AUROC per corruption)", "",
              "| model | " + " | ".join(VARIANTS) + " | shipped (chosen on synthetic corruptions) |", "|---|" + "---|" * len(VARIANTS) + "---|"]
    for r in results:
        lines.append(f"| {r['model']} | " + " | ".join(
            f"{r['designs'][v]['min_far_auroc']:.4f} / {pct(r['designs'][v]['id_flagged'])}; synthetic: "
            + ", ".join(f"{c} {a:.3f}" for c, a in r["designs"][v]["synthetic_auroc"].items()) for v in VARIANTS) + f" | {r['shipped_design']} |")
    lines += ["", "## The shipped detector: AUROC / share flagged per data set", "",
              "The shipped design was chosen on synthetic corruptions of val only, so these are held-out figures.", "",
              "| model (own data) | ID test flagged | " + " | ".join(sources) + " | far-OOD min AUROC |",
              "|---|---:|" + "---|" * len(sources) + "---:|"]
    for r in results:
        cells = []
        for s in sources:
            v = r["sets"].get(s)
            cells.append("(own data)" if v is None else f"{v['auroc']:.3f} / {100 * v['flagged']:.0f}%" + (" (near)" if v["kind"] != "far-OOD" else ""))
        lines.append(f"| {r['model']} ({r['source']}) | {pct(r['in_distribution']['flagged'])} | " + " | ".join(cells)
                     + f" | {r['far_ood_min_auroc']:.4f} |")
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
    ap.add_argument("--reselect", action="store_true", help="ship the design the current synthetic figures pick, not the card's")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent)
    args = ap.parse_args()
    if not args.data_root.is_dir():
        sys.exit(f"error: {args.data_root} not found (pass --data-root)")
    t0 = time.time()
    results = []
    for m in shipped_models(ROOT / "recipes", only=args.only):
        t = time.time()
        r = run_model(m, args.data_root, args.per_set, write=not args.no_write, reselect=args.reselect)
        results.append(r)
        print(f"{r['model']}: shipped {r['shipped_design']}, ID flagged {100 * r['in_distribution']['flagged']:.1f}%, "
              f"held-out min far AUROC {r['held_out_min_far_auroc']:.4f} (ID flag {100 * r['held_out_worst_id_flagged']:.1f}%), "
              + ", ".join(f"{k} {v['auroc']:.3f}" for k, v in r["sets"].items()) + f" [{time.time() - t:.0f} s]", flush=True)
    meta = {"date": str(date.today()), "medsight_version": __version__, "seconds": time.time() - t0, "per_set": args.per_set,
            "target_auroc": TARGET_AUROC, "target_id_flag_rate": TARGET_FLAG, "data_root": str(args.data_root),
            "threshold_rule": THRESHOLD_RULE_TEXT}
    (args.out / "results.json").write_text(json.dumps(jsonable({"meta": meta, "results": results}), indent=2) + "\n")
    (args.out / "results.md").write_text(markdown(results, meta))
    plot(results, args.out / "risk_coverage.png")
    print(f"wrote {args.out / 'results.json'}, results.md, risk_coverage.png")


if __name__ == "__main__":
    main()
