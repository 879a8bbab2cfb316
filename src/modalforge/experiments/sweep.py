"""Compare every fusion, and every input column alone, on one split: ``modalforge sweep``.

    table = sweep(RunOptions(manifest="data/emoji/manifest.csv", label="category"),
                  out="runs/sweep")

Each run trains in ``OUT/<name>/`` (config, logs, report; no bundle) and the comparison goes to
``OUT/sweep.csv``, ``OUT/sweep.md`` and ``OUT/sweep.png``. Frozen encoders read their features
from the on-disk cache, so they encode each file once for the whole sweep (the first run misses
the cache, the others hit it); the table's cache columns show it.

The helpers here (``prepare``, ``reference_split``) are shared with cross-validation
and ensembles: they read and clean the manifest once and pin every run to one explicit ``split``
column, so no run's split depends on its seed or on which columns it reads.
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from modalforge.data.manifest import Manifest
from modalforge.experiments.run import RunOptions, train_run
from modalforge.files import atomic_path, atomic_write_text

# the original row position of every manifest row; columns starting with "_" are never inputs
ROW = "_row"
LATENCY_KEY = "latency per row, cached features (ms)"
TRAINABLE_KEY = "trainable parameters (fusion + head + trained encoders)"
CLASSIFICATION_METRICS = ("accuracy", "f1_macro", "auroc_macro", "ece")
REGRESSION_METRICS = ("rmse", "mae", "r2")


@dataclass
class Prepared:
    """A manifest read and cleaned once (with every input column the options select)."""

    manifest: Manifest  # cleaned; column ROW holds each row's position in the original file
    task: str
    classifies: bool  # classes (accuracy, F1, ...) rather than values (RMSE, ...)
    inputs: list[str]  # the input columns, in schema order
    strata: list[str]  # per row: the label (classification) or "all" (regression)
    groups: list[str] | None  # per row: the `group` column, if the manifest has one

    @property
    def frame(self) -> pd.DataFrame:
        return self.manifest.frame

    def with_split(self, split: np.ndarray) -> Manifest:
        """A copy of the manifest whose ``split`` column is ``split`` (one entry per row)."""
        frame = self.frame.copy()
        frame["split"] = np.asarray(split, dtype=object)
        return Manifest(frame, self.manifest.root, self.manifest.path)


def prepare(options: RunOptions, progress: bool = True) -> Prepared:
    """Read ``options.manifest``, resolve its schema and drop bad rows (``options.on_bad_row``)
    exactly as ``MultimodalPredictor.fit`` would, once, for every run that follows. Sweeps,
    folds and ensembles compare classifiers and regressors (the ``experiments`` capability)."""
    from modalforge.tasks import get, implied_task
    from modalforge.tasks.registry import EXPERIMENTS

    spec = get(implied_task(options) or "classification")
    if not spec.can(EXPERIMENTS):
        raise ValueError(f"sweep, cv and ensemble compare classifiers and regressors, not "
                         f"{spec.summary} models")  # fmt: skip
    predictor = options.predictor()
    manifest = predictor._manifest(options.manifest)
    if options.label not in manifest.columns:
        raise ValueError(
            f"label column {options.label!r} not in the manifest (columns: {manifest.columns})"
        )
    frame = manifest.frame.copy()
    frame[ROW] = np.arange(len(frame))
    manifest = Manifest(frame, manifest.root, manifest.path)
    schema = predictor._resolve_schema(manifest)
    manifest = predictor._clean(manifest, schema, progress)
    if len(manifest) == 0:
        raise ValueError("no usable rows in the manifest")
    frame = manifest.frame
    predictor._prepare_labels(manifest)  # the task guessed from the label, as fit() does
    strata = (
        frame[options.label].astype(str).tolist() if predictor.classifies else ["all"] * len(frame)
    )
    groups = frame["group"].astype(str).tolist() if "group" in frame else None
    return Prepared(manifest, predictor.task, predictor.classifies,
                    [c.name for c in schema.inputs], strata, groups)  # fmt: skip


def reference_split(prepared: Prepared, options: RunOptions) -> np.ndarray:
    """Each row's split name, as ``MultimodalPredictor._split`` picks it for ``options.seed``:
    the manifest's own ``split`` column when it has train and val rows, else the seeded,
    stratified (and grouped) split. Rows in no split keep their value (they stay unused)."""
    predictor = options.predictor()
    predictor.task = prepared.task
    frame = prepared.frame
    if "split" in frame:
        split = np.array(["" if pd.isna(v) else str(v) for v in frame["split"]], dtype=object)
    else:
        split = np.full(len(frame), "", dtype=object)
    position = pd.Index(frame[ROW])
    for name, part in predictor._split(prepared.manifest).items():
        split[position.get_indexer(part.frame[ROW])] = name
    return split


def split_counts(split: np.ndarray) -> dict[str, int]:
    return {name: int((split == name).sum()) for name in ("train", "val", "test")}


def pinned_split(
    options: RunOptions, out: Path, progress: bool, purpose: str
) -> tuple[Prepared, np.ndarray]:
    """Read the manifest once, fix the split every run will share, refuse a split without test
    rows (``purpose`` says what they were for) and record it as ``OUT/split.csv``."""
    out.mkdir(parents=True, exist_ok=True)
    prepared = prepare(options, progress)
    split = reference_split(prepared, options)
    if split_counts(split)["test"] == 0:
        raise ValueError(f"the split has no test rows: nothing to {purpose}")
    write_split(prepared, split, out / "split.csv")
    return prepared, split


def write_split(prepared: Prepared, split: np.ndarray, path: Path, name: str = "split") -> Path:
    """``row`` (position in the manifest file) and ``split`` per used row, as CSV."""
    with atomic_path(path) as tmp:
        pd.DataFrame({"row": prepared.frame[ROW].to_numpy(), name: split}).to_csv(tmp, index=False)
    return path


def metric_names(classifies: bool) -> tuple[str, ...]:
    return CLASSIFICATION_METRICS if classifies else REGRESSION_METRICS


def folder_name(text: str) -> str:
    """A column or fusion name made safe as a folder name."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._") or "column"


# ---------------------------------------------------------------------------------- the sweep
def sweep(
    options: RunOptions,
    fusions: list[str] | None = None,
    single_modalities: bool = True,
    out: str | Path | None = None,
    progress: bool = True,
) -> pd.DataFrame:
    """Train every fusion in ``fusions`` (default: all registered) over all input columns, and
    (with ``single_modalities``) each input column alone with ``concat``, all on one split, and
    compare them on the test split. ``out`` defaults to ``options.out``.

    Returns the comparison table (best first), also written to ``OUT/sweep.csv`` and
    ``OUT/sweep.md``, with the chart ``OUT/sweep.png``. A run that fails is kept as a row with its
    ``error``; the sweep raises only if every run failed.
    """
    from modalforge.fusion import list_fusions

    known = [f.name for f in list_fusions()]
    fusions = list(known if fusions is None else fusions)
    unknown = [f for f in fusions if f not in known]
    if unknown:
        raise ValueError(f"unknown fusion(s) {unknown} (choose from {', '.join(known)})")
    out = Path(out if out is not None else options.out)
    prepared, split = pinned_split(options, out, progress, "compare the runs on")
    manifest = prepared.with_split(split)

    plan: list[tuple[str, str, RunOptions]] = []
    for fusion in fusions:
        kwargs = options.fusion_kwargs if fusion == options.fusion else {}
        plan.append((fusion, "fusion", replace(options, fusion=fusion, fusion_kwargs=kwargs)))
    if single_modalities and len(prepared.inputs) > 1:
        for column in prepared.inputs:
            single = replace(options, fusion="concat", fusion_kwargs={}, columns=[column])
            plan.append((f"only {column}", "single modality", single))
    if not plan:
        raise ValueError("nothing to run: no fusions and no single modalities")

    rows = []
    started = time.perf_counter()
    for name, kind, run_options in plan:
        folder = out / folder_name(name.replace("only ", "only-"))
        run_options = replace(run_options, out=str(folder), save_bundle=False, resume=False)
        print(f"sweep: {name} ({kind}) -> {folder}")
        try:
            summary = train_run(run_options, progress, manifest)
        except Exception as err:  # one failed run must not end the sweep
            print(f"sweep: {name} failed: {type(err).__name__}: {err}")
            rows.append(_row(name, kind, folder, prepared.classifies,
                             error=f"{type(err).__name__}: {err}"))  # fmt: skip
            continue
        rows.append(_row(name, kind, folder, prepared.classifies, summary))
    if all(r["error"] for r in rows):
        raise RuntimeError(f"every run of the sweep failed; first: {rows[0]['error']}")

    key = "accuracy" if prepared.classifies else "rmse"
    table = pd.DataFrame(rows)
    table["_failed"] = table["error"].notna()
    table = (
        table.sort_values(["_failed", key], ascending=[True, key == "rmse"], na_position="last")
        .drop(columns="_failed")
        .reset_index(drop=True)
    )
    cache = _cache_summary(table)
    info = {
        "task": prepared.task,
        "rows": split_counts(split),
        "seed": options.seed,
        "seconds": round(time.perf_counter() - started, 1),
        "cache": cache,
    }
    with atomic_path(out / "sweep.csv") as tmp:
        table.to_csv(tmp, index=False)
    chart = plot_sweep(table, prepared.classifies, out / "sweep.png")
    atomic_write_text(out / "sweep.md", _markdown(table, info, chart.name))
    table.attrs.update(
        info, csv=str(out / "sweep.csv"), markdown=str(out / "sweep.md"), chart=str(chart)
    )
    return table


def _row(
    name: str,
    kind: str,
    folder: Path,
    classifies: bool,
    summary: dict[str, Any] | None = None,
    error: str | None = None,
) -> dict[str, Any]:
    summary = summary or {}
    head = summary.get("headline") or {}
    history = summary.get("history") or {}
    cache = history.get("cache") or {}
    row: dict[str, Any] = {"name": name, "kind": kind}
    row.update({m: head.get(m) for m in metric_names(classifies)})
    row.update(
        parameters=summary.get("parameters"),
        trainable_parameters=summary.get(TRAINABLE_KEY),
        train_s=history.get("train_seconds"),
        encode_s=history.get("encode_seconds"),
        latency_ms=summary.get(LATENCY_KEY),
        epochs=history.get("epochs_run"),
        cache_hits=sum(s["hits"] for s in cache.values()) if summary else None,
        cache_misses=sum(s["misses"] for s in cache.values()) if summary else None,
        run=str(folder),
        error=error,
    )
    return row


def _cache_summary(table: pd.DataFrame) -> dict[str, Any]:
    ok = table[table["error"].isna()]
    misses = ok["cache_misses"].fillna(0).astype(int)
    return {
        "hits": int(ok["cache_hits"].fillna(0).sum()),
        "misses": int(misses.sum()),
        "encode_seconds": round(float(ok["encode_s"].fillna(0).sum()), 3),
        "runs_that_encoded": ok.loc[misses > 0, "name"].tolist(),
    }


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float | np.floating):
        return f"{value:.{digits}f}"
    if isinstance(value, int | np.integer):
        return f"{int(value):,}"
    return str(value)


SWEEP_COLUMNS = {
    "name": "run",
    "kind": "kind",
    "accuracy": "accuracy",
    "f1_macro": "macro F1",
    "auroc_macro": "macro AUROC",
    "ece": "ECE",
    "rmse": "RMSE",
    "mae": "MAE",
    "r2": "R2",
    "parameters": "parameters",
    "trainable_parameters": "trainable",
    "train_s": "training (s)",
    "encode_s": "encoding (s)",
    "latency_ms": "latency / sample (ms)",
    "epochs": "epochs",
    "cache_hits": "cache hits",
    "cache_misses": "cache misses",
}


def _markdown(table: pd.DataFrame, info: dict[str, Any], chart: str) -> str:
    columns = [c for c in SWEEP_COLUMNS if c in table.columns]
    lines = [
        "# modalforge sweep",
        "",
        f"Task: {info['task']}. Every run used the same split (seed {info['seed']}): "
        + ", ".join(f"{k} {v}" for k, v in info["rows"].items())
        + f" rows; metrics on the test split. Sweep time {info['seconds']} s.",
        "",
        "| " + " | ".join(SWEEP_COLUMNS[c] for c in columns) + " |",
        "|" + "|".join("---" for _ in columns) + "|",
    ]
    for _, row in table.iterrows():
        cells = [_fmt(row[c], 2 if c.endswith("_s") else 4) for c in columns]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    cache = info["cache"]
    if cache["hits"] + cache["misses"] == 0:
        lines.append(
            "No frozen encoders: every run trained its encoders on the raw inputs, so nothing "
            "was read from the feature cache."
        )
    else:
        encoded = ", ".join(cache["runs_that_encoded"]) or "none (all features were cached)"
        lines.append(
            f"Frozen-encoder features: {cache['misses']} encoded in total "
            f"({cache['encode_seconds']:.2f} s of encoding, all runs), {cache['hits']} read "
            f"from the cache. Runs that had to encode: {encoded}."
        )
    failed = table[table["error"].notna()]
    for _, row in failed.iterrows():
        lines.append(f"\n**{row['name']} failed**: {row['error']}")
    lines += ["", f"![sweep]({chart})", ""]
    return "\n".join(lines)


def plot_sweep(table: pd.DataFrame, classifies: bool, path: Path) -> Path:
    """Horizontal bars, best run on top: accuracy and macro F1 (classification) or RMSE
    (regression); fusions in blue, single modalities in orange."""
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    from modalforge.evaluate.plots import label

    metrics = (
        [("accuracy", "accuracy"), ("f1_macro", "macro F1")] if classifies else [("rmse", "RMSE")]
    )
    n = len(table)
    colors = {"fusion": "tab:blue", "single modality": "tab:orange"}
    fig = Figure(figsize=(8.0, max(2.5, 0.55 * n * len(metrics) / 2 + 1.4)), dpi=100)
    ax = fig.add_subplot()
    height = 0.8 / len(metrics)
    top = 0.0
    for j, (key, _) in enumerate(metrics):
        values = pd.to_numeric(table[key], errors="coerce").fillna(0.0).to_numpy(dtype=float)
        top = max(top, float(values.max(initial=0.0)))
        y = np.arange(n) - 0.4 + height * (j + 0.5)
        ax.barh(
            y,
            values,
            height,
            color=[colors.get(k, "tab:gray") for k in table["kind"]],
            alpha=1.0 if j == 0 else 0.5,
            hatch=None if j == 0 else "//",
            edgecolor="white",
        )
        for yi, v, err in zip(y, values, table["error"], strict=True):
            text = "failed" if isinstance(err, str) else f"{v:.3f}"
            ax.text(v + 0.005 * max(top, 1.0), yi, text, va="center", fontsize=7)
    ax.set_yticks(range(n), [label(str(x)) for x in table["name"]], fontsize=9)
    ax.set_ylim(n - 0.5, -0.5)
    ax.set_xlim(0, max(1.0, top) * 1.12)
    handles = []
    for kind, color in colors.items():
        if (table["kind"] == kind).any():
            for j, (_, shown) in enumerate(metrics):
                handles.append(
                    Patch(facecolor=color, alpha=1.0 if j == 0 else 0.5,
                          hatch=None if j == 0 else "//", label=f"{kind}: {shown}")
                )  # fmt: skip
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    shown = " and ".join(s for _, s in metrics)
    ax.set_xlabel(shown + " on the test split")
    ax.set_title(f"Sweep: {shown} per run")
    ax.grid(axis="x", alpha=0.3)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", bbox_inches="tight")
    return path
