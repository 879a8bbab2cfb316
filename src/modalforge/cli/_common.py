"""What the command modules share: the consoles, `fail`, the manifest options and helpers."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

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
RayAddressOpt = Annotated[
    str | None, typer.Option(help="--ray: join this Ray cluster (e.g. ray://head:10001).")
]
ActorsOpt = Annotated[
    int | None,
    typer.Option(
        help="--ray: engines in the pool (default: one per free CPU, less one CPU left "
        "for Ray Data's own tasks)."
    ),
]


def fail(message: str, code: int = 1) -> None:
    err_console.print(f"[bold red]error:[/] {message}", highlight=False)
    raise typer.Exit(code)


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


def _many_options(command: str, out: Path | None, config: Path | None, fusion: str | None,
                  encoders: dict[str, str], image_size: int | None, **flags):  # fmt: skip
    """RunOptions from the flags (and --config) as `train` reads them, and the output folder:
    --out, else the config's `out`, else runs/COMMAND."""
    from modalforge.experiments.run import RunOptions
    from modalforge.tasks import list_tasks

    flags = {**flags, "fusion": fusion}
    if flags.get("columns"):
        flags["columns"] = flags["columns"].split(",")
    if flags.get("manifest") is not None:
        flags["manifest"] = str(flags["manifest"])
    if config:
        options = RunOptions.from_yaml(config, **flags)
    else:
        implied = [f for spec in list_tasks() for f in spec.implied_by]  # pairs, caption
        if not flags.get("manifest") or not any(flags.get(f) for f in ("label", *implied)):
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


def _split_rows(manifest: Path, split: str | None):
    """The manifest's rows whose ``split`` column equals ``split`` (all rows for None / '')."""
    from modalforge.data.manifest import read_manifest

    rows = read_manifest(manifest)
    if not split:
        return rows
    if "split" not in rows.frame:
        fail(f"--split {split}: {manifest} has no split column (pass --split '')")
    return rows.subset([i for i, v in enumerate(rows.frame["split"]) if str(v) == split])


def report_batch(summary, manifest: Path, verb: str, shown: int = 5) -> None:
    """``N rows predicted, F failed`` (how it ran), then the first ``shown`` failed rows."""
    from rich.markup import escape

    from modalforge.runtime.batch import describe

    how = summary.mode
    if summary.actors:
        how += (
            f", {summary.actors} actors × {summary.cpus_per_actor:g} CPU, {summary.blocks} blocks"
        )
    console.print(f"{summary.rows - summary.failed} rows {verb}, {summary.failed} failed, in "
                  f"{summary.seconds:.1f} s ({summary.rows_per_second:.1f} rows/s; {how}) -> "
                  f"{escape(summary.out)}")  # fmt: skip
    for failure in summary.failures[:shown]:
        console.print(f"  {escape(describe(manifest, failure))}", highlight=False)
    if summary.failed > shown:
        console.print(f"  ... and {summary.failed - shown} more (the output's error column)")
