"""Per-subgroup performance, the worst-group gap, and plain-language warnings.

Any column of a CSV manifest (``sex``, ``site``, ``view``, ...) can define
subgroups, plus two derived columns:

* ``age_bin``: the ``age`` column in years, binned 0-17, 18-39, 40-59, 60-79, 80+
  (lower bound inclusive); a missing or non-numeric age becomes ``unknown``.
* ``intensity_tertile``: an image-derived stratum for data without demographics:
  the tertile (``low``/``mid``/``high``) of each image's mean pixel intensity
  within the data set, a proxy for exposure/acquisition settings.

Point estimates per group come from fairlearn's :class:`~fairlearn.metrics.MetricFrame`
(with the project's :class:`~medsight.evaluate.metrics.Scorer` as the metric, so a
subgroup's numbers are computed exactly like the whole set's); 95% CIs per group
are percentile bootstrap intervals (the same rule as
:func:`~medsight.evaluate.metrics.bootstrap_metrics`, computed with the lean
functions of :mod:`medsight.evaluate.resample` because of the number of resamples).

"Significantly worse" test (stated in the report): for each judgeable group and each
tested metric, the group is compared with all other cases of the data set. Both
sides are resampled independently (bootstrap, ``n_boot`` times); the difference
(group - rest) gets a bootstrap standard error, a two-sided Wald z-test and a 95%
percentile CI. p-values of all comparisons in one report are adjusted together
with Benjamini-Hochberg (``scipy.stats.false_discovery_control``); a group is
flagged when its metric is lower and the adjusted p is below ``alpha``.

A group is "too small to judge" when it has fewer than ``min_cases`` cases, or
(binary) fewer than ``min_class_cases`` positives or negatives, or (multi-class)
fewer than two classes with ``min_class_cases`` cases each. Its numbers are shown
but it is not tested and takes no part in the worst-group gap.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from fairlearn.metrics import MetricFrame
from scipy.stats import false_discovery_control, norm

from medsight.errors import DataSetError
from medsight.evaluate.metrics import Scorer
from medsight.evaluate.resample import MetricFn, binary_fn, multiclass_fn, percentile_ci

UNKNOWN = "unknown"
AGE_EDGES = (0, 18, 40, 60, 80)
AGE_LABELS = ("0-17", "18-39", "40-59", "60-79", "80+")
DERIVED = {
    "age_bin": "age in years, bins 0-17, 18-39, 40-59, 60-79, 80+ (from the 'age' column; missing -> 'unknown')",
    "intensity_tertile": "image-derived: tertile (low/mid/high) of each image's mean pixel intensity in this data set",
}
METRIC_TITLES = {"auc": "AUC", "sensitivity": "sensitivity", "specificity": "specificity", "ppv": "PPV",
                 "npv": "NPV", "accuracy": "accuracy", "fpr": "false-positive rate", "f1": "F1"}


@dataclass(frozen=True)
class SubgroupConfig:
    min_cases: int = 30
    min_class_cases: int = 5
    n_boot: int = 1000
    alpha: float = 0.05
    seed: int = 0


def age_bin(age: pd.Series) -> pd.Series:
    years = pd.to_numeric(age, errors="coerce")
    binned = pd.cut(years, bins=[*AGE_EDGES, np.inf], right=False, labels=AGE_LABELS)
    return binned.astype(object).where(binned.notna(), UNKNOWN).astype(str)


def intensity_tertile(mean_intensity: np.ndarray) -> pd.Series:
    s = pd.Series(np.asarray(mean_intensity, dtype=np.float64))
    if s.nunique() < 3:
        raise DataSetError("intensity_tertile needs at least three distinct image intensities")
    return pd.qcut(s.rank(method="first"), 3, labels=["low", "mid", "high"]).astype(str)


def subgroup_frame(meta: pd.DataFrame, columns: list[str], mean_intensity: np.ndarray | None = None) -> pd.DataFrame:
    """One string column per requested subgroup, aligned with ``meta``; missing values -> 'unknown'."""
    out = {}
    for col in columns:
        if col == "age_bin" and "age_bin" not in meta.columns:
            if "age" not in meta.columns:
                raise DataSetError(f"subgroup 'age_bin' needs an 'age' column; the data set has {_available(meta)}")
            out[col] = age_bin(meta["age"]).to_numpy()
        elif col == "intensity_tertile" and col not in meta.columns:
            if mean_intensity is None:
                raise DataSetError("subgroup 'intensity_tertile' needs the images' mean intensities")
            out[col] = intensity_tertile(mean_intensity).to_numpy()
        elif col in meta.columns:
            v = meta[col]
            out[col] = v.astype(object).where(v.notna() & (v.astype(str).str.strip() != ""), UNKNOWN).astype(str).to_numpy()
        else:
            raise DataSetError(f"subgroup column {col!r} is not in the data set; it has {_available(meta)}")
    return pd.DataFrame(out, index=meta.index)


def _available(meta: pd.DataFrame) -> str:
    cols = [c for c in meta.columns if c != "source"]
    derived = ["intensity_tertile"] + (["age_bin"] if "age" in meta.columns else [])
    return f"columns {cols or 'none'} and derived {derived}"


def shown_metrics(task: str) -> tuple[str, ...]:
    if task == "binary":
        return ("auc", "sensitivity", "specificity", "ppv", "npv", "accuracy")
    return ("auc", "accuracy", "sensitivity", "specificity", "ppv")


def tested_metrics(task: str) -> tuple[str, ...]:
    return ("auc", "sensitivity", "specificity") if task == "binary" else ("auc", "accuracy", "sensitivity")


def _judgeable(y: np.ndarray, task: str, cfg: SubgroupConfig, scorer: Scorer) -> str | None:
    """None when a group is big enough to judge, else the reason it is not."""
    if len(y) < cfg.min_cases:
        return f"{len(y)} cases, fewer than the minimum of {cfg.min_cases}"
    if task == "binary":
        pos = int((y == scorer.positive_index).sum())
        if min(pos, len(y) - pos) < cfg.min_class_cases:
            return f"{pos} positive and {len(y) - pos} negative cases; at least {cfg.min_class_cases} of each are needed"
    else:
        counts = np.bincount(y)
        if (counts >= cfg.min_class_cases).sum() < 2:
            return f"fewer than two classes with at least {cfg.min_class_cases} cases"
    return None


def _metric_fn(scorer: Scorer, probs: np.ndarray, name: str):
    # MetricFrame hands each metric (y_true, y_pred) of one group; passing row indices as
    # y_pred lets the metric see the full probability rows of that group.
    def fn(y_true: np.ndarray, idx: np.ndarray) -> float:
        v = scorer(np.asarray(y_true), probs[np.asarray(idx, dtype=int)])[name]
        return math.nan if v is None else float(v)

    return fn


def _none(v: Any) -> float | None:
    return None if v is None or (isinstance(v, float) and math.isnan(v)) else float(v)


def _versus_rest(point_g: dict, point_r: dict, diffs: dict[str, list[float]], cfg: SubgroupConfig) -> dict[str, Any]:
    out = {}
    for m, samples in diffs.items():
        g, r, d = point_g[m], point_r[m], np.asarray(samples)
        if g is None or r is None or len(d) < cfg.n_boot / 2 or d.std(ddof=1) == 0:
            out[m] = {"group": g, "rest": r, "difference": None, "ci": None, "p": None,
                      "not_computable": "the metric is undefined or constant in the group or in the rest"}
            continue
        diff, se = g - r, float(d.std(ddof=1))
        out[m] = {"group": g, "rest": r, "difference": diff, "se": se,
                  "ci": np.quantile(d, [cfg.alpha / 2, 1 - cfg.alpha / 2]).tolist(),
                  "p": float(2 * norm.sf(abs(diff) / se))}
    return out


def _bootstrap_group(fast: MetricFn, y_g, p_g, y_r, p_r, shown, tested, cfg: SubgroupConfig, seed: int):
    """Resample the group (and, when given, the rest independently): group CIs and differences group - rest."""
    rng = np.random.default_rng(seed)
    samples: dict[str, list[float]] = {m: [] for m in shown}
    diffs: dict[str, list[float]] = {m: [] for m in tested}
    for _ in range(cfg.n_boot):
        ig = rng.integers(0, len(y_g), len(y_g))
        mg = fast(y_g[ig], p_g[ig])
        for m in shown:
            if mg[m] is not None:
                samples[m].append(mg[m])
        if y_r is not None:
            ir = rng.integers(0, len(y_r), len(y_r))
            mr = fast(y_r[ir], p_r[ir])
            for m in tested:
                if mg[m] is not None and mr[m] is not None:
                    diffs[m].append(mg[m] - mr[m])
    return {m: percentile_ci(v, cfg.n_boot, cfg.alpha) for m, v in samples.items()}, diffs


def analyse_column(y, probs, groups: pd.Series, scorer: Scorer, task: str, cfg: SubgroupConfig, seed: int = 0) -> dict[str, Any]:
    y = np.asarray(y).astype(int)
    shown, tested = shown_metrics(task), tested_metrics(task)
    fast = binary_fn(scorer.positive_index, scorer.threshold) if task == "binary" else multiclass_fn(probs.shape[1])
    mf = MetricFrame(
        metrics={m: _metric_fn(scorer, probs, m) for m in shown},
        y_true=y, y_pred=np.arange(len(y)), sensitive_features=groups.rename(groups.name or "group"),
    )
    by_group = mf.by_group
    out_groups = []
    for k, value in enumerate(sorted(groups.unique(), key=lambda v: (v == UNKNOWN, str(v)))):
        mask = (groups == value).to_numpy()
        yg, pg = y[mask], probs[mask]
        reason = _judgeable(yg, task, cfg, scorer)
        compare = reason is None and (~mask).sum() > 0 and _judgeable(y[~mask], task, SubgroupConfig(1, 1), scorer) is None
        yr, pr = (y[~mask], probs[~mask]) if compare else (None, None)
        cis, diffs = _bootstrap_group(fast, yg, pg, yr, pr, shown, tested, cfg, seed + cfg.seed + k)
        point = {m: _none(by_group.loc[value, m]) for m in shown}
        entry = {
            "value": str(value), "n": int(mask.sum()),
            "class_counts": {str(c): int(n) for c, n in zip(*np.unique(yg, return_counts=True))},
            "metrics": {m: {"value": point[m], "ci": cis[m] if point[m] is not None else None} for m in shown},
            "judgeable": reason is None, "too_small": reason,
        }
        if compare:
            entry["versus_rest"] = _versus_rest(point, scorer(yr, pr), diffs, cfg)
        out_groups.append(entry)
    return {"column": str(groups.name), "n_groups": len(out_groups), "groups": out_groups,
            "worst_group_gap": _worst_gap(y, probs, groups, out_groups, scorer, shown)}


def _worst_gap(y, probs, groups: pd.Series, entries: list[dict], scorer: Scorer, shown) -> dict[str, Any]:
    ok = [e["value"] for e in entries if e["judgeable"]]
    if len(ok) < 2:
        return {"computable": False, "reason": "fewer than two subgroups are large enough to compare"}
    keep = groups.isin(ok).to_numpy()
    mf = MetricFrame(metrics={m: _metric_fn(scorer, probs[keep], m) for m in shown}, y_true=np.asarray(y)[keep],
                     y_pred=np.arange(int(keep.sum())), sensitive_features=groups[keep].reset_index(drop=True))
    diff, by = mf.difference(method="between_groups"), mf.by_group
    out: dict[str, Any] = {"computable": True, "groups_compared": ok, "metrics": {}}
    for m in shown:
        col = by[m].dropna()
        if len(col) < 2:
            out["metrics"][m] = None
            continue
        out["metrics"][m] = {"gap": _none(diff[m]), "worst_group": str(col.idxmin()), "worst": float(col.min()),
                             "best_group": str(col.idxmax()), "best": float(col.max())}
    return out


def analyse_subgroups(y, probs, frame: pd.DataFrame, scorer: Scorer, task: str, cfg: SubgroupConfig = SubgroupConfig()) -> dict[str, Any]:
    """Every requested column, one multiple-testing correction over all comparisons, and warnings."""
    columns = [analyse_column(y, probs, frame[c].rename(c), scorer, task, cfg, seed=i * 1000) for i, c in enumerate(frame.columns)]
    tests = [(col, g, m, t) for col in columns for g in col["groups"] for m, t in g.get("versus_rest", {}).items() if t.get("p") is not None]
    if tests:
        adjusted = false_discovery_control([t["p"] for *_, t in tests], method="bh")
        for (_, _, _, t), q in zip(tests, adjusted):
            t["p_adjusted"] = float(q)
            t["significantly_worse"] = bool(t["difference"] < 0 and q < cfg.alpha)
    return {
        "config": {"min_cases": cfg.min_cases, "min_class_cases": cfg.min_class_cases, "n_boot": cfg.n_boot, "alpha": cfg.alpha},
        "test": ("each judgeable subgroup vs all other cases: independent bootstrap of both sides "
                 f"({cfg.n_boot} resamples), two-sided Wald z-test on the difference with its bootstrap standard error, "
                 f"95% percentile CI of the difference; p-values of all {len(tests)} comparisons adjusted with "
                 f"Benjamini-Hochberg; flagged when the group is worse and the adjusted p < {cfg.alpha}"),
        "derived_columns": {c: DERIVED[c] for c in frame.columns if c in DERIVED},
        "columns": columns,
        "warnings": _warnings(columns, cfg),
    }


def _warnings(columns: list[dict], cfg: SubgroupConfig) -> list[dict[str, str]]:
    out = []
    for col in columns:
        name = col["column"]
        for g in col["groups"]:
            label = f"{name} = {g['value']}"
            if not g["judgeable"]:
                out.append({"kind": "too_small", "subgroup": label,
                            "text": f"{label}: too small to judge ({g['too_small']}). Its numbers are shown but were not tested; "
                                    "collect more cases before drawing conclusions about this group."})
                continue
            for m, t in g.get("versus_rest", {}).items():
                if t.get("significantly_worse"):
                    lo, hi = t["ci"]
                    out.append({"kind": "significantly_worse", "subgroup": label, "metric": m,
                                "text": f"{label}: {METRIC_TITLES.get(m, m)} is {t['group']:.2f} versus {t['rest']:.2f} in all other cases "
                                        f"(difference {t['difference']:+.2f}, 95% CI {lo:+.2f} to {hi:+.2f}; adjusted p = {t['p_adjusted']:.3g}). "
                                        "The model is significantly worse for this group: check it before relying on the model here."})
        if col["n_groups"] < 2:
            out.append({"kind": "single_group", "subgroup": name,
                        "text": f"{name}: every case has the same value, so there is nothing to compare."})
    return out
