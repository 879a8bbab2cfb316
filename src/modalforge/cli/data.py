"""`modalforge data`: build the built-in datasets; infer, check and split manifests."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from modalforge.cli._common import (
    BadRowOpt,
    ColumnOpt,
    LabelOpt,
    SchemaOpt,
    _load,
    console,
    fail,
)
from modalforge.files import atomic_path

data_app = typer.Typer(
    help="Build the built-in datasets; infer, check and split manifests (CSV, JSONL, Parquet).\n\n"
    "A manifest has one row per sample; file columns hold paths relative to the manifest's "
    "folder, and no path may leave it.",
    no_args_is_help=True,
)


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
    limit: Annotated[
        int | None, typer.Option(help="avdigits: only the first N digits (a quick check).")
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
    if limit is not None:
        if name != "avdigits":
            fail("--limit applies to the avdigits dataset only")
        if limit < 1:
            fail(f"--limit {limit}: give a positive number of digits")
        options["limit"] = limit
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
    from modalforge.tasks.vqa import vqa_manifest

    try:
        source = read_manifest(manifest)
        frame = vqa_manifest(source.frame, image, name, category, subcategory, min_count, seed)
    except (ManifestError, ValueError) as err:
        fail(str(err))
    # image paths relative to the new manifest's folder
    folder = out.resolve().parent
    frame["image"] = [os.path.relpath(source.root / p, folder) if not Path(p).is_absolute()
                      else p for p in frame["image"]]  # fmt: skip
    with atomic_path(out) as tmp:
        frame.to_csv(tmp, index=False)
    counts = frame["qtype"].value_counts().to_dict()
    console.print(f"{out}: {len(frame)} questions ({counts}), "
                  f"{frame['answer'].nunique()} answers")  # fmt: skip


@data_app.command("chat")
def data_chat(
    dataset: Annotated[
        Path, typer.Argument(help="A built dataset's folder (emoji, avdigits) or its manifest.")
    ],
    out: Annotated[
        Path,
        typer.Option(
            "--out",
            "-o",
            help="The conversations to write (JSONL, LLaVA's format), next to or above the media.",
        ),
    ],
    seed: Annotated[int, typer.Option(help="Seed of the distractors and phrasings.")] = 0,
) -> None:
    """Instruction conversations for the chat model from a built-in dataset: emoji -> "what is
    this?" (the name), the VQA questions of `data vqa`, yes/no, "what is said in this clip?",
    "do these match?" and two-turn samples; avdigits -> the digit shown, spoken, and whether they
    agree. Each emoji's split is kept (a grouped split: no emoji on both sides)."""
    from modalforge.data.manifest import ManifestError
    from modalforge.tasks.chat.data import build_instructions

    try:
        table = build_instructions(dataset, out, seed=seed)
    except (ManifestError, ValueError) as err:
        fail(str(err))
    total = sum(n for by_type in table.values() for n in by_type.values())
    console.print(f"{out}: {total} conversations")
    for split, by_type in table.items():
        console.print(f"  {split}: " + ", ".join(f"{q} {n}" for q, n in sorted(by_type.items())))


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
