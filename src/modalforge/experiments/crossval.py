"""K-fold cross-validation: ``modalforge cv --folds K``.

    result = cross_validate(RunOptions(manifest="data/emoji/manifest.csv", label="category"),
                            folds=5, out="runs/cv")

The manifest is read and cleaned once; its rows are dealt into K folds, stratified by label and
kept together by the ``group`` column when there is one, deterministically from the seed
(scikit-learn's ``StratifiedKFold`` / ``StratifiedGroupKFold`` with ``random_state=seed``). The
manifest's own ``split`` column, if any, is ignored. For fold k: test = fold k; val = a
stratified ``val_fraction`` of the other rows (``modalforge.data.split.stratified_split``,
same seed); train = the rest. Each fold trains in ``OUT/fold-k/`` (no bundle) and the per-fold
metrics with their mean and *sample* standard deviation (ddof=1) go to ``OUT/cv.json`` and
``OUT/cv.md``; ``OUT/folds.csv`` holds every row's fold.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from modalforge.data.split import stratified_split
from modalforge.experiments.run import RunOptions, train_run
from modalforge.experiments.sweep import ROW, metric_names, prepare
from modalforge.files import atomic_path, atomic_write_json, atomic_write_text

STD = "sample standard deviation over folds (ddof=1)"
METRIC_TITLES = {"accuracy": "accuracy", "f1_macro": "macro F1", "auroc_macro": "macro AUROC",
                 "ece": "ECE", "rmse": "RMSE", "mae": "MAE", "r2": "R2"}  # fmt: skip


def assign_folds(
    strata: list[str], folds: int, seed: int, groups: list[str] | None = None
) -> np.ndarray:
    """Each row's fold in ``[0, folds)``: stratified by ``strata``, rows of one group in one fold,
    the same for the same inputs and seed."""
    from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

    n = len(strata)
    if folds < 2:
        raise ValueError(f"need at least 2 folds, got {folds}")
    units = len(set(groups)) if groups is not None else n
    if units < folds:
        what = "groups" if groups is not None else "rows"
        raise ValueError(f"{folds} folds need at least {folds} {what}, got {units}")
    y = np.asarray(strata, dtype=object).astype(str)
    out = np.full(n, -1, dtype=np.int64)
    with warnings.catch_warnings():
        # "the least populated class has only N members": small classes miss some folds, fine
        warnings.filterwarnings("ignore", message=".*least populated class.*")
        if groups is None:
            splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
            parts = splitter.split(np.zeros(n), y)
        else:
            splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
            parts = splitter.split(np.zeros(n), y, np.asarray(groups, dtype=object).astype(str))
        for k, (_, test) in enumerate(parts):
            out[test] = k
    return out


def fold_split(
    fold: np.ndarray,
    k: int,
    strata: list[str],
    seed: int,
    groups: list[str] | None = None,
    val_fraction: float = 0.1,
) -> np.ndarray:
    """Split names for fold ``k``: test = fold k, val = a stratified (grouped) ``val_fraction``
    of the rest, train = the others."""
    split = np.full(len(fold), "test", dtype=object)
    rest = np.flatnonzero(fold != k)
    split[rest] = stratified_split(
        [strata[i] for i in rest],
        (1.0 - val_fraction, val_fraction),
        seed,
        [groups[i] for i in rest] if groups is not None else None,
        names=("train", "val"),
    )
    return split


def cross_validate(
    options: RunOptions,
    folds: int = 5,
    out: str | Path | None = None,
    val_fraction: float = 0.1,
    progress: bool = True,
) -> dict[str, Any]:
    """Train and test ``folds`` models, one per fold, and summarize their test metrics.

    Returns what ``OUT/cv.json`` holds (per-fold metrics and rows, mean, std) plus, per fold,
    ``test_rows``: the manifest row positions the fold's model was tested on.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    out = Path(out if out is not None else options.out)
    out.mkdir(parents=True, exist_ok=True)
    prepared = prepare(options, progress)
    fold = assign_folds(prepared.strata, folds, options.seed, prepared.groups)
    rows = prepared.frame[ROW].to_numpy()
    with atomic_path(out / "folds.csv") as tmp:
        pd.DataFrame({"row": rows, "fold": fold + 1}).to_csv(tmp, index=False)
    names = metric_names(prepared.classifies)

    results = []
    for k in range(folds):
        split = fold_split(fold, k, prepared.strata, options.seed, prepared.groups, val_fraction)
        run_options = replace(options, out=str(out / f"fold-{k + 1}"), save_bundle=False,
                              resume=False)  # fmt: skip
        print(f"cv: fold {k + 1} of {folds} -> {run_options.out}")
        summary = train_run(run_options, progress, prepared.with_split(split))
        head = summary.get("headline") or {}
        test = summary["predictor"].test_manifest
        history = summary["history"]
        results.append(
            {
                "fold": k + 1,
                "run": summary["run"],
                "rows": history["rows"],
                "metrics": {m: head.get(m) for m in names},
                "epochs": history["epochs_run"],
                "train_seconds": history["train_seconds"],
                "test_rows": sorted(int(r) for r in test.frame[ROW]),
            }
        )

    mean, std, defined = {}, {}, {}
    for m in names:
        values = [r["metrics"][m] for r in results if r["metrics"][m] is not None]
        defined[m] = len(values)
        mean[m] = math.fsum(values) / len(values) if values else None
        std[m] = float(np.std(values, ddof=1)) if len(values) > 1 else None
    result: dict[str, Any] = {
        "folds": folds,
        "task": prepared.task,
        "seed": options.seed,
        "grouped": prepared.groups is not None,
        "val_fraction": val_fraction,
        "rows": len(rows),
        "mean": mean,
        "std": std,
        "std_kind": STD,
        "folds_defined": defined,  # folds where the metric is defined (AUROC may not be)
        "per_fold": [{k: v for k, v in r.items() if k != "test_rows"} for r in results],
        "assignment": str(out / "folds.csv"),
    }
    atomic_write_text(out / "cv.md", _markdown(result))
    atomic_write_json(out / "cv.json", result)
    result["markdown"] = str(out / "cv.md")
    result["json"] = str(out / "cv.json")
    for entry, full in zip(result["per_fold"], results, strict=True):
        entry["test_rows"] = full["test_rows"]
    return result


def mean_pm_std(mean: float | None, std: float | None) -> str:
    if mean is None:
        return "-"
    return f"{mean:.4f}" if std is None else f"{mean:.4f} ± {std:.4f}"


def _markdown(result: dict[str, Any]) -> str:
    names = list(result["mean"])
    head = ["fold", "train", "val", "test", *(METRIC_TITLES.get(m, m) for m in names)]
    lines = [
        f"# modalforge cross-validation ({result['folds']} folds)",
        "",
        f"Task: {result['task']}; {result['rows']} rows; folds stratified by label"
        + (" and grouped by the `group` column" if result["grouped"] else "")
        + f", seed {result['seed']}; validation: {result['val_fraction']:.0%} of each fold's "
        f"training rows. ± is the {result['std_kind']}.",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "|".join("---" for _ in head) + "|",
    ]
    for r in result["per_fold"]:
        metrics = [("-" if r["metrics"][m] is None else f"{r['metrics'][m]:.4f}") for m in names]
        counts = [str(r["rows"].get(s, 0)) for s in ("train", "val", "test")]
        lines.append("| " + " | ".join([str(r["fold"]), *counts, *metrics]) + " |")
    summary = [mean_pm_std(result["mean"][m], result["std"][m]) for m in names]
    lines.append("| **mean ± std** | | | | " + " | ".join(summary) + " |")
    lines.append("")
    return "\n".join(lines)
