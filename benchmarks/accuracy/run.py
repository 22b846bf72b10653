"""Regenerate the zoo's test-split numbers and put the published baselines beside them.

For every recipe in recipes/, load the shipped package from medsight/zoo/<name>,
rebuild the recipe's test split from the data root, run the one inference path and
compute AUC / accuracy (and the other clinical metrics) with 95% bootstrap CIs.
Writes benchmarks/accuracy/results.json and results.md.

Usage: .venv/bin/python benchmarks/accuracy/run.py [--data-root ../shared/data] [--n-boot 1000]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from datetime import datetime, timezone
from pathlib import Path

from medsight.models.package import read_card, write_card
from medsight.models.registry import ZOO_DIR, load
from medsight.train.recipe import Recipe, evaluate_split, published_comparison, recipe_splits

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent


def fmt(v: dict) -> str:
    if v["value"] is None:
        return "n/a"
    ci = v.get("ci")
    return f"{v['value']:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else f"{v['value']:.3f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-root", type=Path, default=ROOT.parent / "shared" / "data")
    ap.add_argument("--n-boot", type=int, default=1000)
    ap.add_argument("--write-cards", action="store_true", help="also record the comparison with the published baselines in each zoo card")
    args = ap.parse_args()
    rows = []
    for recipe_path in sorted((ROOT / "recipes").glob("*.json")):
        name = recipe_path.stem
        if not (ZOO_DIR / name / "card.json").is_file():
            print(f"skip {name}: not in the zoo")
            continue
        recipe = Recipe.load(recipe_path)
        test = recipe_splits(recipe.data, args.data_root)["test"]
        pkg = load(name)
        t0 = time.perf_counter()
        m = evaluate_split(pkg, test, n_boot=args.n_boot)
        pb = recipe.published_baselines
        rows.append({
            "model": f"{pkg.card.name}@{pkg.card.version}", "data": recipe.data.source, "n_test": len(test),
            "split": "official" if recipe.data.source.endswith(".npz") or (recipe.data.split and recipe.data.split.column) else "seeded group split (recipe)",
            "metrics": m, "published": pb, "seconds": round(time.perf_counter() - t0, 2),
            "beats_best_published": (published_comparison(m, pb) or {}).get("beats_best_published"),
        })
        if args.write_cards and published_comparison(m, pb):
            card = read_card(ZOO_DIR / name)  # fresh read: other tools add their own card fields
            card.published_baselines = {**pb, "comparison": published_comparison(m, pb)}
            write_card(card, ZOO_DIR / name)
        print(f"{name}: AUC {fmt(m['auc'])}  ACC {fmt(m['accuracy'])}")
    result = {"generated": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": platform.platform(),
              "n_boot": args.n_boot, "models": rows}
    (HERE / "results.json").write_text(json.dumps(result, indent=2))
    lines = [
        "# Zoo accuracy on test splits", "",
        f"Generated {result['generated']} by `benchmarks/accuracy/run.py` (95% percentile bootstrap CIs, {args.n_boot} resamples).", "",
        "| model | data (test n) | test AUC [95% CI] | test ACC [95% CI] | best published AUC / ACC | beats best published? |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        pb = r["published"]
        pub = f"{pb['best_auc']:.3f} ({pb['best_auc_method']}) / {pb['best_acc']:.3f} ({pb['best_acc_method']})" if "best_auc" in pb else "none published"
        verdict = {True: "yes", False: "**no**", None: "n/a"}[r["beats_best_published"]]
        lines.append(f"| {r['model']} | {r['data']} ({r['n_test']}, {r['split']}) | {fmt(r['metrics']['auc'])} | {fmt(r['metrics']['accuracy'])} | {pub} | {verdict} |")
    lines += ["", "Published numbers: " + "; ".join(sorted({r['published'].get('citation', '') for r in rows if r['published'].get('citation')}))]
    (HERE / "results.md").write_text("\n".join(lines) + "\n")
    print((HERE / "results.md").read_text())


if __name__ == "__main__":
    main()
