"""Report figures as base64 PNG strings (embedded in the HTML so it opens offline).

Figures are built with :class:`matplotlib.figure.Figure` directly (Agg canvas, no
pyplot state machine), so report generation has no global state and is safe in
a server thread. Fonts are set per figure at sizes that stay legible when the
image is shown at 100% in a browser.
"""

from __future__ import annotations

import base64
import io
from typing import Any

import numpy as np
from matplotlib import rc_context
from matplotlib.figure import Figure

STYLE = {
    "font.size": 12, "axes.titlesize": 13, "axes.labelsize": 12, "xtick.labelsize": 11, "ytick.labelsize": 11,
    "legend.fontsize": 10, "axes.grid": True, "grid.alpha": 0.3, "axes.spines.top": False, "axes.spines.right": False,
}
COLOURS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf"]
DPI = 100


def to_base64(fig: Figure) -> str:
    """PNG, reduced to a 256-colour palette: plots lose nothing visible and the file shrinks about threefold."""
    from PIL import Image

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight")
    buf.seek(0)
    small = io.BytesIO()
    Image.open(buf).convert("RGB").quantize(colors=256).save(small, format="PNG", optimize=True)
    return base64.b64encode(small.getvalue()).decode("ascii")


def png_base64(rgb: np.ndarray) -> str:
    """An (H, W, 3|1) uint8 array as base64 PNG (for gallery thumbnails)."""
    from PIL import Image

    arr = rgb[..., 0] if rgb.ndim == 3 and rgb.shape[-1] == 1 else rgb
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def curves_figure(curves: dict[str, dict[str, Any]], operating: dict[str, tuple[float, float]] | None = None) -> str | None:
    """ROC (left) and precision-recall (right) with bootstrap bands, one colour per curve."""
    drawable = {k: c for k, c in curves.items() if c.get("computable")}
    if not drawable:
        return None
    band_alpha = 0.18 if len(drawable) <= 3 else 0.08  # many overlapping bands would hide the curves
    with rc_context(STYLE):
        fig = Figure(figsize=(12, 5.4))
        roc, pr = fig.subplots(1, 2)
        for i, (name, c) in enumerate(drawable.items()):
            col = COLOURS[i % len(COLOURS)]
            grid = np.asarray(c["grid"])
            roc.plot(c["roc"]["fpr"], c["roc"]["tpr"], color=col, lw=2, label=f"{name}: AUC {c['auc']:.3f}")
            pr.plot(c["pr"]["recall"], c["pr"]["precision"], color=col, lw=2, drawstyle="steps-post",
                    label=f"{name}: AP {c['average_precision']:.3f}")
            if c.get("roc_band"):
                roc.fill_between(grid, c["roc_band"]["lower"], c["roc_band"]["upper"], color=col, alpha=band_alpha, lw=0)
                pr.fill_between(grid, c["pr_band"]["lower"], c["pr_band"]["upper"], color=col, alpha=band_alpha, lw=0)
            if len(drawable) == 1:
                pr.axhline(c["prevalence"], color="grey", ls=":", lw=1.2, label=f"chance (prevalence {c['prevalence']:.2f})")
        if operating:
            for name, (fpr, tpr) in operating.items():
                roc.plot([fpr], [tpr], "ko", ms=8, label=f"operating point ({name})")
        roc.plot([0, 1], [0, 1], color="grey", ls=":", lw=1.2)
        roc.set(xlabel="1 - specificity (false-positive rate)", ylabel="sensitivity", title="ROC curve (shaded: 95% bootstrap band)",
                xlim=(-0.01, 1.01), ylim=(-0.01, 1.01))
        pr.set(xlabel="sensitivity (recall)", ylabel="PPV (precision)", title="Precision-recall curve (shaded: 95% band)",
               xlim=(-0.01, 1.01), ylim=(-0.01, 1.01))
        roc.legend(loc="lower right")
        pr.legend(loc="lower left")
        fig.tight_layout()
        return to_base64(fig)


def confusion_figure(matrix: list[list[int]], labels: list[str], title: str) -> str:
    cm = np.asarray(matrix)
    rows = cm.sum(axis=1, keepdims=True)
    share = np.divide(cm, rows, out=np.zeros_like(cm, dtype=float), where=rows > 0)
    k = len(labels)
    side = max(4.8, 0.9 * k + 2.5)  # shown at 100%: cells stay about 90 px wide whatever k is
    with rc_context({**STYLE, "axes.grid": False}):
        fig = Figure(figsize=(side + 1.2, side))
        ax = fig.subplots()
        im = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
        for i in range(cm.shape[0]):
            for j in range(cm.shape[1]):
                ax.text(j, i, f"{cm[i, j]}\n({100 * share[i, j]:.0f}%)", ha="center", va="center", fontsize=12 if k <= 5 else 11,
                        color="white" if share[i, j] > 0.6 else "black")
        ax.set_xticks(range(k), labels, rotation=30 if k > 3 else 0, ha="right" if k > 3 else "center")
        ax.set_yticks(range(k), labels)
        ax.set(xlabel="model says", ylabel="reference label", title=title)
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="share of the row")
        fig.tight_layout()
        return to_base64(fig)


def reliability_figure(before: dict[str, Any], after: dict[str, Any]) -> str:
    """Two reliability diagrams (accuracy vs confidence per bin) with the case counts below."""
    with rc_context(STYLE):
        fig = Figure(figsize=(12, 6.2))
        axes = fig.subplots(2, 2, gridspec_kw={"height_ratios": [3, 1]}, sharex="col")
        for col, (res, name) in enumerate(((before, "before calibration (T = 1)"), (after, f"after calibration (T = {after['temperature']:.2f})"))):
            top, bottom = axes[0, col], axes[1, col]
            bins = res["bins"]
            centres = [(b["lower"] + b["upper"]) / 2 for b in bins]
            width = bins[0]["upper"] - bins[0]["lower"]
            acc = [b["accuracy"] if b["accuracy"] is not None else 0 for b in bins]
            conf = [b["mean_confidence"] if b["mean_confidence"] is not None else c for b, c in zip(bins, centres)]
            top.bar(centres, acc, width=width * 0.95, color="#1f77b4", alpha=0.8, label="observed accuracy")
            top.plot(centres, conf, "o", color="#d62728", ms=5, label="mean confidence in bin")
            top.plot([0, 1], [0, 1], color="grey", ls=":", lw=1.2, label="perfect calibration")
            top.set(ylim=(0, 1.02), ylabel="accuracy", title=f"{name}\nECE = {res['ece']:.3f}")
            top.legend(loc="upper left")
            bottom.bar(centres, [b["count"] for b in bins], width=width * 0.95, color="grey")
            bottom.set(xlabel="confidence of the top label", ylabel="cases", xlim=(0, 1))
        fig.tight_layout()
        return to_base64(fig)


def risk_coverage_figure(rc: dict[str, Any]) -> str | None:
    if not rc.get("computable"):
        return None
    with rc_context(STYLE):
        fig = Figure(figsize=(6.5, 4.6))
        ax = fig.subplots()
        ax.plot(rc["coverage"], rc["risk"], color="#1f77b4", lw=2)
        ax.set(xlabel="coverage (share of cases answered)", ylabel="error rate among answered cases",
               title=f"Risk-coverage (least confident referred first)\nAURC = {rc['aurc']:.3f}", xlim=(0, 1.01))
        ax.set_ylim(bottom=0)
        fig.tight_layout()
        return to_base64(fig)


def subgroup_figure(column: dict[str, Any], metrics: tuple[str, ...]) -> str | None:
    """Forest plot: each subgroup's metric with its 95% CI; hollow markers = too small to judge."""
    groups = column["groups"]
    if not groups:
        return None
    with rc_context(STYLE):
        fig = Figure(figsize=(4.2 * len(metrics), 0.55 * len(groups) + 1.8))
        axes = np.atleast_1d(fig.subplots(1, len(metrics), sharey=True))
        ys = np.arange(len(groups))[::-1]
        for ax, m in zip(axes, metrics):
            for y_pos, g in zip(ys, groups):
                v = g["metrics"][m]["value"]
                ci = g["metrics"][m]["ci"]
                if v is None:
                    ax.text(0.5, y_pos, "not computable", ha="center", va="center", fontsize=10, color="grey")
                    continue
                worse = any(t.get("significantly_worse") for k, t in g.get("versus_rest", {}).items() if k == m)
                colour = "#d62728" if worse else "#1f77b4"
                if ci:
                    ax.plot(ci, [y_pos, y_pos], color=colour, lw=2)
                ax.plot([v], [y_pos], "o", ms=8, color=colour, mfc=colour if g["judgeable"] else "white")
            ax.set(xlim=(-0.02, 1.02), title=m.upper() if m in ("auc", "ppv", "npv") else m, xlabel="value (95% CI)")
        axes[0].set_yticks(ys, [f"{g['value']} (n={g['n']})" for g in groups])
        fig.suptitle(f"Subgroups by {column['column']} (red: significantly worse; hollow: too small to judge)", fontsize=12)
        fig.tight_layout()
        return to_base64(fig)
