"""Near-out-of-distribution: does a shipped model refuse real images of its modality but the wrong body part, view, age or device?

    .venv/bin/python benchmarks/near_ood/run.py [--data-root ../shared/data] [--only NAME ...] [--per-set 500] [--threads 1]

For each finished zoo model (its package as shipped: detector, threshold and policy untouched;
the deployed Predictor on the torch backend, ``Prediction.ood_score`` and ``Prediction.refer``):

1. its official test split (``benchmarks/shipped.py``) is the in-distribution side: share flagged
   by the detector, share analysed (a result reported: ``refer`` is False);
2. every near-OOD set of ``benchmarks/near_ood/sets.py`` (pydicom's DICOM files of other anatomy,
   the other shared data sets of the same or a neighbouring modality): AUROC of the OOD score
   (test split vs the set), share flagged, share analysed and analysed with a critical finding;
   for DICOM images also whether routing (``medsight.models.applicability.check`` on the header,
   when that module exists) would give the image to this model, and the share analysed after
   routing and detector together. A set without headers (PNG/JPEG) fits no model under routing
   unless an operator overrides it, so its "after routing + detector" share is the detector's alone;
3. far-OOD as in benchmarks/ood: the shared sets of another imaging family (``DATA_SETS``).

Shared sets are capped at ``--per-set`` images (a seeded sample, seed 0); multi-frame DICOM files
at the frames named in sets.py. Writes benchmarks/near_ood/results.json and results.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import date
from pathlib import Path

import numpy as np
from sklearn.metrics import roc_auc_score

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from benchmarks.near_ood.sets import BODY_PART, IN_SCOPE, KINDS, NEAR_SETS, DicomSet, Items, dicom_items, shared_items  # noqa: E402
from benchmarks.shipped import DATA_SETS, sample_of, shipped_models  # noqa: E402
from medsight import __version__  # noqa: E402
from medsight.evaluate.report import jsonable  # noqa: E402
from medsight.models import policy  # noqa: E402
from medsight.predict.load import load_model  # noqa: E402
from medsight.predict.result import Prediction  # noqa: E402
from medsight.predict.settings import RuntimeSettings  # noqa: E402

TARGET_NEAR_AUROC, TARGET_FAR_AUROC, TARGET_ID_FLAG = 0.95, 0.99, 0.02


def routing_check():
    """``applicability.check`` where routing exists in this checkout, else None (the detector is then reported alone)."""
    try:
        from medsight.models.applicability import StudyAttributes, check
    except ImportError:
        return None
    return lambda card, header: check(card, StudyAttributes.from_header(header))


def outcomes(pred, images: list) -> dict[str, np.ndarray | list]:
    """What the deployed path says about each image: OOD score, flagged, analysed (not referred), critical finding."""
    rows, failed = [], []
    for p in pred.stream(images, explain=False, batch_size=32, workers=0):
        if isinstance(p, Prediction):
            rows.append(p)
        else:
            failed.append({"source": p.source, "error": p.error})
    scores = np.array([p.ood_score for p in rows], dtype=float)
    return {"score": scores, "flagged": policy.out_of_distribution(pred.card, scores),
            "analysed": np.array([not p.refer for p in rows], dtype=bool),
            "critical": np.array([not p.refer and policy.is_critical(pred.card, p.label, p.probabilities) for p in rows], dtype=bool),
            "label": [p.label for p in rows], "failed": failed}


def auroc(s_in: np.ndarray, s_out: np.ndarray) -> float:
    return float(roc_auc_score(np.r_[np.zeros(len(s_in)), np.ones(len(s_out))], np.r_[s_in, s_out]))


def summary(o: dict, s_in: np.ndarray | None = None) -> dict:
    out = {"n": len(o["score"]), "failed": o["failed"], "flagged": float(o["flagged"].mean()),
           "analysed": float(o["analysed"].mean()), "analysed_n": int(o["analysed"].sum()),
           "analysed_critical_n": int(o["critical"].sum()), "median_score": float(np.median(o["score"]))}
    if s_in is not None:
        out["auroc"] = auroc(s_in, o["score"])
    return out


def score_set(pred, s, items: Items, s_in: np.ndarray, check) -> dict:
    o = outcomes(pred, items.images)
    if len(o["score"]) != len(items.images):
        raise RuntimeError(f"{s.name}: {len(o['failed'])} image(s) could not be read: {o['failed'][:2]}")
    r = {"name": s.name, "kind": s.kind, "note": getattr(s, "note", ""), **summary(o, s_in)}
    if isinstance(s, DicomSet):
        fits = [check(pred.card, h) if check else None for h in items.headers]
        routed = np.array([f is not None and f.applies for f in fits], dtype=bool)
        r["routed_n"] = int(routed.sum()) if check else None
        r["analysed_after_routing_n"] = int((routed & o["analysed"]).sum()) if check else None
        r["images"] = [{"source": src, "anatomy": d.anatomy, "known_from": d.known_from,
                        "modality": str(h.get("Modality", "")), "body_part_examined": str(h.get("BodyPartExamined", "")),
                        "ood_score": float(sc), "flagged": bool(fl), "analysed": bool(an), "label": lab,
                        "routed": None if f is None else bool(f.applies),
                        "routing_reasons": None if f is None else list(f.reasons)}
                       for src, d, h, sc, fl, an, lab, f in zip(items.sources, items.described, items.headers, o["score"],
                                                                o["flagged"], o["analysed"], o["label"], fits)]
    else:
        # no header: routing fits it to no model; only an operator override runs it, and then the detector decides alone
        r["routed_n"] = None
        r["analysed_after_routing_n"] = r["analysed_n"]
    return r


def _images(ds) -> list:
    """A labelled set's images as the Predictor takes them: its paths, or its in-memory images read one by one."""
    return ds.images if isinstance(ds.images, list) else [ds.image(i) for i in range(len(ds))]


def run_model(m, data_root: Path, per_set: int, threads: int, check) -> dict:
    t = time.time()
    pred = load_model(m.directory, backend="torch", settings=RuntimeSettings(intra_op_threads=threads, decode_workers=0))
    test = m.splits(data_root)["test"]
    o_in = outcomes(pred, _images(test))
    s_in = o_in["score"]
    near = []
    for s in NEAR_SETS.get(m.name, []):
        items = dicom_items(s) if isinstance(s, DicomSet) else shared_items(s, data_root, per_set)
        near.append(score_set(pred, s, items, s_in, check))
    own = DATA_SETS[m.source]
    far = []
    for src, fam in DATA_SETS.items():
        if fam == own:
            continue
        ds = sample_of(src, data_root, per_set)
        o = outcomes(pred, _images(ds))
        far.append({"name": src, "family": fam, **summary(o, s_in)})
    held = [r for r in near if r["kind"] != IN_SCOPE]
    body = [r for r in near if r["kind"] == BODY_PART]
    id_flag = float(o_in["flagged"].mean())
    near_min = min(held, key=lambda r: r["auroc"]) if held else None
    far_min = min(far, key=lambda r: r["auroc"])
    dicom = [r for r in body if "images" in r]
    headerless = [r for r in body if "images" not in r]
    goal = {
        "body_part_images": sum(r["n"] for r in body),
        "body_part_analysed_detector": sum(r["analysed_n"] for r in body),
        "body_part_dicom_images": sum(r["n"] for r in dicom),
        "body_part_dicom_analysed_after_routing": (sum(r["analysed_after_routing_n"] for r in dicom) if check else None),
        "body_part_headerless_images": sum(r["n"] for r in headerless),
        "body_part_headerless_analysed_on_override": sum(r["analysed_n"] for r in headerless),
        # the worst case: every headerless image run by an operator override, so the detector alone decides on it
        "body_part_analysed_after_routing": (sum(r["analysed_after_routing_n"] for r in body) if check else None),
        "near_min_auroc": near_min and near_min["auroc"], "near_min_set": near_min and near_min["name"],
        "near_min_n": near_min and near_min["n"],
        "far_min_auroc": far_min["auroc"], "far_min_set": far_min["name"], "id_flagged": id_flag,
    }
    goal["detector_met"] = bool((near_min is None or goal["near_min_auroc"] >= TARGET_NEAR_AUROC)
                                and goal["far_min_auroc"] >= TARGET_FAR_AUROC and id_flag <= TARGET_ID_FLAG)
    goal["zero_findings_met"] = (goal["body_part_analysed_after_routing"] == 0) if check else None
    return {"model": f"{m.card.name}@{m.card.version}", "name": m.name, "source": m.source, "family": own,
            "ood_threshold": float(pred.card.ood["threshold"]), "refer_below": pred.card.confidence.refer_below,
            "in_distribution": {"split": "test", **summary(o_in)}, "near": near, "far": far, "goal": goal,
            "seconds": time.time() - t}


def _pct(v: float) -> str:
    return f"{100 * v:.1f}%"


def _yes(v: bool | None) -> str:
    return "-" if v is None else ("yes" if v else "**no**")


def markdown(results: list[dict], meta: dict) -> str:
    routing = meta["routing"]
    lines = [
        "# Near-OOD benchmark: real images of the same modality, wrong body part, view, age or device", "",
        "    .venv/bin/python benchmarks/near_ood/run.py --threads 1", "",
        f"Run {meta['date']} with MedSight {meta['medsight_version']} in {meta['seconds']:.0f} s on {meta['threads']} thread(s); "
        f"shared sets capped at {meta['per_set']} images each (seeded sample, seed 0); multi-frame DICOM files at the "
        "frames named in `sets.py`. The shipped packages as they are (detector, threshold, policy untouched), on the "
        "torch backend; scores are `Prediction.ood_score`, flags the card's OOD threshold, \"analysed\" is "
        "`Prediction.refer` False (a result is reported: not OOD-flagged and confidence at least the card's refer_below).",
        "",
        "Routing: " + ("`medsight.models.applicability.check` (the card's `applicability` against each DICOM image's "
                       "header) as it stands in this checkout; \"routed\" = routing would give the image to this model. "
                       "PNG/JPEG sets have no header: routing fits them to no model, so only an operator override runs "
                       "them and the detector decides alone; their \"after routing + detector\" figure is that case."
                       if routing else "**not available** in this checkout (no `medsight/models/applicability.py`): "
                       "the detector is reported alone."),
        "",
        f"Goal (not moved): with routing and the detector together, 0 near-OOD images of another body part analysed; "
        f"the detector alone: AUROC >= {TARGET_NEAR_AUROC} on every near-OOD set, >= {TARGET_FAR_AUROC} on every "
        f"far-OOD set, <= {100 * TARGET_ID_FLAG:.0f}% of in-distribution test images flagged. The \"{IN_SCOPE}\" set "
        "is images the model should read and is held to none of it.", "",
        "## Summary", "",
        "| model | ID test flagged (analysed) | near-OOD min AUROC (set) | far-OOD min AUROC (set) | other-body-part images analysed, detector alone | routing + detector: DICOM | headerless, on operator override | detector goal | 0-findings goal |",
        "|---|---:|---|---|---:|---:|---:|:---:|:---:|",
    ]
    for r in results:
        g, idd = r["goal"], r["in_distribution"]
        dicom = "-" if g["body_part_dicom_analysed_after_routing"] is None else str(g["body_part_dicom_analysed_after_routing"])
        near = "-" if g["near_min_auroc"] is None else f"{g['near_min_auroc']:.3f} ({g['near_min_set']}, n={g['near_min_n']})"
        lines.append(f"| {r['model']} | {_pct(g['id_flagged'])} ({_pct(idd['analysed'])}) | {near} | "
                     f"{g['far_min_auroc']:.3f} ({g['far_min_set']}) | {g['body_part_analysed_detector']}/{g['body_part_images']} | "
                     f"{dicom}/{g['body_part_dicom_images']} | {g['body_part_headerless_analysed_on_override']}/"
                     f"{g['body_part_headerless_images']} | {_yes(g['detector_met'])} | {_yes(g['zero_findings_met'])} |")
    lines += ["", "Headerless (PNG/JPEG) images fit no model under routing, so without an override none is analysed; the "
              "0-findings goal is judged on the worst case, every headerless image run by an operator override "
              "(the detector alone then decides). Near-OOD min AUROC: over every set but the in-scope control."]
    lines += ["", "## Near-OOD sets per model", "",
              "Flagged: share the detector flags. Analysed: share with a reported result (detector alone, as the model "
              "would answer if the image reached it); of which critical: a critical finding of the card. Routed: "
              "DICOM images routing would give to this model. After routing + detector: images analysed by this model "
              "once both apply.", ""]
    for r in results:
        idd = r["in_distribution"]
        lines += [f"### {r['model']} ({r['source']}; OOD threshold {r['ood_threshold']:.1f}, refer below {r['refer_below']:.2f})", "",
                  "| set | kind | n | AUROC | flagged | analysed (critical) | routed | analysed after routing + detector |",
                  "|---|---|---:|---:|---:|---:|---:|---:|",
                  f"| test split (in-distribution) | - | {idd['n']} | - | {_pct(idd['flagged'])} | "
                  f"{_pct(idd['analysed'])} ({idd['analysed_critical_n']}) | - | - |"]
        for s in sorted(r["near"], key=lambda s: KINDS.index(s["kind"])):
            routed = "n/a (no header)" if s["routed_n"] is None and "images" not in s else ("-" if s["routed_n"] is None else f"{s['routed_n']}/{s['n']}")
            after = "-" if s["analysed_after_routing_n"] is None else f"{s['analysed_after_routing_n']}/{s['n']}"
            name = s["name"] + (f" ({s['note']})" if s["note"] else "")
            lines.append(f"| {name} | {s['kind']} | {s['n']} | {s['auroc']:.3f} | {_pct(s['flagged'])} | "
                         f"{s['analysed_n']}/{s['n']} ({s['analysed_critical_n']}) | {routed} | {after} |")
        lines.append("")
    lines += ["## Far-OOD (another imaging family, as in benchmarks/ood): AUROC / share flagged", "",
              f"Up to {meta['per_set']} images per set here (benchmarks/ood samples up to 500), scored by the shipped "
              "detector (benchmarks/ood refits its designs on the same splits; the shipped one gives the same scores).", "",
              "| model | " + " | ".join(DATA_SETS) + " |", "|---|" + "---|" * len(DATA_SETS)]
    for r in results:
        far = {f["name"]: f for f in r["far"]}
        lines.append(f"| {r['model']} | " + " | ".join(
            "(same family)" if s not in far else f"{far[s]['auroc']:.3f} / {100 * far[s]['flagged']:.0f}%" for s in DATA_SETS) + " |")
    lines += ["", "## Every DICOM image: what the detector and routing did", "",
              "| model | image | anatomy (how known) | header Modality / BodyPartExamined | OOD score | flagged | analysed (label) | routing |",
              "|---|---|---|---|---:|:---:|---|---|"]
    for r in results:
        for s in r["near"]:
            for im in s.get("images", []):
                reasons = im["routing_reasons"] or [""]
                more = f" (+{len(reasons) - 1} more)" if len(reasons) > 1 else ""
                routed = "-" if im["routed"] is None else ("**routed**" if im["routed"] else f"refused: {reasons[0]}{more}")
                lines.append(f"| {r['name']} | {im['source']} | {im['anatomy']} ({im['known_from']}) | {im['modality']} / "
                             f"{im['body_part_examined'] or '-'} | {im['ood_score']:.1f} | {'yes' if im['flagged'] else 'no'} | "
                             f"{'**' + im['label'] + '**' if im['analysed'] else 'referred'} | {routed} |")
    lines += ["", "Sets and exclusions: `benchmarks/near_ood/sets.py` (one file per distinct picture; the DICOMDIR test "
              "files' 16 x 16 px stand-in pixels, synthetic colour bars, LUT test patterns and a file that decodes to a "
              "solid colour are left out). Where a header names no body part, the anatomy column says how it was read.", ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-root", type=Path, default=ROOT.parent / "shared" / "data")
    ap.add_argument("--only", nargs="*")
    ap.add_argument("--per-set", type=int, default=500, help="images per shared set (seeded sample)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (the machine is shared)")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent)
    args = ap.parse_args()
    if not args.data_root.is_dir():
        sys.exit(f"error: {args.data_root} not found (pass --data-root)")
    import torch

    torch.set_num_threads(args.threads)
    check = routing_check()
    t0 = time.time()
    results = []
    for m in shipped_models(ROOT / "recipes", only=args.only):
        r = run_model(m, args.data_root, args.per_set, args.threads, check)
        results.append(r)
        g = r["goal"]
        print(f"{r['model']}: ID flagged {_pct(g['id_flagged'])}, near min AUROC {g['near_min_auroc']:.3f} ({g['near_min_set']}), "
              f"far min {g['far_min_auroc']:.3f}, other-body-part analysed {g['body_part_analysed_detector']}/"
              f"{g['body_part_images']} (after routing {g['body_part_analysed_after_routing']}) [{r['seconds']:.0f} s]", flush=True)
    meta = {"date": str(date.today()), "medsight_version": __version__, "seconds": time.time() - t0, "per_set": args.per_set,
            "threads": args.threads, "routing": check is not None, "data_root": str(args.data_root),
            "targets": {"near_auroc": TARGET_NEAR_AUROC, "far_auroc": TARGET_FAR_AUROC, "id_flag_rate": TARGET_ID_FLAG,
                        "other_body_part_analysed": 0}}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(jsonable({"meta": meta, "results": results}), indent=2) + "\n")
    (args.out / "results.md").write_text(markdown(results, meta))
    print(f"wrote {args.out / 'results.json'} and results.md")


if __name__ == "__main__":
    main()
