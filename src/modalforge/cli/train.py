"""`modalforge train`, `evaluate` and `predict`: one model, and what it says."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from modalforge.cli._common import (
    ActorsOpt,
    RayAddressOpt,
    _encoder_flags,
    _many_options,
    _pairs,
    _split_rows,
    console,
    fail,
    report_batch,
)


def _task_help() -> str:
    """``--task``'s help, from the task registry: the trainable tasks and what flags imply."""
    from modalforge.tasks import list_tasks, trainable

    implied = [f"{spec.name} with --{flag}" for spec in list_tasks() for flag in spec.implied_by]
    return (
        f"One of {', '.join(trainable())} (default: {', '.join(implied)}, else "
        "classification or regression, guessed from the label)."
    )


def train(
    manifest: Annotated[
        Path | None, typer.Option(help="Training manifest (CSV, JSONL, Parquet).")
    ] = None,
    label: Annotated[str | None, typer.Option(help="The label column.")] = None,
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="Run folder (report, bundle, logs).")
    ] = None,
    config: Annotated[
        Path | None, typer.Option(help="YAML file with any of these options; flags win.")
    ] = None,
    fusion: Annotated[
        str | None, typer.Option(help="Fusion strategy (see `modalforge models list`).")
    ] = None,
    image_encoder: Annotated[str | None, typer.Option(help="Encoder for image columns.")] = None,
    text_encoder: Annotated[str | None, typer.Option(help="Encoder for text columns.")] = None,
    audio_encoder: Annotated[str | None, typer.Option(help="Encoder for audio columns.")] = None,
    encoder: Annotated[
        list[str] | None, typer.Option(help="COLUMN=ENCODER for one column. Repeatable.")
    ] = None,
    image_size: Annotated[
        int | None, typer.Option(help="Image side for efficientnet_lite0 / cnn.")
    ] = None,
    finetune: Annotated[
        str | None, typer.Option(help="Pretrained encoders: frozen, top:N or full.")
    ] = None,
    columns: Annotated[
        str | None, typer.Option(help="Comma-separated input columns (default: all).")
    ] = None,
    task: Annotated[str | None, typer.Option(help=_task_help())] = None,
    pairs: Annotated[
        str | None,
        typer.Option(
            help="--task contrastive: columns to align, e.g. image:text,audio:text (CLIP-style "
            "towers + projections, symmetric InfoNCE; --label then only stratifies the split "
            "and is the zero-shot target)."
        ),
    ] = None,
    caption: Annotated[
        str | None,
        typer.Option(
            help="--task caption: the column of captions to learn to write for the --image "
            "column: its encoder's grid + a decoder."
        ),
    ] = None,
    image: Annotated[
        str | None, typer.Option(help="--task caption: the image column (default: image).")
    ] = None,
    decoder: Annotated[
        str | None, typer.Option(help="--task caption: transformer or gru (Show-Attend-Tell).")
    ] = None,
    evaluate_by: Annotated[
        str | None,
        typer.Option(
            help="A column whose groups get their own test accuracy beside their majority "
            "answer (VQA: qtype)."
        ),
    ] = None,
    epochs: Annotated[
        int | None, typer.Option(help="Maximum epochs (early stopping may end sooner).")
    ] = None,
    batch_size: Annotated[int | None, typer.Option(help="Batch size.")] = None,
    lr: Annotated[float | None, typer.Option(help="Learning rate of fusion + head.")] = None,
    patience: Annotated[int | None, typer.Option(help="Early-stopping patience in epochs.")] = None,
    loss: Annotated[str | None, typer.Option(help="ce | focal | mse | huber.")] = None,
    label_smoothing: Annotated[float | None, typer.Option(help="Label smoothing for ce.")] = None,
    class_weights: Annotated[str | None, typer.Option(help="none | balanced.")] = None,
    modality_dropout: Annotated[
        float | None, typer.Option(help="Drop each modality with this probability while training.")
    ] = None,
    augment: Annotated[
        bool | None,
        typer.Option(
            "--augment/--no-augment", help="Per-modality augmentation for trained encoders."
        ),
    ] = None,
    seed: Annotated[
        int | None, typer.Option(help="Seed of splits, initialization and order.")
    ] = None,
    devices: Annotated[
        str | None, typer.Option(help="Lightning devices (auto, 1, 4, ...).")
    ] = None,
    accelerator: Annotated[
        str | None, typer.Option(help="Lightning accelerator (auto, cpu, gpu).")
    ] = None,
    strategy: Annotated[
        str | None, typer.Option(help="Lightning strategy (auto, ddp, ...).")
    ] = None,
    num_nodes: Annotated[int | None, typer.Option(help="Lightning num_nodes.")] = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue from the run's last checkpoint.")
    ] = False,
) -> None:
    """Train a multimodal model, evaluate it on the test split, write the report and the bundle.

    Frozen pretrained encoders read features from an on-disk cache, so a second run (or a
    sweep) does not encode again. The resolved options are saved as RUN/run.yaml.
    """
    from modalforge.experiments.run import train_run

    flags = {
        "manifest": manifest, "label": label, "finetune": finetune, "task": task,
        "epochs": epochs, "batch_size": batch_size, "lr": lr, "patience": patience,
        "loss": loss, "label_smoothing": label_smoothing, "class_weights": class_weights,
        "modality_dropout": modality_dropout, "augment": augment, "seed": seed,
        "devices": devices, "accelerator": accelerator, "strategy": strategy,
        "num_nodes": num_nodes, "columns": columns,
        "pairs": pairs.split(",") if pairs else None, "caption": caption, "decoder": decoder,
        "evaluate_by": evaluate_by,
    }  # fmt: skip
    if image:
        flags["columns"] = image
    try:
        encoders = _encoder_flags(image_encoder, text_encoder, audio_encoder, encoder)
        # command "run": without --out or a config's `out`, the folder is runs/run as before
        options, _ = _many_options("run", out, config, fusion, encoders, image_size, **flags)
        options.resume = resume
        summary = train_run(options)
    except (ValueError, KeyError, FileNotFoundError) as err:
        fail(str(err))
    _print_summary(summary)


def _print_summary(summary: dict) -> None:
    if summary.get("rank"):
        console.print(f"rank {summary['rank']} of {summary['processes']}: trained; rank 0 writes "
                      "the report and the bundle")  # fmt: skip
        return
    head = summary.get("headline") or {}
    shown = ", ".join(f"{k} {v:.4f}" for k, v in head.items() if isinstance(v, float))
    console.print(f"[bold]run[/]: {summary['run']}")
    if shown:
        console.print(f"test: {shown}")
    h = summary.get("history", {})
    console.print(
        f"encoding {h.get('encode_seconds', 0):.1f} s (cache: "
        + ", ".join(f"{v['hits']} hits / {v['misses']} misses" for v in h.get("cache", {}).values())
        + f"), training {h.get('train_seconds', 0):.1f} s over {h.get('epochs_run', 0)} epochs"
    )
    if summary.get("report"):
        console.print(f"report: {summary['report']}")
    if summary.get("bundle"):
        console.print(f"bundle: {summary['bundle']}")


def evaluate(
    bundle: Annotated[Path, typer.Argument(help="A bundle folder (RUN/bundle).")],
    manifest: Annotated[Path, typer.Option(help="Manifest with the label column.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Report folder.")] = Path("report"),
    split: Annotated[
        str | None, typer.Option(help="Only rows whose `split` column equals this.")
    ] = None,
    by: Annotated[
        str | None,
        typer.Option(help="A column whose groups get their own accuracy (VQA: qtype)."),
    ] = None,
    baseline: Annotated[
        list[str] | None,
        typer.Option(
            help="Chat bundles: KIND=BUNDLE, a single-task model scored on the same "
            "test questions in this run (caption=runs/caption/bundle, "
            "vqa=runs/vqa/bundle, transcribe=packaged). Repeatable."
        ),
    ] = None,
) -> None:
    """Evaluate a bundle on a manifest: metrics, modality ablation, report.md/.html with plots.
    A chat bundle takes its conversations (JSONL) and is scored per question type."""
    from modalforge import tasks
    from modalforge.bundle import BundleError

    try:
        predictor = tasks.load(bundle)
        extra = {"by": by} if by else {}
        if baseline:
            extra["baselines"] = _pairs(baseline, "--baseline")
        result = predictor.evaluate(manifest, split=split, out_dir=out, **extra)
    except (BundleError, ValueError, FileNotFoundError) as err:
        fail(str(err))
    console.print(json.dumps(result["headline"], indent=2))
    console.print(f"report: {result['report']}")


def predict(
    bundle: Annotated[Path, typer.Argument(help="A bundle folder (RUN/bundle).")],
    image: Annotated[Path | None, typer.Option(help="An image file.")] = None,
    text: Annotated[str | None, typer.Option(help="A text.")] = None,
    audio: Annotated[Path | None, typer.Option(help="An audio file.")] = None,
    value: Annotated[
        list[str] | None, typer.Option(help="COLUMN=VALUE for any input column. Repeatable.")
    ] = None,
    manifest: Annotated[
        Path | None, typer.Option(help="Predict every row of this manifest.")
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option(
            "--out",
            "-o",
            help="With --manifest: write predictions. NAME.csv: one table; NAME.parquet: a "
            "folder of Parquet shards, streamed (any manifest size, bad rows reported in an "
            "error column instead of stopping the run).",
        ),
    ] = None,
    ray: Annotated[
        bool,
        typer.Option(
            "--ray",
            help="With --out NAME.parquet: score on Ray Data with a pool of engines (the "
            "running Ray, --ray-address, or a new local one).",
        ),
    ] = False,
    ray_address: RayAddressOpt = None,
    actors: ActorsOpt = None,
    batch_size: Annotated[
        int, typer.Option(help="With --out NAME.parquet: rows scored per model call.")
    ] = 64,
    id_column: Annotated[
        str | None,
        typer.Option(
            help="Column of row ids in the output (default: 'id' if present, else the row number)."
        ),
    ] = None,
    split: Annotated[
        str | None, typer.Option(help="Only rows whose `split` column equals this.")
    ] = None,
) -> None:
    """Predict with a bundle: label, class probabilities and each input's contribution.

    One sample from --image / --text / --audio (or --value COLUMN=VALUE), or every row of
    --manifest. A modality left out is treated as missing. With --out NAME.parquet the
    manifest is streamed in batches (in this process, or on Ray Data with --ray); each output
    row has the manifest row, its id, an error (null when it was scored) and the results, and
    the command ends with the count of failed rows and the first of them (exit code 0).
    """
    import pandas as pd

    from modalforge.bundle import BundleError
    from modalforge.tasks.base import TaskPredictor

    batch = out is not None and out.suffix.lower() == ".parquet"
    if (ray or actors or ray_address or id_column) and not batch:
        fail("--ray, --actors, --ray-address and --id-column write a folder of Parquet shards: "
             "give --manifest and --out NAME.parquet")  # fmt: skip
    if batch:
        if manifest is None:
            fail("--out NAME.parquet predicts a manifest: give --manifest")
        _predict_batch(bundle, manifest, out, ray=ray, ray_address=ray_address, actors=actors,
                       batch_size=batch_size, id_column=id_column, split=split)  # fmt: skip
        return
    try:
        predictor = TaskPredictor.load(bundle)
        if manifest is not None:
            rows = _split_rows(manifest, split) if split else manifest
            table = predictor.predict(rows)
        else:
            row = _pairs(value, "--value")
            for modality, given in (("image", image), ("text", text), ("audio", audio)):
                if given is None:
                    continue
                columns = [c.name for c in predictor.schema.of(modality)]  # type: ignore[union-attr]
                if not columns:
                    fail(f"the bundle has no {modality} input")
                row[columns[0]] = str(Path(given).resolve()) if modality != "text" else given
            if not row:
                fail("give at least one input: --image, --text, --audio, --value or --manifest")
            inputs = [c.name for c in predictor.schema.inputs]  # type: ignore[union-attr]
            table = predictor.predict(pd.DataFrame([{c: row.get(c) for c in inputs}]), root="/")
    except (BundleError, ValueError, FileNotFoundError, KeyError) as err:
        fail(str(err))
    if out is not None:
        from modalforge.files import atomic_path

        with atomic_path(out) as tmp:
            table.to_csv(tmp, index=False)
        console.print(f"{len(table)} predictions -> {out}")
    elif len(table) == 1 and "label" in table:
        _print_one(table.iloc[0])
    else:
        console.print(table.head(20).to_string(index=False), highlight=False)


def _predict_batch(bundle: Path, manifest: Path, out: Path, **options) -> None:
    """``predict --manifest M --out NAME.parquet [--ray]``: stream, report the failed rows."""
    from modalforge.bundle import BundleError
    from modalforge.runtime.batch import predict_manifest

    try:
        summary = predict_manifest(bundle, manifest, out, **options)
    except (BundleError, ValueError, FileNotFoundError, FileExistsError, KeyError) as err:
        fail(str(err))
    report_batch(summary, manifest, "predicted")


def _print_one(row) -> None:
    """One prediction: the label, the top classes as bars, each input's contribution."""
    from rich.markup import escape

    console.print(f"[bold]{escape(str(row['label']))}[/] ({row['confidence']:.1%})")
    probs = sorted(((k[2:], float(v)) for k, v in row.items() if k.startswith("p:")),
                   key=lambda kv: -kv[1])[:5]  # fmt: skip
    for name, p in probs:
        console.print(f"  {escape(name)[:28]:<28} {'█' * round(p * 30):<30} {p:6.1%}")
    parts = [
        (k.split(":", 1)[1], float(v)) for k, v in row.items() if k.startswith("contribution:")
    ]
    if parts:
        console.print("contribution to the predicted class (p with - p without the input):")
        for name, v in parts:
            console.print(f"  {escape(name):<12} {v:+.3f}")
