"""One command: the validation report of every shipped model on its official test split.

For each finished zoo model, ``medsight.evaluate.report.validate_dataset`` on the test
split from its recipe, with the subgroups the data has:

* ham10000 (skin-lesion-ham): sex, age_bin (demographics) and ham_source (acquisition site);
* covid-chestxray (covid-cxr): sex, age_bin (demographics) and view (PA / AP / AP supine);
* BreastMNIST, PneumoniaMNIST, BUSI, brain MRI: no demographics or acquisition columns exist,
  so the image-derived stratum intensity_tertile is shown instead (and the report says so).

    .venv/bin/python benchmarks/validation/run.py [--data-root ../shared/data] [--only NAME ...] [--prevalence 0.05]

Writes benchmarks/validation/results/<model>/report.html + report.json and a summary
(benchmarks/validation/results.json, results.md).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from medsight import __version__  # noqa: E402
from medsight.evaluate.report import ValidationOptions, jsonable, validate_dataset, write_report  # noqa: E402
from benchmarks.shipped import shipped_models  # noqa: E402
from medsight.predict.load import load_model  # noqa: E402

SUBGROUPS = {
    "ham10000_subset224": ["sex", "age_bin", "ham_source"],
    "covid_chestxray_ieee8023": ["sex", "age_bin", "view"],
}
NO_DEMOGRAPHICS = ["intensity_tertile"]


def summarise(r: dict, seconds: float) -> dict:
    m = r["metrics"]["values"]
    flags = [w for w in r["warnings"] if w["kind"] == "significantly_worse"]
    return {
        "model": r["model"]["id"], "data": r["data"]["name"], "n": r["data"]["n_analysed"],
        "auc": m["auc"]["value"], "auc_ci": m["auc"]["ci"], "accuracy": m["accuracy"]["value"],
        "sensitivity": m["sensitivity"]["value"], "specificity": m["specificity"]["value"],
        "ece_before": r["calibration"]["before"]["ece"], "ece_after": r["calibration"]["after"]["ece"],
        "ood_flagged": (r["data"].get("ood") or {}).get("share_flagged"),
        "subgroups": [c["column"] for c in (r["subgroups"] or {}).get("columns", [])],
        "significantly_worse": [f"{w['subgroup']} ({w['metric']})" for w in flags],
        "too_small": [w["subgroup"] for w in r["warnings"] if w["kind"] == "too_small"],
        "n_warnings": len(r["warnings"]), "seconds": seconds,
    }


def markdown(rows: list[dict], meta: dict) -> str:
    f = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    lines = [
        "# Validation reports of the shipped models (official test splits)", "",
        f"Run {meta['date']} with MedSight {meta['medsight_version']} in {meta['seconds']:.0f} s; {meta['n_boot']} bootstrap resamples; "
        f"user prevalence {meta['prevalence']}. Reports: results/<model>/report.html (+ report.json).", "",
        "| model | n | AUC (95% CI) | accuracy | sens. | spec. | ECE before -> after | OOD flagged | subgroups | significantly worse | too small to judge |",
        "|---|---:|---|---:|---:|---:|---|---:|---|---|---|",
    ]
    for r in rows:
        ci = "" if not r["auc_ci"] else f" ({r['auc_ci'][0]:.3f}-{r['auc_ci'][1]:.3f})"
        ood = "-" if r["ood_flagged"] is None else f"{100 * r['ood_flagged']:.1f}%"
        lines.append(f"| {r['model']} | {r['n']} | {f(r['auc'])}{ci} | {f(r['accuracy'])} | {f(r['sensitivity'])} | {f(r['specificity'])} | "
                     f"{f(r['ece_before'])} -> {f(r['ece_after'])} | {ood} | {', '.join(r['subgroups']) or '-'} | "
                     f"{'; '.join(r['significantly_worse']) or 'none'} | {'; '.join(r['too_small']) or 'none'} |")
    lines += ["", "Demographics exist only for ham10000 (sex, age) and covid-chestxray (sex, age). The other sets have none, "
              "so their reports stratify by the image-derived intensity_tertile; sensitivity and specificity of multi-class "
              "models are macro one-vs-rest averages.", ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-root", type=Path, default=ROOT.parent / "shared" / "data")
    ap.add_argument("--only", nargs="*")
    ap.add_argument("--n-boot", type=int, default=1000)
    ap.add_argument("--prevalence", type=float, default=0.05)
    ap.add_argument("--gallery", type=int, default=6, help="false positives / negatives shown per report")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent)
    args = ap.parse_args()
    if not args.data_root.is_dir():
        sys.exit(f"error: {args.data_root} not found (pass --data-root)")
    t0 = time.time()
    rows = []
    for m in shipped_models(ROOT / "recipes", only=args.only):
        t = time.time()
        opts = ValidationOptions(subgroups=SUBGROUPS.get(m.source, NO_DEMOGRAPHICS), prevalence=args.prevalence, n_boot=args.n_boot,
                                 gallery_size=args.gallery)
        result = validate_dataset(load_model(m.directory, backend="torch"), m.splits(args.data_root)["test"], opts,
                                  source=f"{m.source} (recipe test split)", split="test")
        write_report(result, args.out / "results" / m.name)
        rows.append(summarise(result, time.time() - t))
        print(f"{m.name}: AUC {rows[-1]['auc']}, ECE {rows[-1]['ece_before']:.3f} -> {rows[-1]['ece_after']:.3f}, "
              f"{rows[-1]['n_warnings']} warnings [{time.time() - t:.0f} s]", flush=True)
    meta = {"date": str(date.today()), "medsight_version": __version__, "seconds": time.time() - t0, "n_boot": args.n_boot,
            "prevalence": args.prevalence, "data_root": str(args.data_root)}
    (args.out / "results.json").write_text(json.dumps(jsonable({"meta": meta, "results": rows}), indent=2) + "\n")
    (args.out / "results.md").write_text(markdown(rows, meta))
    print(f"wrote {args.out / 'results.md'}")


if __name__ == "__main__":
    main()
