"""``medsight validate``: a clinical validation report for one model on one labelled data set.

The report answers what a validation team asks before a model is used on local
data: how well does it rank and classify here (ROC/PR with bootstrap bands,
confusion matrix, metrics with 95% CIs), what happens at each candidate
threshold (alarms per 1,000 studies at the local prevalence), are its
probabilities honest (reliability before/after calibration), is any subgroup
worse off, which images does it get confidently wrong and where did it look,
and does the data even look like what it was trained on (OOD share).

:func:`validate_dataset` computes every number into one JSON-safe dict (no NaN:
an undefined number is ``None`` and the HTML says "not computable");
:func:`write_report` writes that dict as ``report.json`` and renders the same
numbers into a single self-contained ``report.html`` (figures as base64 PNG).
"""

from __future__ import annotations

import json
import math
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
from jinja2 import Environment, PackageLoader, StrictUndefined, select_autoescape
from pydantic import BaseModel, ConfigDict, Field
from sklearn.metrics import confusion_matrix, log_loss

from medsight._version import __version__
from medsight.errors import DataSetError, UnsupportedTaskError
from medsight.evaluate import figures
from medsight.evaluate.calibration import probabilities
from medsight.evaluate.collect import DatasetOutputs, collect_outputs
from medsight.evaluate.curves import binary_curves, one_vs_rest_curves, reliability_bins, risk_coverage
from medsight.evaluate.gallery import gallery_items, select_errors
from medsight.evaluate.metrics import METRICS, Scorer, bootstrap_metrics, expected_calibration_error
from medsight.evaluate.operating_points import threshold_table, wilson_ci
from medsight.evaluate.subgroups import UNKNOWN, SubgroupConfig, analyse_subgroups, subgroup_frame, tested_metrics
from medsight.io.datasets import LabeledDataset, load_dataset
from medsight.models.card import ModelCard
from medsight.models.policy import classes_of_interest, decided_classes, operating_threshold, out_of_distribution
from medsight.predict.load import load_model
from medsight.predict.predictor import Predictor

REPORT_HTML = "report.html"
REPORT_JSON = "report.json"
ECE_BINS = 15


class ValidationOptions(BaseModel):
    """Everything that changes a report's numbers (recorded in the report itself)."""

    model_config = ConfigDict(extra="forbid")
    subgroups: list[str] = []
    prevalence: float | None = Field(default=None, gt=0, lt=1, description="a local prevalence for PPV/NPV and alarms per 1,000")
    min_cases: int = Field(default=30, ge=1, description="subgroups with fewer cases are 'too small to judge'")
    min_class_cases: int = Field(default=5, ge=1)
    n_boot: int = Field(default=1000, ge=10)
    seed: int = 0
    gallery_size: int = Field(default=6, ge=0)
    target_sensitivities: list[float] = [0.90, 0.95, 0.99]
    fixed_thresholds: list[float] = [0.1, 0.3, 0.5, 0.7, 0.9]
    small_data_warning: int = Field(default=100, description="warn that CIs are wide below this many cases")


def jsonable(obj: Any) -> Any:
    """Plain JSON types; NaN/inf become None so no report ever shows a silent NaN."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return jsonable(obj.tolist())
    if isinstance(obj, (np.bool_, bool)):
        return bool(obj)
    if isinstance(obj, (np.integer, int)):
        return int(obj)
    if isinstance(obj, (np.floating, float)):
        v = float(obj)
        return None if math.isnan(v) or math.isinf(v) else v
    return obj


# -- the numbers --------------------------------------------------------------------------
def _card_facts(card: ModelCard, predictor: Predictor) -> dict[str, Any]:
    t = card.training
    return {
        "id": f"{card.name}@{card.version}", "name": card.name, "version": card.version, "task": card.task,
        "labels": card.labels, "positive_label": card.positive_label, "critical_findings": card.critical_findings,
        "modality": card.modality, "body_part": card.body_part, "description": card.description,
        "intended_use": card.intended_use, "limitations": card.limitations,
        "input": card.input.model_dump(), "architecture": card.architecture.model_dump(),
        "training_data": {k: t[k] for k in ("dataset_name", "source", "licence", "dataset", "split", "split_rule",
                                            "n_train", "n_val", "n_test", "trained_on", "base_model") if k in t},
        "calibration": card.calibration.model_dump(exclude={"isotonic"}), "thresholds": card.thresholds,
        "refer_below": card.confidence.refer_below,
        "ood": {k: v for k, v in (card.ood or {}).items() if k in ("method", "threshold", "fitted_on", "target_flag_rate")} or None,
        "test_metrics": {k: v.model_dump() for k, v in card.test_metrics.items()},
        "published_baselines": card.published_baselines, "weights_sha256": card.weights_sha256,
        "recalibration": t.get("recalibration"),
    }


def _calibration_block(card: ModelCard, y: np.ndarray, p: np.ndarray, method: str, temperature: float) -> dict[str, Any]:
    conf, correct = p.max(axis=1), p.argmax(axis=1) == y
    return {
        "method": method, "temperature": temperature,
        "ece": expected_calibration_error(conf, correct, ECE_BINS),
        "nll": float(log_loss(y, p, labels=list(range(card.num_outputs)))),
        "brier": float(np.mean(np.sum((p - np.eye(card.num_outputs)[y]) ** 2, axis=1))),
        "bins": reliability_bins(conf, correct, ECE_BINS),
    }


def _per_class(card: ModelCard, y: np.ndarray, probs: np.ndarray, pred: np.ndarray, curves: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for k, lab in enumerate(card.labels):
        tp = int(((pred == k) & (y == k)).sum())
        fn = int(((pred != k) & (y == k)).sum())
        fp = int(((pred == k) & (y != k)).sum())
        tn = int(((pred != k) & (y != k)).sum())
        c = curves.get(lab, {})
        out.append({
            "label": lab, "n": tp + fn, "critical": lab in card.critical_findings,
            "sensitivity": tp / (tp + fn) if tp + fn else None, "sensitivity_ci": wilson_ci(tp, tp + fn),
            "specificity": tn / (tn + fp) if tn + fp else None, "specificity_ci": wilson_ci(tn, tn + fp),
            "ppv": tp / (tp + fp) if tp + fp else None, "npv": tn / (tn + fn) if tn + fn else None,
            "auc": c.get("auc"), "auc_ci": c.get("auc_ci"),
            "auc_not_computable": None if c.get("computable") else c.get("reason"),
        })
    return out


def _dataset_summary(ds: LabeledDataset, out: DatasetOutputs, y: np.ndarray, card: ModelCard, source: str, split: str | None) -> dict[str, Any]:
    counts = np.bincount(y, minlength=card.num_outputs)
    summary = {
        "source": source, "split": split, "name": ds.name, "n_in_data_set": len(ds), "n_analysed": int(len(y)),
        "class_counts": {lab: int(c) for lab, c in zip(card.labels, counts)},
        "class_share": {lab: float(c / len(y)) for lab, c in zip(card.labels, counts)},
        "excluded_unreadable": out.errors,
        "columns": [c for c in ds.meta.columns if c != "source"],
    }
    if card.task == "binary":
        summary["prevalence"] = float(counts[card.positive_index] / len(y))
    if out.ood_scores is not None and card.ood:
        flagged = out_of_distribution(card, out.ood_scores)
        summary["ood"] = {"n_flagged": int(flagged.sum()), "share_flagged": float(flagged.mean()),
                          "threshold": float(card.ood["threshold"]), "median_score": float(np.median(out.ood_scores))}
    return summary


def _top_warnings(card: ModelCard, summary: dict[str, Any], calib: dict[str, Any], opts: ValidationOptions) -> list[dict[str, str]]:
    w = []
    n = summary["n_analysed"]
    if n < opts.small_data_warning:
        w.append({"kind": "small_data", "text": f"Only {n} cases were analysed: confidence intervals are wide; treat every number as provisional."})
    present = [lab for lab, c in summary["class_counts"].items() if c > 0]
    if len(present) < 2:
        w.append({"kind": "single_class", "text": f"Only one class ({present[0]}) is present: AUC, ROC/PR curves, sensitivity or "
                                                  "specificity and data-chosen thresholds are not computable on this data."})
    else:
        for lab, c in summary["class_counts"].items():
            if c == 0:
                w.append({"kind": "class_absent", "text": f"No cases of '{lab}': the model's sensitivity for it cannot be judged here."})
    if summary["excluded_unreadable"]:
        k = len(summary["excluded_unreadable"])
        w.append({"kind": "unreadable", "text": f"{k} image(s) could not be read and were left out (listed in the data set section)."})
    ood = summary.get("ood")
    if ood and ood["share_flagged"] > 0.05:
        w.append({"kind": "ood", "text": f"{100 * ood['share_flagged']:.1f}% of these images look unlike the model's training data "
                                         "(out-of-distribution detector): the model may not suit this data; those predictions are referred."})
    if calib["after"]["ece"] > 0.05:
        w.append({"kind": "calibration", "text": f"Probabilities are poorly calibrated on this data (ECE {calib['after']['ece']:.3f} with the "
                                                 "card's calibration): recalibrate on local validation data with 'medsight calibrate'."})
    return w


def validate_dataset(predictor: Predictor, ds: LabeledDataset, options: ValidationOptions | None = None,
                     source: str = "", split: str | None = None) -> dict[str, Any]:
    """All report numbers (JSON-safe) plus ``_figures`` and gallery images (keys starting with '_')."""
    opts = options or ValidationOptions()
    card = predictor.card
    if card.task not in ("binary", "multiclass"):
        raise UnsupportedTaskError(f"{card.name}: validation reports support binary and multi-class models, not {card.task}")
    if ds.label_names != card.labels:
        raise DataSetError(f"{ds.name}: labels {ds.label_names} do not match the model's {card.labels}")
    if len(ds) == 0:
        raise DataSetError(f"{ds.name or source}: empty data set; nothing to validate")
    out = collect_outputs(predictor, ds)
    y = np.asarray(ds.y)[out.index].astype(int)
    probs = predictor.calibrate(out.logits)  # the card's calibration, whatever its method
    pred = decided_classes(card, probs)
    binary = card.task == "binary"
    threshold = operating_threshold(card) if binary else None
    scorer = Scorer.for_card(card)
    summary = _dataset_summary(ds, out, y, card, source or str(ds.name), split)

    if binary:
        pos = card.positive_index
        curves = {card.positive_label: binary_curves((y == pos).astype(int), probs[:, pos], opts.n_boot, opts.seed)}
        tables = [{"label": card.positive_label, "scope": "binary", "table": threshold_table(
            (y == pos).astype(int), probs[:, pos], threshold, opts.prevalence, opts.target_sensitivities, opts.fixed_thresholds)}]
    else:
        curves = one_vs_rest_curves(y, probs, card.labels, opts.n_boot, opts.seed)
        tables = [{"label": card.labels[k], "scope": "one-vs-rest", "table": threshold_table(
            (y == k).astype(int), probs[:, k], None, opts.prevalence, opts.target_sensitivities, opts.fixed_thresholds)}
            for k in classes_of_interest(card)]
    calib = {"definition": f"top-label ECE, {ECE_BINS} equal-width bins; before = temperature 1, after = the card's calibration",
             "before": _calibration_block(card, y, probabilities(out.logits, 1.0), "none", 1.0),
             "after": _calibration_block(card, y, probs, card.calibration.method, card.calibration.temperature)}
    conf = probs[np.arange(len(y)), pred]
    result: dict[str, Any] = {
        "report": "medsight validation report", "generated": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "medsight_version": __version__, "options": opts.model_dump(),
        "model": _card_facts(card, predictor), "data": summary,
        "operating_point": {"rule": f"P({card.positive_label}) >= {threshold:.4f} (card threshold)" if binary else "argmax of the calibrated probabilities",
                            "threshold": threshold},
        "metrics": {"averaging": f"binary (positive = {card.positive_label})" if binary else "macro one-vs-rest",
                    "ci_method": f"percentile bootstrap of cases, {opts.n_boot} resamples, 95%",
                    "values": bootstrap_metrics(scorer, y, probs, n_boot=opts.n_boot, seed=opts.seed), "names": list(METRICS)},
        "per_class": _per_class(card, y, probs, pred, curves),
        "confusion_matrix": {"labels": card.labels, "rows": "reference", "columns": "model",
                             "matrix": confusion_matrix(y, pred, labels=list(range(card.num_outputs))).tolist()},
        "curves": curves, "threshold_tables": tables, "calibration": calib,
        "selective_prediction": {"by": "calibrated confidence of the reported label", **risk_coverage(conf, pred == y)},
    }
    sub_frame = subgroup_frame(ds.meta.iloc[out.index].reset_index(drop=True), opts.subgroups, out.mean_intensity) if opts.subgroups else None
    result["data"]["subgroup_sizes"] = {
        c: dict(sorted(sub_frame[c].value_counts().items(), key=lambda kv: (kv[0] == UNKNOWN, str(kv[0]))))
        for c in sub_frame.columns} if sub_frame is not None else {}
    result["subgroups"] = analyse_subgroups(
        y, probs, sub_frame, scorer, card.task,
        SubgroupConfig(opts.min_cases, opts.min_class_cases, opts.n_boot, 0.05, opts.seed)) if sub_frame is not None else None
    picks = select_errors(card, y, probs, opts.gallery_size)
    result["gallery"] = {
        "positive_classes": [card.labels[k] for k in classes_of_interest(card)],
        **{kind: gallery_items(predictor, ds, rows, out.index, y, probs) for kind, rows in picks.items()},
    }
    result["warnings"] = _top_warnings(card, summary, calib, opts) + (result["subgroups"]["warnings"] if result["subgroups"] else [])
    result["_figures"] = _figures(card, result, pred, y)
    return result


def _figures(card: ModelCard, r: dict[str, Any], pred: np.ndarray, y: np.ndarray) -> dict[str, str | None]:
    op = None
    if card.task == "binary":
        row = next(x for x in r["threshold_tables"][0]["table"]["rows"] if x["name"].startswith("model operating point"))
        if row["fpr"] is not None and row["sensitivity"] is not None:
            op = {"card threshold": (row["fpr"], row["sensitivity"])}
    figs = {
        "curves": figures.curves_figure(r["curves"], op),
        "confusion": figures.confusion_figure(r["confusion_matrix"]["matrix"], card.labels,
                                              f"Confusion matrix at the operating point (n={len(y)})"),
        "reliability": figures.reliability_figure(r["calibration"]["before"], r["calibration"]["after"]),
        "risk_coverage": figures.risk_coverage_figure(r["selective_prediction"]),
    }
    if r["subgroups"]:
        shown = tested_metrics(card.task)
        for col in r["subgroups"]["columns"]:
            figs[f"subgroup:{col['column']}"] = figures.subgroup_figure(col, shown)
    return figs


def validate(model: str | Path, data: str | Path, split: str | None = None, options: ValidationOptions | None = None) -> dict[str, Any]:
    """Load a model (zoo name or package dir) and a data set (.npz / CSV manifest / class folders) and validate."""
    predictor = load_model(model)
    ds = load_dataset(data, split, label_names=predictor.card.labels)
    return validate_dataset(predictor, ds, options, source=str(data), split=split)


# -- writing ----------------------------------------------------------------------------
def public_numbers(result: dict[str, Any]) -> dict[str, Any]:
    """The report dict without figures and image bytes (keys starting with '_')."""
    if isinstance(result, dict):
        return {k: public_numbers(v) for k, v in result.items() if not str(k).startswith("_")}
    if isinstance(result, list):
        return [public_numbers(v) for v in result]
    return result


def _fmt(v: Any, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and (math.isnan(v) or math.isinf(v))):
        return "not computable"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def _fmt_ci(ci: Any, digits: int = 3) -> str:
    if not ci or any(c is None for c in ci):
        return "not computable"
    return f"{ci[0]:.{digits}f} – {ci[1]:.{digits}f}"


def _pct(v: Any, digits: int = 1) -> str:
    return "not computable" if v is None else f"{100 * v:.{digits}f}%"


def render_html(result: dict[str, Any]) -> str:
    env = Environment(loader=PackageLoader("medsight.evaluate", "templates"), autoescape=select_autoescape(["html"]),
                      undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.filters.update(fmt=_fmt, fmt_ci=_fmt_ci, pct=_pct)
    return env.get_template("report.html").render(r=result, figs=result.get("_figures", {}))


def write_report(result: dict[str, Any], out_dir: str | Path) -> tuple[Path, Path]:
    """``report.json`` (numbers) and ``report.html`` (the same numbers, figures embedded) in ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    numbers = jsonable(public_numbers(result))
    json_path = out / REPORT_JSON
    json_path.write_text(json.dumps(numbers, indent=2, allow_nan=False) + "\n")
    html_path = out / REPORT_HTML
    html_path.write_text(render_html({**numbers, "_figures": result.get("_figures", {}), "gallery": result["gallery"]}), encoding="utf-8")
    return html_path, json_path
