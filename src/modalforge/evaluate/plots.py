"""The report's PNG plots, one function per plot: data in, PNG written to ``path``, ``path`` out.

Drawn with matplotlib's object API on the Agg canvas, never pyplot: pyplot keeps global figure
state and may pick a GUI backend, neither of which a library called from servers and tests wants.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np
from matplotlib.figure import Figure

from modalforge.evaluate.metrics import CalibrationBins, Curve
from modalforge.files import atomic_path

DPI = 100
MAX_CURVES = 10  # per-class ROC / PR curves drawn; more is an unreadable tangle
CELL_TEXT_MAX = 20  # above this many classes the confusion matrix cells get no numbers
LABEL_CHARS = 24


def label(name: str, width: int = LABEL_CHARS) -> str:
    """A class or modality name fit for an axis or legend: truncated, ``$`` escaped (matplotlib
    would read it as the start of a formula, and fail on an odd count), and a leading ``_``
    shielded (a legend silently drops labels that start with one)."""
    text = name if len(name) <= width else name[: width - 1] + "…"
    text = text.replace("$", r"\$")
    return "\u200b" + text if text.startswith("_") else text


def plot_confusion(confusion: np.ndarray, class_names: Sequence[str], path: Path) -> Path:
    """``(C, C)`` counts (rows = true) -> heat map normalized per row (a row without samples
    stays 0). Cell values are printed up to ``CELL_TEXT_MAX`` classes."""
    counts = np.asarray(confusion, dtype=np.float64)
    c = len(class_names)
    support = counts.sum(axis=1, keepdims=True)
    norm = np.divide(counts, support, out=np.zeros_like(counts), where=support > 0)
    side = min(4.0 + 0.28 * c, 30.0)
    fig = Figure(figsize=(side + 1.2, side), dpi=DPI)
    ax = fig.add_subplot()
    image = ax.imshow(norm, cmap="Blues", vmin=0.0, vmax=1.0, interpolation="nearest")
    fontsize = 9 if c <= 30 else 7
    names = [label(n) for n in class_names]
    ax.set_xticks(range(c), names, rotation=90, fontsize=fontsize)
    ax.set_yticks(range(c), names, fontsize=fontsize)
    big = 10 + min(c, 100) // 25
    ax.set_xlabel("predicted", fontsize=big)
    ax.set_ylabel("true", fontsize=big)
    ax.set_title("Confusion matrix (each row normalized)", fontsize=big + 2)
    if c <= CELL_TEXT_MAX:
        for i in range(c):
            for j in range(c):
                if counts[i, j]:
                    color = "white" if norm[i, j] > 0.5 else "black"
                    ax.text(
                        j, i, f"{norm[i, j]:.2f}", ha="center", va="center", fontsize=8, color=color
                    )
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="fraction of the true class")
    return _save(fig, path)


def plot_curves(
    curves: Sequence[Curve],
    class_names: Sequence[str],
    support: Sequence[int],
    path: Path,
    kind: Literal["roc", "pr"],
    macro: float | None = None,
) -> Path:
    """Per-class ROC (``kind="roc"``) or PR (``kind="pr"``) curves for at most ``MAX_CURVES``
    classes (the ones with the most samples), plus for ROC the macro average: the mean TPR of all
    defined classes on a common FPR grid, labelled with the macro AUROC ``macro``."""
    defined = [k for k, curve in enumerate(curves) if curve.area is not None]
    shown = sorted(defined, key=lambda k: (-support[k], k))[:MAX_CURVES]
    fig = Figure(figsize=(7.0, 6.0), dpi=DPI)
    ax = fig.add_subplot()
    area = "AUC" if kind == "roc" else "AP"
    for k in sorted(shown):
        curve = curves[k]
        ax.plot(
            curve.x,
            curve.y,
            lw=1.2,
            # a PR curve holds its precision until the next threshold; ROC points join linearly
            drawstyle="steps-post" if kind == "pr" else "default",
            label=f"{label(class_names[k])} ({area} {curve.area:.3f})",
        )
    if kind == "roc":
        ax.plot([0, 1], [0, 1], ls=":", color="grey", lw=1)
        if defined and macro is not None:
            grid = np.linspace(0.0, 1.0, 201)
            mean_tpr = np.mean([np.interp(grid, curves[k].x, curves[k].y) for k in defined], axis=0)
            ax.plot(grid, mean_tpr, "k--", lw=2, label=f"macro average (AUC {macro:.3f})")
        ax.set_xlabel("false positive rate")
        ax.set_ylabel("true positive rate")
        title = "ROC curves (one-vs-rest)"
    else:
        ax.set_xlabel("recall")
        ax.set_ylabel("precision")
        title = "Precision-recall curves"
    notes = []
    if len(shown) < len(defined):
        notes.append(f"{len(shown)} of {len(defined)} classes, those with the most samples")
    if len(defined) < len(curves):
        notes.append(f"{len(curves) - len(defined)} undefined, not drawn")
    if notes:
        title += "\n" + "; ".join(notes)
    if not defined:
        ax.text(0.5, 0.5, "undefined: no class has both positives and negatives", ha="center")
    ax.set_title(title)
    ax.set_xlim(-0.01, 1.01)
    ax.set_ylim(-0.01, 1.01)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="lower right" if kind == "roc" else "lower left", fontsize=8)
    return _save(fig, path)


def plot_reliability(bins: CalibrationBins, ece: float, path: Path) -> Path:
    """Reliability diagram: accuracy per confidence bin against the diagonal, with the number of
    samples per bin below."""
    fig = Figure(figsize=(6.0, 6.5), dpi=DPI)
    top, bottom = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    width = bins.upper - bins.lower
    filled = bins.count > 0
    top.bar(
        bins.lower[filled],
        bins.accuracy[filled],
        width=width[filled],
        align="edge",
        color="tab:blue",
        alpha=0.6,
        edgecolor="black",
        label="accuracy",
    )
    # the gap between accuracy and the bin's mean confidence is what ECE sums, weighted by count
    top.bar(
        bins.lower[filled],
        bins.confidence[filled] - bins.accuracy[filled],
        bottom=bins.accuracy[filled],
        width=width[filled],
        align="edge",
        facecolor="none",
        edgecolor="tab:red",
        hatch="///",
        label="gap to mean confidence",
    )
    top.plot([0, 1], [0, 1], ls="--", color="black", lw=1, zorder=3, label="perfect calibration")
    top.set_ylabel("accuracy")
    top.set_ylim(0, 1)
    top.set_title(f"Reliability (top label, ECE {ece:.4f})")
    top.legend(loc="upper left", fontsize=8)
    top.grid(alpha=0.3)
    bottom.bar(bins.lower, bins.count, width=width, align="edge", color="grey", edgecolor="black")
    bottom.set_xlabel("confidence")
    bottom.set_ylabel("samples")
    bottom.set_xlim(0, 1)
    return _save(fig, path)


def plot_bars(
    names: Sequence[str],
    values: Sequence[float],
    path: Path,
    title: str,
    xlabel: str,
    errors: Sequence[float] | None = None,
    reference: float | None = None,
    notes: Sequence[str] | None = None,
    highlight: int | None = None,
) -> Path:
    """Horizontal bars, first name on top, values about [0, 1] (per-class F1, ablation rows,
    fusion weights), ``errors`` as error bars. ``reference`` draws a vertical line (macro F1, the
    "all" row); ``notes`` are printed after the bars (up to 40 bars); ``highlight`` colors one."""
    n = len(names)
    fig = Figure(figsize=(7.5, max(2.5, 0.28 * n + 1.2)), dpi=DPI)
    ax = fig.add_subplot()
    colors = ["tab:blue"] * n
    if highlight is not None:
        colors[highlight] = "tab:orange"
    ax.barh(range(n), values, xerr=errors, color=colors, capsize=3 if errors is not None else 0)
    ends = np.asarray(values, dtype=np.float64) + (0.0 if errors is None else np.asarray(errors))
    ax.set_yticks(range(n), [label(x) for x in names], fontsize=9 if n <= 40 else 7)
    ax.set_ylim(n - 0.5, -0.5)  # first name on top, no empty margin rows
    ax.set_xlim(0, max(1.0, float(ends.max(initial=0.0))) + 0.22)
    if reference is not None:
        ax.axvline(reference, color="black", ls="--", lw=1)
    if notes is not None and n <= 40:
        box = {"facecolor": "white", "edgecolor": "none", "alpha": 0.8, "pad": 1}
        for i, (end, note) in enumerate(zip(ends, notes, strict=True)):
            ax.text(end + 0.01, i, note, va="center", fontsize=8, bbox=box)
    ax.set_xlabel(xlabel)
    ax.set_title(title)
    ax.grid(axis="x", alpha=0.3)
    return _save(fig, path)


def plot_scatter(y_true: np.ndarray, y_pred: np.ndarray, path: Path) -> Path:
    """Predicted against true values (all outputs together) with the ``y = x`` line."""
    t, p = np.ravel(y_true), np.ravel(y_pred)
    fig = Figure(figsize=(6.0, 6.0), dpi=DPI)
    ax = fig.add_subplot()
    ax.scatter(t, p, s=8, alpha=float(np.clip(300 / t.size, 0.05, 0.8)), edgecolors="none")
    lo, hi = float(min(t.min(), p.min())), float(max(t.max(), p.max()))
    pad = (hi - lo) * 0.05 or 1.0
    ax.plot([lo - pad, hi + pad], [lo - pad, hi + pad], ls="--", color="grey", lw=1)
    ax.set_xlim(lo - pad, hi + pad)
    ax.set_ylim(lo - pad, hi + pad)
    ax.set_aspect("equal")
    ax.set_xlabel("true")
    ax.set_ylabel("predicted")
    ax.set_title("Predicted vs true")
    ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_residuals(y_true: np.ndarray, y_pred: np.ndarray, path: Path) -> Path:
    """Histogram of ``predicted - true`` (all outputs together)."""
    residual = np.ravel(y_pred) - np.ravel(y_true)
    fig = Figure(figsize=(6.5, 4.5), dpi=DPI)
    ax = fig.add_subplot()
    ax.hist(
        residual,
        bins=int(np.clip(np.sqrt(residual.size), 10, 50)),
        color="tab:blue",
        edgecolor="black",
    )
    ax.axvline(0.0, color="black", ls="--", lw=1)
    ax.set_xlabel("predicted - true")
    ax.set_ylabel("samples")
    ax.set_title("Residuals")
    ax.grid(alpha=0.3)
    return _save(fig, path)


def _save(fig: Figure, path: Path) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", bbox_inches="tight")
    return path
