"""`modalforge sweep`, `cv` and `ensemble`: many runs of one `train` configuration.

The three share one set of flags, the `train` flags that make sense for many runs at once (no
--resume, no ddp): `shares_run_flags` adds them to each command's own flags, and `run_options`
turns their values into RunOptions, so each command declares only what is its own.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from modalforge.cli._common import (
    _cell,
    _encoder_flags,
    _fusion_names,
    _many_options,
    console,
    fail,
)

# the shared flags, by where they stand in each command's --help: --manifest and --label just
# before the command's own --out, --config just after it, the rest after the command's own flags
_BEFORE_OUT = {
    "manifest": Annotated[
        Path | None, typer.Option("--manifest", help="Training manifest (CSV, JSONL, Parquet).")
    ],
    "label": Annotated[str | None, typer.Option("--label", help="The label column.")],
}
_AFTER_OUT = {
    "config": Annotated[
        Path | None,
        typer.Option(
            "--config", help="YAML file with any `train` option (as run.yaml); flags win."
        ),
    ],
}
_LAST = {
    "image_encoder": Annotated[
        str | None, typer.Option("--image-encoder", help="Encoder for image columns.")
    ],
    "text_encoder": Annotated[
        str | None, typer.Option("--text-encoder", help="Encoder for text columns.")
    ],
    "audio_encoder": Annotated[
        str | None, typer.Option("--audio-encoder", help="Encoder for audio columns.")
    ],
    "encoder": Annotated[
        list[str] | None,
        typer.Option("--encoder", help="COLUMN=ENCODER for one column. Repeatable."),
    ],
    "image_size": Annotated[
        int | None, typer.Option("--image-size", help="Image side for efficientnet_lite0 / cnn.")
    ],
    "finetune": Annotated[
        str | None, typer.Option("--finetune", help="Pretrained encoders: frozen, top:N or full.")
    ],
    "columns": Annotated[
        str | None,
        typer.Option("--columns", help="Comma-separated input columns (default: all)."),
    ],
    "task": Annotated[
        str | None,
        typer.Option("--task", help="classification or regression (default: guessed)."),
    ],
    "epochs": Annotated[
        int | None,
        typer.Option("--epochs", help="Maximum epochs per run (early stopping may end sooner)."),
    ],
    "batch_size": Annotated[int | None, typer.Option("--batch-size", help="Batch size.")],
    "lr": Annotated[float | None, typer.Option("--lr", help="Learning rate of fusion + head.")],
    "patience": Annotated[
        int | None, typer.Option("--patience", help="Early-stopping patience in epochs.")
    ],
    "loss": Annotated[str | None, typer.Option("--loss", help="ce | focal | mse | huber.")],
    "class_weights": Annotated[
        str | None, typer.Option("--class-weights", help="none | balanced.")
    ],
    "augment": Annotated[
        bool | None,
        typer.Option(
            "--augment/--no-augment", help="Per-modality augmentation for trained encoders."
        ),
    ],
    "seed": Annotated[
        int | None,
        typer.Option("--seed", help="Seed of the split (or folds), initialization and order."),
    ],
    "devices": Annotated[
        str | None, typer.Option("--devices", help="Lightning devices (auto, 1, ...).")
    ],
    "accelerator": Annotated[
        str | None, typer.Option("--accelerator", help="Lightning accelerator (auto, cpu, gpu).")
    ],
}
RUN_FLAGS = {**_BEFORE_OUT, **_AFTER_OUT, **_LAST}

FusionOpt = Annotated[
    str | None, typer.Option(help="Fusion strategy (see `modalforge models list`).")
]


def shares_run_flags(command: Callable[..., None]) -> Callable[..., None]:
    """The command with the shared flags (all default None) added to its own, which include
    --out; it is called with its own flags and ``flags``, the shared ones' values by name."""

    def shared(aliases: dict) -> list[inspect.Parameter]:
        kind = inspect.Parameter.POSITIONAL_OR_KEYWORD
        return [inspect.Parameter(n, kind, default=None, annotation=a) for n, a in aliases.items()]

    own = inspect.signature(command, eval_str=True).parameters.values()
    own = [p for p in own if p.name != "flags"]
    at = [p.name for p in own].index("out")
    params = [*own[:at], *shared(_BEFORE_OUT), own[at], *shared(_AFTER_OUT), *own[at + 1 :],
              *shared(_LAST)]  # fmt: skip

    @functools.wraps(command)
    def with_flags(**values) -> None:
        flags = {name: values.pop(name) for name in RUN_FLAGS}
        command(**values, flags=flags)

    with_flags.__signature__ = inspect.Signature(params, return_annotation=None)  # type: ignore[attr-defined]
    with_flags.__annotations__ = {p.name: p.annotation for p in params}
    return with_flags


def run_options(command: str, out: Path | None, fusion: str | None, flags: dict):
    """RunOptions from the shared flags (and --config) as `train` reads them, and the output
    folder: --out, else the config's `out`, else runs/COMMAND."""
    flags = dict(flags)
    encoders = _encoder_flags(flags.pop("image_encoder"), flags.pop("text_encoder"),
                              flags.pop("audio_encoder"), flags.pop("encoder"))  # fmt: skip
    config, image_size = flags.pop("config"), flags.pop("image_size")
    return _many_options(command, out, config, fusion, encoders, image_size, **flags)


@shares_run_flags
def sweep(
    out: Annotated[
        Path | None,
        typer.Option("--out", "-o", help="Sweep folder: one run folder per row + the table."),
    ] = None,
    fusions: Annotated[
        str | None,
        typer.Option(help="Comma-separated fusions to compare (default: every fusion)."),
    ] = None,
    no_single: Annotated[
        bool,
        typer.Option("--no-single", help="Skip the runs on each input column alone."),
    ] = False,
    *,
    flags: dict,
) -> None:
    """Compare fusions, and each input column alone, on one split: OUT/sweep.csv, .md, .png.

    Trains every fusion (or those of --fusions) over all input columns, and each input column
    alone with concat (unless --no-single), on the same train/val/test split: the manifest's
    `split` column or the seeded split of --seed. Each run gets a folder OUT/NAME with its
    report but no bundle. The table has test accuracy, macro F1, macro AUROC, parameters (all
    and trainable), training and encoding time, latency per sample and epochs, best first.
    Frozen encoders read the feature cache, so their features are encoded once for the sweep.
    """
    from modalforge.experiments.sweep import sweep as run_sweep

    options, folder = run_options("sweep", out, None, flags)
    chosen = [f.strip() for f in fusions.split(",") if f.strip()] if fusions else None
    if chosen:
        unknown = [f for f in chosen if f not in _fusion_names()]
        if unknown:
            fail(f"unknown fusion(s) {unknown} (choose from {', '.join(_fusion_names())})")
    try:
        table = run_sweep(options, chosen, single_modalities=not no_single, out=folder)
    except (ValueError, KeyError, FileNotFoundError, RuntimeError) as err:
        fail(str(err))
    # compact headers: the full names are in OUT/sweep.md
    headers = {"name": "run", "kind": "kind", "accuracy": "acc", "f1_macro": "F1",
               "auroc_macro": "AUROC", "rmse": "RMSE", "mae": "MAE", "r2": "R2",
               "parameters": "params", "trainable_parameters": "trainable", "train_s": "train s",
               "encode_s": "encode s", "latency_ms": "ms/row", "epochs": "epochs"}  # fmt: skip
    shown = [c for c in headers if c in table.columns]
    result = Table(title=f"sweep ({table.attrs['task']}, test split)", title_justify="left")
    for c in shown:
        result.add_column(headers[c], justify="left" if c in ("name", "kind") else "right",
                          no_wrap=c == "name")  # fmt: skip
    for _, row in table.iterrows():
        cells = [_cell(row[c], 2 if c.endswith("_s") else 3) for c in shown]
        cells[1] = "single" if row["kind"] == "single modality" else row["kind"]
        if isinstance(row["error"], str):
            cells[0] = f"{row['name']} [red](failed)[/]"
        result.add_row(*cells)
    console.print(result)
    cache = table.attrs["cache"]
    if cache["hits"] + cache["misses"]:
        who = ", ".join(cache["runs_that_encoded"])
        console.print(
            f"feature cache: {cache['misses']} features encoded"
            + (f" ({cache['encode_seconds']:.1f} s, in {who})" if who else "")
            + f", {cache['hits']} read from the cache"
        )
    for _, row in table[table["error"].notna()].iterrows():
        console.print(f"[red]{row['name']} failed[/]: {row['error']}", highlight=False)
    console.print(f"table: {table.attrs['csv']}, {table.attrs['markdown']}")
    console.print(f"chart: {table.attrs['chart']}")
    console.print(f"runs: {folder}/NAME (reports in NAME/report)")


@shares_run_flags
def cv(
    folds: Annotated[int, typer.Option("--folds", "-k", help="Number of folds (K >= 2).")] = 5,
    out: Annotated[
        Path | None,
        typer.Option("--out", "-o", help="CV folder: OUT/fold-k runs, cv.json, cv.md."),
    ] = None,
    fusion: FusionOpt = None,
    val_fraction: Annotated[
        float, typer.Option(help="Share of each fold's training rows used for validation.")
    ] = 0.1,
    *,
    flags: dict,
) -> None:
    """K-fold cross-validation: per-fold test metrics and their mean ± std in OUT/cv.json, .md.

    Rows are dealt into K folds stratified by label (rows sharing a `group` value stay in one
    fold), deterministically from --seed; the manifest's `split` column is ignored. Fold k tests
    on fold k, validates on --val-fraction of the other rows and trains on the rest, in
    OUT/fold-k (report, no bundle). Accuracy, macro F1, macro AUROC and ECE (regression: RMSE,
    MAE, R2) are reported per fold and as mean ± sample standard deviation (ddof=1).
    """
    from modalforge.experiments.crossval import METRIC_TITLES, cross_validate, mean_pm_std

    options, folder = run_options("cv", out, fusion, flags)
    try:
        result = cross_validate(options, folds, out=folder, val_fraction=val_fraction)
    except (ValueError, KeyError, FileNotFoundError) as err:
        fail(str(err))
    names = list(result["mean"])
    table = Table(title=f"{folds}-fold cross-validation (test folds)", title_justify="left")
    for name in ("fold", "train", "val", "test", *(METRIC_TITLES.get(m, m) for m in names)):
        table.add_column(name, justify="right")
    for r in result["per_fold"]:
        counts = [str(r["rows"].get(s, 0)) for s in ("train", "val", "test")]
        table.add_row(str(r["fold"]), *counts, *(_cell(r["metrics"][m]) for m in names))
    table.add_row(
        "[bold]mean ± std[/]", "", "", "",
        *(mean_pm_std(result["mean"][m], result["std"][m]) for m in names),
    )  # fmt: skip
    console.print(table)
    console.print(f"± is the {result['std_kind']}")
    console.print(f"results: {result['json']}, {result['markdown']}")
    console.print(f"folds: {result['assignment']}; runs: {folder}/fold-k (reports in report/)")


@shares_run_flags
def ensemble(
    members: Annotated[int, typer.Option("--members", "-n", help="Number of members.")] = 5,
    by: Annotated[
        str,
        typer.Option(
            "--by",
            help="seed: same split, seeds SEED..SEED+N-1; fold: member i validates on fold i "
            "of the train+val rows and trains on the others.",
        ),
    ] = "seed",
    out: Annotated[
        Path | None,
        typer.Option(
            "--out", "-o", help="Ensemble folder: member-i/bundle, report/, ensemble.json."
        ),
    ] = None,
    fusion: FusionOpt = None,
    *,
    flags: dict,
) -> None:
    """Train N models and evaluate their averaged probabilities on the test split as one model.

    All members share the test rows (the manifest's `split` column or the seeded split of
    --seed). Each member is saved as a bundle OUT/member-i/bundle with its own report; the
    ensemble's report is OUT/report, its test predictions OUT/predictions.csv, and
    OUT/ensemble.json lists the bundles with the metrics of the ensemble and of each member.
    Load it in Python with modalforge.train.ensemble.EnsemblePredictor.load(OUT).
    """
    from modalforge.experiments.ensemble import train_ensemble

    if by not in ("seed", "fold"):
        fail("--by must be seed or fold")
    options, folder = run_options("ensemble", out, fusion, flags)
    try:
        result = train_ensemble(options, members, out=folder, by=by)  # type: ignore[arg-type]
    except (ValueError, KeyError, FileNotFoundError) as err:
        fail(str(err))
    names = [k for k, v in result["ensemble"].items() if k != "n" and isinstance(v, float)]
    table = Table(title=f"ensemble of {members} (by {by}), test split", title_justify="left")
    for name in ("model", "seed", *names):
        table.add_column(name, justify="left" if name == "model" else "right")
    for r in result["member_runs"]:
        metrics = r["metrics"] or {}
        table.add_row(
            f"member {r['member']}", str(r["seed"]), *(_cell(metrics.get(m)) for m in names)
        )
    table.add_row(
        "[bold]ensemble (mean)[/]", "", *(_cell(result["ensemble"].get(m)) for m in names)
    )
    console.print(table)
    console.print(f"bundles: {', '.join(str(folder / b) for b in result['bundles'])}")
    console.print(f"report: {result['report']}")
    console.print(f"summary: {folder / 'ensemble.json'}; predictions: {result['predictions']}")
