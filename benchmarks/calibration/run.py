"""ECE before/after calibration on every shipped model's official test split.

For each finished zoo model: logits on its val and test splits (recipe splits), then
top-label ECE (15 bins) on test for

* before: temperature 1 (raw softmax),
* card: the calibration stored in the card (as the Predictor applies it),
* each method of ``medsight.evaluate.calibration`` fitted on val alone: temperature,
  temperature + bias, vector scaling, one-vs-rest isotonic regression (scikit-learn),
  and matrix scaling (multinomial logistic regression on the logits, scikit-learn;
  benchmark only, K^2 + K parameters),
* auto: the method ``select_calibration`` picks by 5-fold cross-validation on val
  (pooled out-of-fold ECE) -- what ``medsight calibrate`` does by default. The test
  split plays no part in the choice,
* + EM priors: the auto method followed by EM prior adaptation (Saerens et al. 2002)
  estimated on *unlabelled* test images, cross-fitted: the test split is cut in two
  seeded halves, priors estimated on one half are applied to the other, so no image's
  own prediction sets its priors and no test label is used. This is what a clinic
  running ``medsight calibrate --adapt-priors`` on its own unlabelled images gets,

each with a 95% bootstrap CI, test accuracy, and the *noise floor*: the mean ECE a
perfectly calibrated model would show on a test set of the same size and confidences
(simulated), because on 100-200 cases ECE is biased upwards by sampling alone.
Target: ECE <= 0.03 after calibration on val.

    .venv/bin/python benchmarks/calibration/run.py [--data-root ../shared/data] [--only NAME ...]

Writes benchmarks/calibration/results.json and results.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import log_loss

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from medsight.evaluate.calibration import (  # noqa: E402
    METHODS, adjust_priors, calibrated_probabilities, em_prior_shift, fit_calibration, probabilities, select_calibration,
)
from medsight.evaluate.collect import collect_outputs  # noqa: E402
from medsight.evaluate.metrics import expected_calibration_error  # noqa: E402
from medsight.evaluate.report import jsonable  # noqa: E402
from benchmarks.shipped import shipped_models  # noqa: E402
from medsight.predict.load import load_model  # noqa: E402

TARGET = 0.03
BINS = 15


def ece(p: np.ndarray, y: np.ndarray) -> float:
    return expected_calibration_error(p.max(1), p.argmax(1) == y, BINS)


def ece_ci(p: np.ndarray, y: np.ndarray, n_boot: int, rng: np.random.Generator) -> list[float]:
    vals = [ece(p[i], y[i]) for i in (rng.integers(0, len(y), len(y)) for _ in range(n_boot))]
    return np.quantile(vals, [0.025, 0.975]).tolist()


def noise_floor(p: np.ndarray, n_sim: int, rng: np.random.Generator) -> float:
    """Mean ECE when each case is right with exactly its stated confidence (perfect calibration)."""
    conf = p.max(1)
    return float(np.mean([expected_calibration_error(conf, rng.uniform(size=conf.size) < conf, BINS) for _ in range(n_sim)]))


def matrix_scaling(zv: np.ndarray, yv: np.ndarray, zt: np.ndarray) -> np.ndarray:
    lr = LogisticRegression(max_iter=2000).fit(zv, yv)
    p = np.zeros((len(zt), zv.shape[1]))
    p[:, lr.classes_] = lr.predict_proba(zt)  # a class absent from val keeps probability 0
    return p


def block(p: np.ndarray, y: np.ndarray, n_boot: int, rng: np.random.Generator, **extra) -> dict:
    p = p / p.sum(axis=1, keepdims=True)  # exact row sums for log_loss (isotonic outputs are renormalised floats)
    return {**extra, "ece": ece(p, y), "ece_ci": ece_ci(p, y, n_boot, rng),
            "nll": float(log_loss(y, p, labels=list(range(p.shape[1])))), "accuracy": float((p.argmax(1) == y).mean())}


def em_cross_fitted(p: np.ndarray, source: np.ndarray, seed: int = 0) -> tuple[np.ndarray, list[list[float]]]:
    """Priors estimated by EM on one seeded half of the (unlabelled) test images, applied to the other half."""
    idx = np.random.default_rng(seed).permutation(len(p))
    halves = (idx[: len(p) // 2], idx[len(p) // 2 :])
    out, priors = np.zeros_like(p), []
    for est, use in (halves, halves[::-1]):
        w, _ = em_prior_shift(p[est], source)
        out[use] = adjust_priors(p[use], source, w)
        priors.append(w.tolist())
    return out, priors


def run_model(m, data_root: Path, n_boot: int) -> dict:
    rng = np.random.default_rng(0)
    pred = load_model(m.directory, backend="torch")  # the reference logits the recorded results were measured on
    splits = m.splits(data_root)
    val, test = (collect_outputs(pred, splits[s]) for s in ("val", "test"))
    yv = splits["val"].y[val.index].astype(int)
    yt = splits["test"].y[test.index].astype(int)
    k = pred.card.num_outputs
    res = {
        "model": f"{m.card.name}@{m.card.version}", "task": m.card.task, "n_val": int(len(yv)), "n_test": int(len(yt)),
        "val_class_share": (np.bincount(yv, minlength=k) / len(yv)).tolist(), "test_class_share": (np.bincount(yt, minlength=k) / len(yt)).tolist(),
        "card_method": pred.card.calibration.method,
        "before": block(probabilities(test.logits, 1.0), yt, n_boot, rng),
        "card": block(calibrated_probabilities(test.logits, pred.card.calibration), yt, n_boot, rng, method=pred.card.calibration.method),
        "methods": {},
    }
    for meth in METHODS:
        cmap = fit_calibration(val.logits, yv, meth)
        res["methods"][meth] = block(cmap.apply(test.logits), yt, n_boot, rng, params=cmap.params(),
                                     val_ece=ece(cmap.apply(val.logits), yv))
    res["methods"]["matrix"] = block(matrix_scaling(val.logits, yv, test.logits), yt, n_boot, rng)
    cmap, selection = select_calibration(val.logits, yv)
    res["auto"] = block(cmap.apply(test.logits), yt, n_boot, rng, method=cmap.method, selection=selection)
    source = np.bincount(yv, minlength=k) / len(yv)
    p_em, priors = em_cross_fitted(cmap.apply(test.logits), source)
    res["auto_em"] = block(p_em, yt, n_boot, rng, source_priors=source.tolist(), estimated_priors=priors)
    res["noise_floor_test"] = noise_floor(cmap.apply(test.logits), 500, rng)
    res["meets_target"] = res["auto"]["ece"] <= TARGET
    return res


def markdown(results: list[dict], meta: dict) -> str:
    fmt = lambda b: f"{b['ece']:.3f} ({b['ece_ci'][0]:.3f}-{b['ece_ci'][1]:.3f})"  # noqa: E731
    lines = [
        "# Calibration benchmark: ECE before/after calibration (official test splits)", "",
        f"Run {meta['date']} with MedSight {meta['medsight_version']} in {meta['seconds']:.0f} s. "
        f"Top-label ECE, {BINS} equal-width bins; 95% CIs: {meta['n_boot']} bootstrap resamples of the test cases. "
        f"Every method is fitted on the model's val split only; the test split is used to measure. Target: ECE <= {TARGET}.", "",
        "## The method chosen by cross-validation on val (what `medsight calibrate` does by default)", "",
        "| model | n val / test | ECE before (T=1) | ECE in the card | chosen on val (5-fold CV ECE) | test ECE after | "
        "+ EM priors on unlabelled test, cross-fitted | noise floor* | target met by the CV choice |",
        "|---|---|---|---|---|---|---|---:|:---:|",
    ]
    for r in results:
        a = r["auto"]
        cv = a["selection"]["cv"][a["method"]]["ece"] if a["selection"]["cv"] else float("nan")
        lines.append(f"| {r['model']} | {r['n_val']} / {r['n_test']} | {fmt(r['before'])} | {fmt(r['card'])} ({r['card_method']}) | "
                     f"{a['method']} ({cv:.3f}) | {fmt(a)} | {fmt(r['auto_em'])} | {r['noise_floor_test']:.3f} | "
                     f"{'yes' if r['meets_target'] else 'no'} |")
    lines += ["", "## Test ECE of every method fitted on val (for comparison; not a selection)", "",
              "| model | " + " | ".join(list(METHODS) + ["matrix**"]) + " | argmax test accuracy (T=1 / isotonic) |",
              "|---|" + "---|" * (len(METHODS) + 1) + "---|"]
    for r in results:
        mm = r["methods"]
        lines.append(f"| {r['model']} | " + " | ".join(fmt(mm[k]) for k in [*METHODS, "matrix"])
                     + f" | {r['before']['accuracy']:.3f} / {mm['isotonic']['accuracy']:.3f} |")
    lines += ["", "## Cross-validated ECE on val (the selection criterion) and class mix", "",
              "| model | " + " | ".join(METHODS) + " | val class share | test class share |", "|---|" + "---:|" * len(METHODS) + "---|---|"]
    for r in results:
        cv = r["auto"]["selection"]["cv"]
        lines.append(f"| {r['model']} | " + " | ".join(f"{cv[k]['ece']:.3f}" if k in cv else "-" for k in METHODS)
                     + f" | {', '.join(f'{v:.2f}' for v in r['val_class_share'])} | {', '.join(f'{v:.2f}' for v in r['test_class_share'])} |")
    lines += ["", "*noise floor: mean ECE of a perfectly calibrated model with the same number of test cases and the same "
              "confidences as the chosen method (500 simulations): the ECE that sampling alone produces. A measured ECE near "
              "it cannot be told apart from perfect calibration on this test set.",
              "", "**matrix scaling = multinomial logistic regression on the logits (scikit-learn); measured only, not offered "
              "(K^2 + K parameters on 78-1,000 validation cases).",
              "", "EM priors: the class priors of one seeded half of the test images are estimated by EM (Saerens et al. 2002) from "
              "the chosen method's probabilities, without labels, and applied to the other half (and vice versa). It corrects "
              "label shift only; where test images also look different (covariate shift), it can make calibration worse.", ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-root", type=Path, default=ROOT.parent / "shared" / "data")
    ap.add_argument("--only", nargs="*")
    ap.add_argument("--n-boot", type=int, default=1000)
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent)
    args = ap.parse_args()
    if not args.data_root.is_dir():
        sys.exit(f"error: {args.data_root} not found (pass --data-root)")
    t0 = time.time()
    results = []
    for m in shipped_models(ROOT / "recipes", only=args.only):
        t = time.time()
        results.append(run_model(m, args.data_root, args.n_boot))
        r = results[-1]
        print(f"{r['model']}: ECE {r['before']['ece']:.3f} -> card {r['card']['ece']:.3f}, auto ({r['auto']['method']}) "
              f"{r['auto']['ece']:.3f}, +EM {r['auto_em']['ece']:.3f} (floor {r['noise_floor_test']:.3f}) "
              f"[{time.time() - t:.0f} s]", flush=True)
    from datetime import date

    from medsight import __version__

    meta = {"date": str(date.today()), "medsight_version": __version__, "seconds": time.time() - t0, "n_boot": args.n_boot,
            "target": TARGET, "bins": BINS, "data_root": str(args.data_root)}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(jsonable({"meta": meta, "results": results}), indent=2) + "\n")
    (args.out / "results.md").write_text(markdown(results, meta))
    print(f"wrote {args.out / 'results.json'} and results.md")


if __name__ == "__main__":
    main()
