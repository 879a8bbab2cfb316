"""The ``modalforge`` command. Only this module knows about files and flags."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from modalforge import __version__

app = typer.Typer(
    help="modalforge: from a manifest of images, text and audio to a deployed multimodal model.\n\n"
    "Start with `modalforge data build emoji --out data/emoji`, then "
    "`modalforge data inspect data/emoji/manifest.csv`.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
data_app = typer.Typer(
    help="Build the built-in datasets; infer, check and split manifests (CSV, JSONL, Parquet).\n\n"
    "A manifest has one row per sample; file columns hold paths relative to the manifest's "
    "folder, and no path may leave it.",
    no_args_is_help=True,
)
app.add_typer(data_app, name="data")
models_app = typer.Typer(
    help="The encoders (per modality, pretrained or from scratch) and fusions modalforge offers.",
    no_args_is_help=True,
)
app.add_typer(models_app, name="models")
index_app = typer.Typer(
    help="Embedding indexes of a contrastive bundle: build one over a manifest's column, then "
    "`modalforge search` it by text, image or audio.",
    no_args_is_help=True,
)
app.add_typer(index_app, name="index")
console = Console()
err_console = Console(stderr=True)

SchemaOpt = Annotated[
    Path | None,
    typer.Option(
        "--schema", help="YAML schema: columns: {name: type | {type, required, classes}}."
    ),
]
ColumnOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--column",
        "-c",
        help="Declare a column as NAME=TYPE (image|text|audio|graph|tabular|label; "
        "TYPE? = optional). "
        "Repeatable; undeclared columns are inferred.",
    ),
]
LabelOpt = Annotated[
    str | None, typer.Option("--label", help="The label column (else inferred by name).")
]
BadRowOpt = Annotated[
    str,
    typer.Option("--on-bad-row", help="skip: drop bad rows and go on; fail: stop with the report."),
]


def fail(message: str, code: int = 1) -> None:
    err_console.print(f"[bold red]error:[/] {message}", highlight=False)
    raise typer.Exit(code)


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", help="Print the version and exit.")] = False,
) -> None:
    if version:
        console.print(f"modalforge {__version__}")
        raise typer.Exit()


@app.command()
def version() -> None:
    """Print modalforge's version and the versions of its main dependencies."""
    import importlib.metadata as md

    console.print(f"modalforge {__version__}")
    for name in ("torch", "transformers", "lightning", "onnxruntime", "fastapi"):
        try:
            console.print(f"  {name} {md.version(name)}")
        except md.PackageNotFoundError:
            console.print(f"  {name} (not installed)")


def _load(manifest: Path, schema_path: Path | None, columns: list[str] | None, label: str | None):
    """Read a manifest and resolve its schema: declared (YAML, --column) first, rest inferred."""
    from modalforge.data.infer import infer_schema
    from modalforge.data.manifest import ManifestError, read_manifest
    from modalforge.schema import Schema, SchemaError

    try:
        m = read_manifest(manifest)
        declared = Schema.from_yaml(schema_path) if schema_path else Schema()
        for column in Schema.from_specs(columns or []):
            declared = declared.replace(column)
        schema = infer_schema(m, label=label, declared=declared)
    except (ManifestError, SchemaError, ValueError) as err:
        fail(str(err))
    if not len(schema):
        fail(f"{manifest}: no column could be typed; declare them with --column or --schema")
    return m, schema


def _schema_table(schema) -> Table:
    table = Table(title="schema", title_justify="left")
    for name in ("column", "type", "required"):
        table.add_column(name)
    for c in schema:
        table.add_row(c.name, c.modality.value, "yes" if c.required else "optional")
    return table


@data_app.command("list")
def data_list() -> None:
    """List the built-in datasets."""
    from modalforge.data.catalog import list_datasets

    for info in list_datasets():
        console.print(f"[bold]{info.name}[/]  {info.description}")


@data_app.command("build")
def data_build(
    name: Annotated[str, typer.Argument(help="Dataset name (see `modalforge data list`).")],
    out: Annotated[
        Path, typer.Option("--out", "-o", help="Folder to write the manifest and files to.")
    ],
    seed: Annotated[int, typer.Option(help="Seed for voices, noise and the split column.")] = 0,
    include_flags: Annotated[
        bool, typer.Option("--include-flags", help="emoji: keep the 270 Flags emoji.")
    ] = False,
    variants: Annotated[
        bool, typer.Option("--variants", help="emoji: add the skin-tone variants.")
    ] = False,
    workers: Annotated[
        int | None, typer.Option(help="Parallel workers (default: CPU count).")
    ] = None,
) -> None:
    """Build a built-in dataset from registry packages; a re-run with the same options does nothing.

    emoji: Noto emoji images (npm emoji-datasource-google), names as text, names spoken by
    espeak-ng; labels category and subcategory. avdigits: occluded scikit-learn digit images
    paired with spoken digits in babble, where neither modality alone is enough.
    """
    from modalforge.data.catalog import build_dataset

    options: dict = {"seed": seed, "workers": workers}
    if name == "emoji":
        options.update(include_flags=include_flags, variants=variants)
    elif include_flags or variants:
        fail("--include-flags and --variants apply to the emoji dataset only")
    try:
        result = build_dataset(name, out, **options)
    except KeyError as err:
        fail(str(err.args[0]))
    except RuntimeError as err:
        fail(str(err))
    if result.reused:
        console.print(f"{result.manifest}: up to date ({result.n_rows} rows), nothing to do")
    else:
        console.print(
            f"built {name}: {result.n_rows} rows in {result.seconds:.1f} s -> {result.manifest}"
        )


@data_app.command("vqa")
def data_vqa(
    manifest: Annotated[Path, typer.Argument(help="A manifest with images and their metadata.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="The question manifest to write (CSV).")],
    image: Annotated[str, typer.Option(help="The image column.")] = "image",
    name: Annotated[str, typer.Option(help="The column of names (yes/no questions).")] = "text",
    category: Annotated[str, typer.Option(help="The category column.")] = "category",
    subcategory: Annotated[str, typer.Option(help="The subcategory column.")] = "subcategory",
    min_count: Annotated[
        int, typer.Option(help="A yes/no word ends at least this many names.")
    ] = 8,
    seed: Annotated[int, typer.Option(help="Seed of the yes/no words drawn.")] = 0,
) -> None:
    """Question-answer pairs from the metadata: the category and subcategory of each image, and
    yes/no questions ("is this a face?") answered by its name; each image's split is kept."""
    import os

    from modalforge.data.manifest import ManifestError, read_manifest
    from modalforge.vqa import vqa_manifest

    try:
        source = read_manifest(manifest)
        frame = vqa_manifest(source.frame, image, name, category, subcategory, min_count, seed)
    except (ManifestError, ValueError) as err:
        fail(str(err))
    # image paths relative to the new manifest's folder
    folder = out.resolve().parent
    frame["image"] = [os.path.relpath(source.root / p, folder) if not Path(p).is_absolute()
                      else p for p in frame["image"]]  # fmt: skip
    out.parent.mkdir(parents=True, exist_ok=True)
    frame.to_csv(out, index=False)
    counts = frame["qtype"].value_counts().to_dict()
    console.print(f"{out}: {len(frame)} questions ({counts}), "
                  f"{frame['answer'].nunique()} answers")  # fmt: skip


@data_app.command("schema")
def data_schema(
    manifest: Annotated[Path, typer.Argument(help="CSV, JSONL or Parquet manifest.")],
    schema: SchemaOpt = None,
    column: ColumnOpt = None,
    label: LabelOpt = None,
) -> None:
    """Print the manifest's schema (declared + inferred) as YAML, to edit and pass to --schema."""
    _, resolved = _load(manifest, schema, column, label)
    sys.stdout.write(resolved.to_yaml())


@data_app.command("validate")
def data_validate(
    manifest: Annotated[Path, typer.Argument(help="CSV, JSONL or Parquet manifest.")],
    schema: SchemaOpt = None,
    column: ColumnOpt = None,
    label: LabelOpt = None,
    on_bad_row: BadRowOpt = "fail",
    report: Annotated[
        Path | None, typer.Option(help="Write every problem to this .json or .csv file.")
    ] = None,
    clean: Annotated[
        Path | None,
        typer.Option(help="With --on-bad-row skip: write the good rows to this manifest."),
    ] = None,
) -> None:
    """Decode every value of every row; list each bad row (missing or undecodable file, path
    outside the root, empty text, unknown label) with counts. Exit 1 under `fail` if any."""
    from modalforge.data.manifest import write_manifest
    from modalforge.data.validate import BadRowsError, apply_policy, validate_manifest

    if on_bad_row not in ("skip", "fail"):
        fail("--on-bad-row must be skip or fail")
    m, resolved = _load(manifest, schema, column, label)
    result = validate_manifest(m, resolved, progress=True)
    for line in result.lines(limit=50):
        console.print(line, highlight=False, markup=False)
    if report:
        result.write(report)
    console.print(result.summary())
    try:
        good = apply_policy(m, result, on_bad_row)  # type: ignore[arg-type]
    except BadRowsError:
        raise typer.Exit(1) from None
    if clean:
        if clean.resolve().parent != m.root.resolve():
            fail(f"--clean must go into the manifest's folder {m.root} (its paths are relative)")
        write_manifest(good.frame, clean)
        console.print(f"{len(good)} good rows -> {clean}")


@data_app.command("inspect")
def data_inspect(
    manifest: Annotated[Path, typer.Argument(help="CSV, JSONL or Parquet manifest.")],
    schema: SchemaOpt = None,
    column: ColumnOpt = None,
    label: LabelOpt = None,
    out: Annotated[
        Path | None,
        typer.Option(
            "--out", "-o", help="Folder for contact_sheet.png, inspection.json, problems.csv."
        ),
    ] = None,
    samples: Annotated[int, typer.Option(help="Images on the contact sheet.")] = 24,
) -> None:
    """Schema, rows per label and per modality, bad rows, and a PNG contact sheet of samples."""
    from modalforge.data.inspect import inspect_manifest

    m, resolved = _load(manifest, schema, column, label)
    out = out or manifest.parent / "inspect"
    result = inspect_manifest(m, resolved, out_dir=out, samples=samples, progress=True)
    console.print(f"[bold]{manifest}[/]: {result.n_rows} rows")
    console.print(_schema_table(resolved))
    table = Table(title="values per column", title_justify="left")
    for name in ("column", "type", "usable", "missing / bad"):
        table.add_column(name)
    for c in resolved:
        n = result.present.get(c.name, 0)
        table.add_row(c.name, c.modality.value, str(n), str(result.n_rows - n))
    console.print(table)
    for label_col, counts in result.label_counts.items():
        shown = list(counts.items())
        text = ", ".join(f"{k}: {v}" for k, v in shown[:12])
        more = f" (+{len(shown) - 12} more classes)" if len(shown) > 12 else ""
        console.print(f"[bold]{label_col}[/] ({len(shown)} classes): {text}{more}", highlight=False)
    console.print(f"validation: {result.report.summary()}")
    for line in result.report.lines(limit=10):
        console.print("  " + line, highlight=False, markup=False)
    if result.contact_sheet:
        console.print(f"contact sheet: {result.contact_sheet}")
    console.print(f"details: {out / 'inspection.json'}, {out / 'problems.csv'}")


@data_app.command("split")
def data_split(
    manifest: Annotated[Path, typer.Argument(help="CSV, JSONL or Parquet manifest.")],
    label: Annotated[str, typer.Option("--label", help="Stratify on this column.")],
    out: Annotated[
        Path, typer.Option("--out", "-o", help="Manifest to write, with a `split` column.")
    ],
    group: Annotated[
        str | None, typer.Option(help="Rows sharing this column's value stay in one split.")
    ] = None,
    fractions: Annotated[str, typer.Option(help="train,val,test fractions.")] = "0.8,0.1,0.1",
    seed: Annotated[int, typer.Option(help="Seed of the assignment.")] = 0,
) -> None:
    """Add a deterministic, stratified (and optionally grouped) train/val/test `split` column."""
    from modalforge.data.manifest import ManifestError, read_manifest, write_manifest
    from modalforge.data.split import stratified_split

    try:
        m = read_manifest(manifest)
        parts = tuple(float(f) for f in fractions.split(","))
        for col in filter(None, (label, group)):
            if col not in m.columns:
                raise ValueError(f"column {col!r} not in the manifest")
        groups = m.frame[group].astype(str).tolist() if group else None
        m.frame["split"] = stratified_split(
            m.frame[label].astype(str).tolist(), parts, seed, groups
        )
    except (ManifestError, ValueError) as err:
        fail(str(err))
    write_manifest(m.frame, out)
    counts = m.frame["split"].value_counts().to_dict()
    console.print(
        f"{out}: " + ", ".join(f"{k} {counts.get(k, 0)}" for k in ("train", "val", "test"))
    )


def _fusion_names() -> list[str]:
    from modalforge.fusion import list_fusions

    return [f.name for f in list_fusions()]


def _pairs(values: list[str] | None, what: str) -> dict[str, str]:
    out = {}
    for item in values or []:
        key, sep, value = item.partition("=")
        if not sep or not key or not value:
            fail(f"{what} {item!r}: expected NAME=VALUE")
        out[key.strip()] = value.strip()
    return out


@app.command()
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
    task: Annotated[
        str | None,
        typer.Option(help="classification, regression (default: guessed), contrastive or caption."),
    ] = None,
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
    from modalforge.train.run import train_run

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
    if pairs and task is None:
        flags["task"] = "contrastive"
    if caption and task is None:
        flags["task"] = "caption"
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


@app.command()
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
) -> None:
    """Evaluate a bundle on a manifest: metrics, modality ablation, report.md/.html with plots."""
    from modalforge.bundle import BundleError
    from modalforge.predictor import MultimodalPredictor

    try:
        predictor = MultimodalPredictor.load(bundle)
        result = predictor.evaluate(manifest, split=split, out_dir=out,
                                    **({"by": by} if by else {}))  # fmt: skip
    except (BundleError, ValueError, FileNotFoundError) as err:
        fail(str(err))
    console.print(json.dumps(result["headline"], indent=2))
    console.print(f"report: {result['report']}")


@app.command()
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
        Path | None, typer.Option("--out", "-o", help="With --manifest: write predictions (CSV).")
    ] = None,
) -> None:
    """Predict with a bundle: label, class probabilities and each input's contribution.

    One sample from --image / --text / --audio (or --value COLUMN=VALUE), or every row of
    --manifest. A modality left out is treated as missing.
    """
    import pandas as pd

    from modalforge.bundle import BundleError
    from modalforge.predictor import MultimodalPredictor

    try:
        predictor = MultimodalPredictor.load(bundle)
        if manifest is not None:
            table = predictor.predict(manifest)
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
        table.to_csv(out, index=False)
        console.print(f"{len(table)} predictions -> {out}")
    elif len(table) == 1 and "label" in table:
        _print_one(table.iloc[0])
    else:
        console.print(table.head(20).to_string(index=False), highlight=False)


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


# ---------------------------------------------------------------- sweep, cv, ensemble
# the flags of `train` that make sense for many runs at once (no --resume, no ddp)
ManyManifestOpt = Annotated[
    Path | None, typer.Option("--manifest", help="Training manifest (CSV, JSONL, Parquet).")
]
ManyLabelOpt = Annotated[str | None, typer.Option("--label", help="The label column.")]
ManyConfigOpt = Annotated[
    Path | None,
    typer.Option("--config", help="YAML file with any `train` option (as run.yaml); flags win."),
]
ManyImageEncoderOpt = Annotated[
    str | None, typer.Option("--image-encoder", help="Encoder for image columns.")
]
ManyTextEncoderOpt = Annotated[
    str | None, typer.Option("--text-encoder", help="Encoder for text columns.")
]
ManyAudioEncoderOpt = Annotated[
    str | None, typer.Option("--audio-encoder", help="Encoder for audio columns.")
]
ManyEncoderOpt = Annotated[
    list[str] | None,
    typer.Option("--encoder", help="COLUMN=ENCODER for one column. Repeatable."),
]
ManyImageSizeOpt = Annotated[
    int | None, typer.Option("--image-size", help="Image side for efficientnet_lite0 / cnn.")
]
ManyFinetuneOpt = Annotated[
    str | None, typer.Option("--finetune", help="Pretrained encoders: frozen, top:N or full.")
]
ManyColumnsOpt = Annotated[
    str | None, typer.Option("--columns", help="Comma-separated input columns (default: all).")
]
ManyTaskOpt = Annotated[
    str | None,
    typer.Option("--task", help="classification or regression (default: guessed)."),
]
ManyEpochsOpt = Annotated[
    int | None,
    typer.Option("--epochs", help="Maximum epochs per run (early stopping may end sooner)."),
]
ManyBatchSizeOpt = Annotated[int | None, typer.Option("--batch-size", help="Batch size.")]
ManyLrOpt = Annotated[float | None, typer.Option("--lr", help="Learning rate of fusion + head.")]
ManyPatienceOpt = Annotated[
    int | None, typer.Option("--patience", help="Early-stopping patience in epochs.")
]
ManyLossOpt = Annotated[str | None, typer.Option("--loss", help="ce | focal | mse | huber.")]
ManyClassWeightsOpt = Annotated[
    str | None, typer.Option("--class-weights", help="none | balanced.")
]
ManyAugmentOpt = Annotated[
    bool | None,
    typer.Option("--augment/--no-augment", help="Per-modality augmentation for trained encoders."),
]
ManySeedOpt = Annotated[
    int | None,
    typer.Option("--seed", help="Seed of the split (or folds), initialization and order."),
]
ManyDevicesOpt = Annotated[
    str | None, typer.Option("--devices", help="Lightning devices (auto, 1, ...).")
]
ManyAcceleratorOpt = Annotated[
    str | None, typer.Option("--accelerator", help="Lightning accelerator (auto, cpu, gpu).")
]


def _many_options(command: str, out: Path | None, config: Path | None, fusion: str | None,
                  encoders: dict[str, str], image_size: int | None, **flags):  # fmt: skip
    """RunOptions from the flags (and --config) as `train` reads them, and the output folder:
    --out, else the config's `out`, else runs/COMMAND."""
    from modalforge.train.run import RunOptions

    flags = {**flags, "fusion": fusion}
    if flags.get("columns"):
        flags["columns"] = flags["columns"].split(",")
    if flags.get("manifest") is not None:
        flags["manifest"] = str(flags["manifest"])
    if config:
        options = RunOptions.from_yaml(config, **flags)
    else:
        if not flags.get("manifest") or not (
            flags.get("label") or flags.get("pairs") or flags.get("caption")
        ):
            fail("--manifest and --label (or --pairs, or --caption) are required (or give them "
                 "in --config)")  # fmt: skip
        options = RunOptions(**{k: v for k, v in flags.items() if v is not None})
    if encoders:
        options.encoders = {**options.encoders, **encoders}
    if image_size:
        image_keys = [k for k, v in options.encoders.items() if v in ("efficientnet_lite0", "cnn")]
        for key in ("image", *image_keys):
            options.encoder_kwargs.setdefault(key, {})["image_size"] = image_size
        options.encoders.setdefault("image", "efficientnet_lite0")
    if fusion is not None and fusion not in _fusion_names():
        fail(f"unknown fusion {fusion!r} (choose from {', '.join(_fusion_names())})")
    if out is None:
        default = RunOptions.__dataclass_fields__["out"].default
        out = Path(options.out) if options.out != default else Path("runs") / command
    options.out = str(out)
    return options, out


def _encoder_flags(image: str | None, text: str | None, audio: str | None, encoder) -> dict:
    chosen = {k: v for k, v in {"image": image, "text": text, "audio": audio}.items() if v}
    chosen.update(_pairs(encoder, "--encoder"))
    return chosen


def _cell(value, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and value != value):
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


@app.command()
def sweep(
    manifest: ManyManifestOpt = None,
    label: ManyLabelOpt = None,
    out: Annotated[
        Path | None,
        typer.Option("--out", "-o", help="Sweep folder: one run folder per row + the table."),
    ] = None,
    config: ManyConfigOpt = None,
    fusions: Annotated[
        str | None,
        typer.Option(help="Comma-separated fusions to compare (default: every fusion)."),
    ] = None,
    no_single: Annotated[
        bool,
        typer.Option("--no-single", help="Skip the runs on each input column alone."),
    ] = False,
    image_encoder: ManyImageEncoderOpt = None,
    text_encoder: ManyTextEncoderOpt = None,
    audio_encoder: ManyAudioEncoderOpt = None,
    encoder: ManyEncoderOpt = None,
    image_size: ManyImageSizeOpt = None,
    finetune: ManyFinetuneOpt = None,
    columns: ManyColumnsOpt = None,
    task: ManyTaskOpt = None,
    epochs: ManyEpochsOpt = None,
    batch_size: ManyBatchSizeOpt = None,
    lr: ManyLrOpt = None,
    patience: ManyPatienceOpt = None,
    loss: ManyLossOpt = None,
    class_weights: ManyClassWeightsOpt = None,
    augment: ManyAugmentOpt = None,
    seed: ManySeedOpt = None,
    devices: ManyDevicesOpt = None,
    accelerator: ManyAcceleratorOpt = None,
) -> None:
    """Compare fusions, and each input column alone, on one split: OUT/sweep.csv, .md, .png.

    Trains every fusion (or those of --fusions) over all input columns, and each input column
    alone with concat (unless --no-single), on the same train/val/test split: the manifest's
    `split` column or the seeded split of --seed. Each run gets a folder OUT/NAME with its
    report but no bundle. The table has test accuracy, macro F1, macro AUROC, parameters (all
    and trainable), training and encoding time, latency per sample and epochs, best first.
    Frozen encoders read the feature cache, so their features are encoded once for the sweep.
    """
    from modalforge.train.sweep import sweep as run_sweep

    options, folder = _many_options(
        "sweep", out, config, None, _encoder_flags(image_encoder, text_encoder, audio_encoder,
        encoder), image_size, manifest=manifest, label=label, finetune=finetune, task=task,
        epochs=epochs, batch_size=batch_size, lr=lr, patience=patience, loss=loss,
        class_weights=class_weights, augment=augment, seed=seed, devices=devices,
        accelerator=accelerator, columns=columns,
    )  # fmt: skip
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


@app.command()
def cv(
    folds: Annotated[int, typer.Option("--folds", "-k", help="Number of folds (K >= 2).")] = 5,
    manifest: ManyManifestOpt = None,
    label: ManyLabelOpt = None,
    out: Annotated[
        Path | None,
        typer.Option("--out", "-o", help="CV folder: OUT/fold-k runs, cv.json, cv.md."),
    ] = None,
    config: ManyConfigOpt = None,
    fusion: Annotated[
        str | None, typer.Option(help="Fusion strategy (see `modalforge models list`).")
    ] = None,
    val_fraction: Annotated[
        float, typer.Option(help="Share of each fold's training rows used for validation.")
    ] = 0.1,
    image_encoder: ManyImageEncoderOpt = None,
    text_encoder: ManyTextEncoderOpt = None,
    audio_encoder: ManyAudioEncoderOpt = None,
    encoder: ManyEncoderOpt = None,
    image_size: ManyImageSizeOpt = None,
    finetune: ManyFinetuneOpt = None,
    columns: ManyColumnsOpt = None,
    task: ManyTaskOpt = None,
    epochs: ManyEpochsOpt = None,
    batch_size: ManyBatchSizeOpt = None,
    lr: ManyLrOpt = None,
    patience: ManyPatienceOpt = None,
    loss: ManyLossOpt = None,
    class_weights: ManyClassWeightsOpt = None,
    augment: ManyAugmentOpt = None,
    seed: ManySeedOpt = None,
    devices: ManyDevicesOpt = None,
    accelerator: ManyAcceleratorOpt = None,
) -> None:
    """K-fold cross-validation: per-fold test metrics and their mean ± std in OUT/cv.json, .md.

    Rows are dealt into K folds stratified by label (rows sharing a `group` value stay in one
    fold), deterministically from --seed; the manifest's `split` column is ignored. Fold k tests
    on fold k, validates on --val-fraction of the other rows and trains on the rest, in
    OUT/fold-k (report, no bundle). Accuracy, macro F1, macro AUROC and ECE (regression: RMSE,
    MAE, R2) are reported per fold and as mean ± sample standard deviation (ddof=1).
    """
    from modalforge.train.crossval import METRIC_TITLES, cross_validate, mean_pm_std

    options, folder = _many_options(
        "cv", out, config, fusion, _encoder_flags(image_encoder, text_encoder, audio_encoder,
        encoder), image_size, manifest=manifest, label=label, finetune=finetune, task=task,
        epochs=epochs, batch_size=batch_size, lr=lr, patience=patience, loss=loss,
        class_weights=class_weights, augment=augment, seed=seed, devices=devices,
        accelerator=accelerator, columns=columns,
    )  # fmt: skip
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


@app.command()
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
    manifest: ManyManifestOpt = None,
    label: ManyLabelOpt = None,
    out: Annotated[
        Path | None,
        typer.Option(
            "--out", "-o", help="Ensemble folder: member-i/bundle, report/, ensemble.json."
        ),
    ] = None,
    config: ManyConfigOpt = None,
    fusion: Annotated[
        str | None, typer.Option(help="Fusion strategy (see `modalforge models list`).")
    ] = None,
    image_encoder: ManyImageEncoderOpt = None,
    text_encoder: ManyTextEncoderOpt = None,
    audio_encoder: ManyAudioEncoderOpt = None,
    encoder: ManyEncoderOpt = None,
    image_size: ManyImageSizeOpt = None,
    finetune: ManyFinetuneOpt = None,
    columns: ManyColumnsOpt = None,
    task: ManyTaskOpt = None,
    epochs: ManyEpochsOpt = None,
    batch_size: ManyBatchSizeOpt = None,
    lr: ManyLrOpt = None,
    patience: ManyPatienceOpt = None,
    loss: ManyLossOpt = None,
    class_weights: ManyClassWeightsOpt = None,
    augment: ManyAugmentOpt = None,
    seed: ManySeedOpt = None,
    devices: ManyDevicesOpt = None,
    accelerator: ManyAcceleratorOpt = None,
) -> None:
    """Train N models and evaluate their averaged probabilities on the test split as one model.

    All members share the test rows (the manifest's `split` column or the seeded split of
    --seed). Each member is saved as a bundle OUT/member-i/bundle with its own report; the
    ensemble's report is OUT/report, its test predictions OUT/predictions.csv, and
    OUT/ensemble.json lists the bundles with the metrics of the ensemble and of each member.
    Load it in Python with modalforge.train.ensemble.EnsemblePredictor.load(OUT).
    """
    from modalforge.train.ensemble import train_ensemble

    if by not in ("seed", "fold"):
        fail("--by must be seed or fold")
    options, folder = _many_options(
        "ensemble", out, config, fusion, _encoder_flags(image_encoder, text_encoder,
        audio_encoder, encoder), image_size, manifest=manifest, label=label, finetune=finetune,
        task=task, epochs=epochs, batch_size=batch_size, lr=lr, patience=patience, loss=loss,
        class_weights=class_weights, augment=augment, seed=seed, devices=devices,
        accelerator=accelerator, columns=columns,
    )  # fmt: skip
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


# the output sizes of the packaged encoders: what fusion parameter counts are quoted at
REFERENCE_FUSION_DIMS = {"audio": 384, "image": 1280, "text": 384}


@models_app.command("list")
def models_list(
    count: Annotated[
        bool,
        typer.Option(
            "--count/--no-count",
            help="Count parameters (builds each model; pretrained ones load their weights).",
        ),
    ] = True,
) -> None:
    """Every encoder and fusion, with its parameter count and a line on what it is for.

    From-scratch encoders are counted at their reference size (e.g. a 10,000-word vocabulary);
    fusions at the packaged encoders' output sizes (audio 384, image 1280, text 384) -> 256.
    """
    from rich.markup import escape

    from modalforge.encoders import create_encoder, list_encoders
    from modalforge.fusion import create_fusion, list_fusions

    def params(build) -> str:
        if not count:
            return "-"
        try:
            module = build()
        except (ImportError, RuntimeError, FileNotFoundError) as err:
            return f"n/a ({str(err).splitlines()[0][:40]})"
        return f"{sum(p.numel() for p in module.parameters()) / 1e6:.2f} M"

    table = Table(title="encoders", title_justify="left")
    for name in ("name", "modality", "kind", "params", "what it is for"):
        table.add_column(name)
    for info in list_encoders():
        if info.name.startswith("hf_"):  # needs a folder: nothing to count
            n = "-"
        else:
            n = params(lambda info=info: create_encoder(info.name, **info.reference))
        kind = "pretrained" if info.pretrained else "from scratch"
        table.add_row(info.name, info.modality.value, kind, n, escape(info.description))
    console.print(table)
    table = Table(title="fusions (audio 384, image 1280, text 384 -> 256)", title_justify="left")
    for name in ("name", "params", "what it is for"):
        table.add_column(name)
    for info in list_fusions():
        n = params(lambda info=info: create_fusion(info.name, REFERENCE_FUSION_DIMS, 256))
        table.add_row(info.name, n, escape(info.description))
    console.print(table)


def _split_rows(manifest: Path, split: str | None):
    """The manifest's rows whose ``split`` column equals ``split`` (all rows for None / '')."""
    from modalforge.data.manifest import read_manifest

    rows = read_manifest(manifest)
    if not split:
        return rows
    if "split" not in rows.frame:
        fail(f"--split {split}: {manifest} has no split column (pass --split '')")
    return rows.subset([i for i, v in enumerate(rows.frame["split"]) if str(v) == split])


@app.command()
def export(
    bundle: Annotated[Path, typer.Argument(help="A bundle folder (RUN/bundle).")],
    manifest: Annotated[
        Path,
        typer.Option(
            help="Held-out rows to check the variant on (with the bundle's inputs and, "
            "for the metric deltas, its label column)."
        ),
    ],
    format: Annotated[str, typer.Option("--format", help="onnx (the only one so far).")] = "onnx",
    split: Annotated[
        str | None, typer.Option(help="Only rows whose split column is this ('' = all rows).")
    ] = "test",
    name: Annotated[str | None, typer.Option(help="Variant name (default: the format).")] = None,
    max_rows: Annotated[int, typer.Option(help="Check at most this many rows.")] = 2000,
    overwrite: Annotated[bool, typer.Option(help="Replace a variant of the same name.")] = False,
    quantize: Annotated[
        str | None,
        typer.Option(
            help="int8 (per encoder, the fastest of dynamic / static QDQ / static "
            "weight-products-only that keeps its features), int8-dynamic, int8-static. "
            "Gate: macro-F1 may drop at most 1 point."
        ),
    ] = None,
    calibration: Annotated[
        Path | None,
        typer.Option(
            help="Rows to calibrate static int8 on (default: --manifest's train "
            "split, else its checked rows)."
        ),
    ] = None,
    prune: Annotated[
        float | None,
        typer.Option(
            help="Instead of ONNX: magnitude-prune this share (0-1) of each encoder's and the "
            "fusion's weights, fine-tune on --manifest's train/val rows, add variant 'pruned' "
            "(PyTorch weights). Gate: macro-F1 may drop at most 1 point."
        ),
    ] = None,
    structured: Annotated[
        bool, typer.Option(help="With --prune: zero whole output channels (L2) per layer.")
    ] = False,
    finetune_epochs: Annotated[
        int, typer.Option(help="With --prune: epochs of fine-tuning with the zeros kept.")
    ] = 3,
    distill_into: Annotated[
        Path | None,
        typer.Option(
            help="Instead of ONNX: train the student this run config (train's YAML) "
            "describes on --manifest's train/val rows against the bundle's soft targets, add "
            "variant 'distilled'. Gate: macro-F1 may drop at most 5 points."
        ),
    ] = None,
    temperature: Annotated[float, typer.Option(help="With --distill-into: softmax T.")] = 2.0,
    alpha: Annotated[
        float, typer.Option(help="With --distill-into: weight of the soft-target loss.")
    ] = 0.5,
    max_f1_drop: Annotated[
        float | None,
        typer.Option(help="Override the gate: macro-F1 points (0.01 = 1) the variant may lose."),
    ] = None,
) -> None:
    """Add a checked variant to a bundle: ONNX (one graph per encoder + the fusion head,
    presence masks as inputs, dynamic batch; --quantize for int8), a pruned copy (--prune) or a
    distilled student (--distill-into). Every variant is compared with the PyTorch model on
    held-out rows (--manifest's --split rows); the command fails, adding nothing, when an fp32
    variant's predictions agree on fewer than 99.9 % of them, or an int8 or pruned variant
    loses more than 1 point of macro-F1 (a distilled one 5). Serve any variant with
    `modalforge serve BUNDLE --variant NAME`.
    """
    from modalforge.bundle import BundleError
    from modalforge.data.manifest import read_manifest
    from modalforge.export import ParityGateError, export_bundle
    from modalforge.export.compress import distill_bundle, prune_bundle
    from modalforge.export.parity import GATES, Gate

    if format != "onnx":
        fail(f"unknown --format {format!r}: onnx is the one export format so far")
    modes = [o for o, v in (("--quantize", quantize), ("--prune", prune),
                            ("--distill-into", distill_into)) if v is not None]  # fmt: skip
    if len(modes) > 1:
        fail(f"{' and '.join(modes)}: one kind of variant per export")
    kind = "int8" if quantize else "pruned" if prune is not None else (
        "distilled" if distill_into else "fp32")  # fmt: skip
    variant_name = name or {"fp32": format}.get(kind, kind)
    rule = None if max_f1_drop is None else Gate(max_f1_drop=max_f1_drop)
    if rule is None and kind != "fp32":
        rule = GATES[kind]
    try:
        rows = _split_rows(manifest, split)
        rows = rows.subset(range(min(max_rows, len(rows))))
        if len(rows) == 0:
            fail("no rows to check the variant on")
        meta = json.loads((bundle / "modalforge.json").read_text())
        with console.status(f"exporting {bundle} ({variant_name}), checking {len(rows)} rows ..."):
            if prune is not None:
                info = prune_bundle(bundle, read_manifest(manifest), rows, prune, structured,
                                    finetune_epochs, name=variant_name, rule=rule,
                                    overwrite=overwrite)  # fmt: skip
            elif distill_into is not None:
                info = distill_bundle(bundle, distill_into, read_manifest(manifest), rows,
                                      temperature, alpha, name=variant_name, rule=rule,
                                      overwrite=overwrite)  # fmt: skip
            else:
                calib = None
                if quantize:
                    calib = (read_manifest(calibration) if calibration
                             else _split_rows(manifest, "train"))  # fmt: skip
                info = export_bundle(
                    bundle, rows, label=meta.get("label_column"), name=variant_name,
                    rule=rule, overwrite=overwrite, quantize=quantize, calibration=calib,
                )  # fmt: skip
    except ParityGateError as err:
        for key, value in err.result.items():
            err_console.print(f"  {key}: {value}")
        fail(str(err))
    except (BundleError, ValueError, FileNotFoundError) as err:
        fail(str(err))
    parity = info["parity"]
    console.print(f"variant [bold]{variant_name}[/] added to {bundle} "
                  f"({info['export_seconds']} s)")  # fmt: skip
    if "sparsity" in info:
        console.print(f"  sparsity: {info['sparsity']['model']['sparsity']:.3f} of all weights; "
                      f"fine-tune {info['finetune']}")  # fmt: skip
    if "params" in info:
        console.print(f"  parameters: teacher {info['params']['teacher']:,}, "
                      f"student {info['params']['student']:,}")  # fmt: skip
    for key in (
        "rows",
        "agreement",
        "max_abs_logit_diff",
        "reference_f1_macro",
        "variant_f1_macro",
    ):
        if key in parity:
            console.print(f"  {key}: {parity[key]}")


@app.command()
def bench(
    bundle: Annotated[Path, typer.Argument(help="A bundle folder (RUN/bundle).")],
    manifest: Annotated[Path, typer.Option(help="Rows to measure and check on.")],
    split: Annotated[
        str | None, typer.Option(help="Only rows whose split column is this ('' = all rows).")
    ] = "test",
    variant: Annotated[
        list[str] | None, typer.Option(help="Variants to measure (default: all). Repeatable.")
    ] = None,
    rows: Annotated[int, typer.Option(help="Rows to time (parity uses all selected rows).")] = 64,
    out: Annotated[Path, typer.Option(help="Folder for bench.json and bench.png.")] = Path("bench"),
) -> None:
    """Measure every variant of a bundle: size, latency p50/p99 at batch 1 and 32 (end to end
    and model only), throughput, and agreement / accuracy / macro-F1 against PyTorch."""
    import torch

    from modalforge.bundle import BundleError
    from modalforge.export.bench import bench_bundle, plot

    torch.set_num_threads(max(1, len(__import__("os").sched_getaffinity(0))))
    try:
        selected = _split_rows(manifest, split)
        meta = json.loads((bundle / "modalforge.json").read_text())
        with console.status(f"measuring {bundle} on {len(selected)} rows ..."):
            result = bench_bundle(bundle, selected, meta.get("label_column"), variant, rows)
    except (BundleError, ValueError, FileNotFoundError) as err:
        fail(str(err))
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(result, indent=2))
    plot(result, out / "bench.png")
    table = Table(title=f"{bundle} ({result['rows']} rows timed)", title_justify="left")
    for col in ("variant", "MB", "b1 p50/p99 ms", "b1 model ms", "b32 p50 ms", "b32 samples/s",
                "speed-up b1 / b32", "agreement", "macro-F1"):  # fmt: skip
        table.add_column(col)
    for r in result["variants"]:
        b1, b32, parity = r["batch1"], r["batch32"], r["parity"]
        table.add_row(
            r["variant"], f"{r['size_mb']:.1f}",
            f"{b1['end_to_end']['p50_ms']:.1f} / {b1['end_to_end']['p99_ms']:.1f}",
            f"{b1['model_only']['p50_ms']:.1f}", f"{b32['end_to_end']['p50_ms']:.0f}",
            f"{b32['end_to_end']['samples_per_s']:.0f}",
            f"{b1.get('speedup_vs_pytorch', '-')}x / {b32.get('speedup_vs_pytorch', '-')}x",
            f"{parity.get('agreement', float('nan')):.4f}",
            f"{parity.get('variant_f1_macro', float('nan')):.4f}",
        )  # fmt: skip
    console.print(table)
    console.print(f"-> {out / 'bench.json'}, {out / 'bench.png'}")


@app.command()
def serve(
    bundle: Annotated[Path, typer.Argument(help="A bundle folder (RUN/bundle).")],
    host: Annotated[
        str, typer.Option(help="Address to listen on (0.0.0.0: every interface).")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8000,
    workers: Annotated[
        int,
        typer.Option(help="Inference threads (the CPU's torch threads are split between them)."),
    ] = 1,
    max_batch: Annotated[int, typer.Option(help="Most samples per model call.")] = 32,
    batch_timeout_ms: Annotated[
        float,
        typer.Option(
            help="Longest a batch waits for requests that are still being decoded (a lone "
            "request never waits)."
        ),
    ] = 5.0,
    max_queue: Annotated[
        int, typer.Option(help="Requests admitted at once; more are answered 429 + Retry-After.")
    ] = 256,
    api_key: Annotated[
        str | None,
        typer.Option(
            envvar="MODALFORGE_API_KEY",
            help="Require 'Authorization: Bearer KEY' (or X-API-Key) on /v1/*.",
        ),
    ] = None,
    max_body_mb: Annotated[float, typer.Option(help="Largest request body (413 above).")] = 20.0,
    request_timeout_s: Annotated[
        float, typer.Option(help="A request's deadline (504 after).")
    ] = 30.0,
    name: Annotated[
        str | None,
        typer.Option(help="The model id in /v1/models (default: the bundle's folder name)."),
    ] = None,
    log_level: Annotated[str, typer.Option(help="uvicorn's log level.")] = "info",
    variant: Annotated[
        str,
        typer.Option(
            help="pytorch (the trained weights) or a variant added by `modalforge "
            "export` (run with ONNX Runtime)."
        ),
    ] = "pytorch",
    index: Annotated[
        Path | None,
        typer.Option(
            help="An index built with this (contrastive) bundle (`modalforge index build`), "
            "searched by POST /v1/search."
        ),
    ] = None,
    allow_url: Annotated[
        list[str] | None,
        typer.Option(
            help="A URL prefix whose images /v1/chat/completions may fetch (default: data: "
            "URLs only). Repeatable."
        ),
    ] = None,
) -> None:
    """Serve a bundle over HTTP: /v1/predict (JSON or multipart), /v1/predict/batch, /v1/models,
    /healthz, /readyz, /metrics, OpenAPI at /docs, and a browser playground at /. Contrastive
    bundles answer /v1/embeddings (OpenAI's format) and, with --index, /v1/search; captioning
    bundles /v1/caption and /v1/chat/completions; speech-to-text bundles
    /v1/audio/transcriptions.

    Requests from concurrent clients are batched (up to --max-batch samples) while the model runs
    in its own thread; SIGTERM / Ctrl-C stops taking requests and finishes those in flight.
    """
    import uvicorn

    from modalforge.bundle import BundleError
    from modalforge.serve import Engine, ServeConfig, create_app

    config = ServeConfig(max_batch=max_batch, batch_timeout_ms=batch_timeout_ms,
                         max_queue=max_queue, workers=workers, max_body_mb=max_body_mb,
                         request_timeout_s=request_timeout_s, api_key=api_key or None,
                         allow_urls=tuple(allow_url or ()))  # fmt: skip
    import torch

    # Only the inference thread should run parallel torch work. Each thread that does gets its
    # own OpenMP team; with two teams on a 2-core machine libgomp stops spinning between ops
    # and a forward pass uses ~1.2 cores instead of 2 (measured: 23 vs 38 samples/s). So the
    # main thread loads single-threaded, and the inference thread sets its own thread count.
    torch.set_num_threads(1)
    try:
        with console.status(f"loading {bundle} ..."):
            engine = Engine.from_bundle(bundle, name=name, variant=variant)
    except (BundleError, ValueError, FileNotFoundError) as err:
        fail(str(err))
    from modalforge.index import EmbeddingIndex

    try:  # create_app checks that the index was built by these weights
        found = EmbeddingIndex.load(index) if index is not None else None
        web = create_app(engine, config, index=found)
    except (ValueError, FileNotFoundError) as err:
        fail(f"--index {index}: {err}")
    shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    inputs = ", ".join(c.name for c in engine.inputs)
    console.print(f"serving [bold]{engine.name}[/] ({engine.task}, inputs {inputs}) on "
                  f"http://{host}:{port}")  # fmt: skip
    console.print(f"  playground  http://{shown}:{port}/")
    console.print(f"  API docs    http://{shown}:{port}/docs")
    if config.api_key is None and host not in ("127.0.0.1", "localhost", "::1"):
        err_console.print("[yellow]warning:[/] listening beyond this machine without --api-key")
    uvicorn.run(web, host=host, port=port, log_level=log_level,
                timeout_graceful_shutdown=int(config.drain_timeout_s))  # fmt: skip


@app.command()
def caption(
    bundle: Annotated[Path, typer.Argument(help="A captioning bundle (train --task caption).")],
    images: Annotated[list[Path], typer.Argument(help="Image files to caption.")],
    method: Annotated[str, typer.Option(help="beam, greedy or sample.")] = "beam",
    beam_width: Annotated[int, typer.Option(help="Beam search: sequences kept.")] = 3,
    length_penalty: Annotated[
        float, typer.Option(help="Beam search: GNMT alpha (0: raw log-probability).")
    ] = 0.6,
    temperature: Annotated[float, typer.Option(help="Sampling: softmax temperature.")] = 1.0,
    top_p: Annotated[float, typer.Option(help="Sampling: nucleus mass kept.")] = 0.9,
    seed: Annotated[int, typer.Option(help="Sampling: random seed.")] = 0,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON lines.")] = False,
) -> None:
    """Write a caption for each image with a captioning bundle."""
    from modalforge.bundle import BundleError
    from modalforge.caption import CaptionPredictor
    from modalforge.data.errors import DecodeError
    from modalforge.models.decoding import DecodeOptions
    from modalforge.predictor import MultimodalPredictor

    missing = [str(i) for i in images if not i.is_file()]
    if missing:
        fail(f"no such file: {', '.join(missing)}")
    try:
        predictor = MultimodalPredictor.load(bundle)
        if not isinstance(predictor, CaptionPredictor):
            fail(f"{bundle} is a {predictor.task} bundle, not a captioning one")
        options = DecodeOptions(method, beam_width, length_penalty, temperature, top_p,
                                predictor.config.max_length, seed)  # fmt: skip
        texts = predictor.caption([str(i.resolve()) for i in images], options, root="/")
    except (BundleError, DecodeError, ValueError, FileNotFoundError) as err:
        fail(str(err))
    for path, text in zip(images, texts, strict=True):
        if as_json:
            print(json.dumps({"image": str(path), "caption": text}))
        else:
            console.print(f"{path}: [bold]{text}[/]", highlight=False)


@app.command()
def transcribe(
    audio: Annotated[
        list[Path] | None, typer.Argument(help="Audio files (WAV, FLAC, OGG, MP3).")
    ] = None,
    bundle: Annotated[
        Path | None,
        typer.Option(help="A speech-to-text bundle (default: the packaged Whisper tiny.en)."),
    ] = None,
    save_bundle: Annotated[
        Path | None,
        typer.Option(help="Write the transcriber as a bundle (to serve it)."),
    ] = None,
    finetune: Annotated[
        Path | None,
        typer.Option(
            help="First teach the decoder this manifest's transcripts (audio + reference text "
            "columns; then --save-bundle to keep it)."
        ),
    ] = None,
    epochs: Annotated[int, typer.Option(help="--finetune: passes over the rows.")] = 8,
    lr: Annotated[float, typer.Option(help="--finetune: AdamW learning rate.")] = 3e-5,
    manifest: Annotated[
        Path | None, typer.Option(help="Score a manifest of audio + reference text (WER).")
    ] = None,
    audio_column: Annotated[str, typer.Option(help="--manifest: the audio column.")] = "audio",
    text_column: Annotated[str, typer.Option(help="--manifest: the reference column.")] = "text",
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="--manifest: report folder.")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON lines.")] = False,
) -> None:
    """Speech to text with Whisper: transcribe files, score a manifest (word error rate),
    fine-tune the decoder on a manifest, or save the transcriber as a bundle for `modalforge
    serve` (/v1/audio/transcriptions)."""
    from modalforge.bundle import BundleError
    from modalforge.data.errors import DecodeError
    from modalforge.transcribe import Transcriber

    if not (audio or save_bundle or manifest):
        fail("give audio files, --manifest or --save-bundle")
    try:
        with console.status("loading Whisper ..."):
            model = Transcriber.load(bundle) if bundle else Transcriber.packaged()
        if finetune is not None:
            history = model.finetune(finetune, audio_column, text_column, epochs=epochs, lr=lr)
            losses = ", ".join(f"{v:.4f}" for v in history["loss"])
            console.print(f"fine-tuned on {history['rows']} rows ({history['skipped']} skipped): "
                          f"loss per epoch {losses}")  # fmt: skip
        if save_bundle is not None:
            saved = model.save(save_bundle)
            console.print(f"bundle: {saved.path}")
        if manifest is not None:
            result = model.evaluate(manifest, audio_column, text_column, out_dir=out)
            if result["wer"] is None:
                fail(f"{manifest}: no row could be scored ({result['n_failed']} failed)")
            console.print(f"{result['n']} rows ({result['n_failed']} failed): WER "
                          f"{result['wer']:.4f} (corpus), {result['mean_row_wer']:.4f} (mean per "
                          "row)" + (f"; report in {out}" if out else ""))  # fmt: skip
        for path, text in zip(audio or [], model.transcribe_sources(audio or []), strict=True):
            if as_json:
                print(json.dumps({"audio": str(path), "text": text}))
            else:
                console.print(f"{path}: [bold]{text}[/]", highlight=False)
    except (BundleError, DecodeError, ValueError, FileNotFoundError, FileExistsError) as err:
        fail(str(err))


def _contrastive(bundle: Path):
    from modalforge.bundle import BundleError
    from modalforge.contrastive import ContrastivePredictor
    from modalforge.predictor import MultimodalPredictor

    try:
        predictor = MultimodalPredictor.load(bundle)
    except (BundleError, FileNotFoundError) as err:
        fail(str(err))
    if not isinstance(predictor, ContrastivePredictor):
        fail(f"{bundle} is a {predictor.task} bundle; indexes need a contrastive one "
             "(train --task contrastive)")  # fmt: skip
    return predictor


@index_app.command("build")
def index_build(
    bundle: Annotated[Path, typer.Argument(help="A contrastive bundle (RUN/bundle).")],
    manifest: Annotated[Path, typer.Option(help="The rows to index.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Index folder to write.")],
    column: Annotated[
        str | None, typer.Option(help="Column to embed (default: the first image tower's).")
    ] = None,
    split: Annotated[str | None, typer.Option(help="Only rows of this split.")] = None,
    id_column: Annotated[
        str | None, typer.Option(help="Column of ids (default: 'id' if present, else row number).")
    ] = None,
    dtype: Annotated[str, typer.Option(help="float32 or float16 (half the size).")] = "float32",
    kind: Annotated[
        str,
        typer.Option(
            help="auto (exact below 50,000 rows, 12,000 in float16; else HNSW), exact or hnsw."
        ),
    ] = "auto",
    overwrite: Annotated[bool, typer.Option(help="Replace an existing index.")] = False,
) -> None:
    """Embed one column of a manifest with its tower and save an index (index.json + vectors.npy
    [+ hnsw.faiss]; no pickle). Each entry keeps its row's other columns as metadata."""
    import numpy as np

    from modalforge.data.manifest import ManifestError, is_missing
    from modalforge.index import EmbeddingIndex

    predictor = _contrastive(bundle)
    towers = predictor.model.columns
    if column is None:
        image = [c for c in towers if predictor.schema[c].modality.value == "image"]
        column = (image or towers)[0]
    if column not in towers:
        fail(f"--column {column!r}: the bundle's towers are {towers}")
    try:
        rows = _split_rows(manifest, split)
        present = [not is_missing(v) for v in rows.frame.get(column, [])]
        if not any(present):
            fail(f"{manifest}: no rows with column {column!r}")
        rows = rows.subset(np.flatnonzero(present))
        with console.status(f"embedding {len(rows)} rows of {column!r} ..."):
            vectors, _ = predictor.embed(rows, column, progress=False)
        key = id_column or ("id" if "id" in rows.frame else None)
        if key is not None and key not in rows.frame:
            fail(f"--id-column {key!r} not in {manifest}")
        ids = [str(v) for v in rows.frame[key]] if key else [str(i) for i in rows.frame.index]
        metadata = json.loads(rows.frame.to_json(orient="records"))
        weights = predictor.bundle.files.get("model.safetensors", {}).get("sha256", "")
        info = {"bundle": str(bundle.resolve()), "column": column,
                "manifest": str(manifest.resolve()), "model_version": weights[:12]}  # fmt: skip
        index = EmbeddingIndex(ids, vectors, metadata, dtype=dtype, kind=kind, info=info)
        index.save(out, overwrite=overwrite)
    except (ManifestError, ValueError, FileExistsError) as err:
        fail(str(err))
    console.print(f"{out}: {len(index)} × {vectors.shape[1]} ({index.backend}, {dtype}) "
                  f"of {column!r}")  # fmt: skip


@app.command()
def search(
    bundle: Annotated[
        Path, typer.Argument(help="The contrastive bundle the index was built with.")
    ],
    index: Annotated[Path, typer.Argument(help="An index folder (`modalforge index build`).")],
    text: Annotated[str | None, typer.Option(help="Query text.")] = None,
    image: Annotated[Path | None, typer.Option(help="Query image file.")] = None,
    audio: Annotated[Path | None, typer.Option(help="Query audio file.")] = None,
    k: Annotated[int, typer.Option("-k", help="Hits to show.")] = 10,
    as_json: Annotated[bool, typer.Option("--json", help="Print the hits as JSON.")] = False,
) -> None:
    """Nearest entries of an index to a text, an image or a sound, embedded by the bundle's
    tower for that modality."""
    import pandas as pd

    from modalforge.index import EmbeddingIndex

    queries = {m: v for m, v in (("text", text), ("image", image), ("audio", audio)) if v}
    if len(queries) != 1:
        fail("give exactly one of --text, --image, --audio")
    ((modality, value),) = queries.items()
    predictor = _contrastive(bundle)
    towers = [c for c in predictor.model.columns
              if predictor.schema[c].modality.value == modality]  # fmt: skip
    if not towers:
        fail(f"the bundle has no {modality} tower (towers: {predictor.model.columns})")
    try:
        found = EmbeddingIndex.load(index)
        if modality != "text":
            value = str(Path(value).resolve())
            if not Path(value).is_file():
                fail(f"--{modality} {value}: no such file")
        vectors, _ = predictor.embed(pd.DataFrame({towers[0]: [value]}), towers[0], root="/")
        hits = found.search(vectors[0], k=k)[0]
    except ValueError as err:
        fail(str(err))
    if as_json:
        print(json.dumps([{"id": h.id, "score": h.score, "metadata": h.metadata} for h in hits]))
        return
    table = Table(title=f"{modality} query → {found.info.get('column', 'index')}",
                  title_justify="left")  # fmt: skip
    for col in ("#", "id", "score", "entry"):
        table.add_column(col)
    for rank, h in enumerate(hits, 1):
        shown = {k: v for k, v in (h.metadata or {}).items() if k not in ("split",)}
        table.add_row(str(rank), h.id, f"{h.score:.4f}",
                      ", ".join(f"{k}={v}" for k, v in list(shown.items())[:4]))  # fmt: skip
    console.print(table)


def main() -> None:
    try:  # transformers' per-load progress bars are noise on a command line
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except ImportError:
        pass
    app()


if __name__ == "__main__":
    main()
