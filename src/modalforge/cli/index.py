"""`modalforge index` and `search`: embedding indexes of a contrastive bundle."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from modalforge.cli._common import ActorsOpt, RayAddressOpt, console, fail, report_batch

index_app = typer.Typer(
    help="Embedding indexes of a contrastive bundle: build one over a manifest's column, then "
    "`modalforge search` it by text, image or audio.",
    no_args_is_help=True,
)


def _contrastive(bundle: Path):
    from modalforge.bundle import BundleError, load_bundle
    from modalforge.tasks import for_bundle, load
    from modalforge.tasks.registry import EMBED

    try:
        found = load_bundle(bundle, verify=False)
        if not for_bundle(found).can(EMBED):
            fail(f"{bundle} is a {found.task} bundle; indexes need a contrastive one "
                 "(train --task contrastive)")  # fmt: skip
        return load(bundle)
    except (BundleError, FileNotFoundError) as err:
        fail(str(err))


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
    ray: Annotated[
        bool,
        typer.Option(
            "--ray",
            help="Embed on Ray Data with a pool of engines (the running Ray, --ray-address, "
            "or a new local one).",
        ),
    ] = False,
    ray_address: RayAddressOpt = None,
    actors: ActorsOpt = None,
    batch_size: Annotated[int, typer.Option(help="Rows embedded per model call.")] = 64,
) -> None:
    """Embed one column of a manifest with its tower and save an index (index.json + vectors.npy
    [+ hnsw.faiss]; no pickle). Each entry keeps its row's other columns as metadata.

    The rows are streamed through the batch-predict engine (in this process, or on Ray Data
    with --ray): a row whose file cannot be read or decoded is reported and left out of the
    index, never a reason to stop."""
    import numpy as np

    from modalforge.data.manifest import ManifestError, is_missing, read_manifest
    from modalforge.index import EmbeddingIndex
    from modalforge.runtime.batch import BatchSummary, score_manifest

    predictor = _contrastive(bundle)
    towers = predictor.model.columns
    if column is None:
        image = [c for c in towers if predictor.schema[c].modality.value == "image"]
        column = (image or towers)[0]
    if column not in towers:
        fail(f"--column {column!r}: the bundle's towers are {towers}")
    try:
        frame = read_manifest(manifest).frame  # each entry's metadata
        if split and "split" not in frame:
            fail(f"--split {split}: {manifest} has no split column (pass --split '')")
        chosen = frame["split"].astype(str) == split if split else np.ones(len(frame), bool)
        values = frame[column] if column in frame else [None] * len(frame)
        present = chosen & np.array([not is_missing(v) for v in values], dtype=bool)
        if not present.any():
            fail(f"{manifest}: no rows with column {column!r}")
        summary = BatchSummary(out=str(out), mode="ray" if ray else "in-process",
                               batch_size=batch_size)  # fmt: skip
        t0 = time.perf_counter()
        _, tables = score_manifest(bundle, manifest, summary, ray=ray, actors=actors,
                                   id_column=id_column, split=split, columns=[column],
                                   ray_address=ray_address, skip_empty=True)  # fmt: skip
        rows, ids, parts = [], [], []
        for table in tables:
            good = table.filter(table["error"].is_null())
            rows += good["row"].to_pylist()
            ids += good["id"].to_pylist()
            if good.num_rows:
                vectors = good[f"embedding:{column}"].combine_chunks()
                parts.append(vectors.flatten().to_numpy().reshape(good.num_rows, -1))
        summary.seconds = time.perf_counter() - t0
        blank = int(chosen.sum() - present.sum())  # nothing to index, not failures
        if not rows:
            fail(f"{manifest}: no row of column {column!r} could be embedded ({summary.failed} "
                 "failed)")  # fmt: skip
        vectors = np.concatenate(parts).astype(np.float32)
        metadata = json.loads(frame.iloc[rows].to_json(orient="records"))
        weights = predictor.bundle.files.get("model.safetensors", {}).get("sha256", "")
        info = {"bundle": str(bundle.resolve()), "column": column,
                "manifest": str(manifest.resolve()), "model_version": weights[:12]}  # fmt: skip
        index = EmbeddingIndex(ids, vectors, metadata, dtype=dtype, kind=kind, info=info)
        index.save(out, overwrite=overwrite)
    except (ManifestError, ValueError, FileExistsError) as err:
        fail(str(err))
    report_batch(summary, manifest, "embedded")
    if blank:
        console.print(f"  rows without {column!r}, left out: {blank}")
    console.print(f"{out}: {len(index)} × {vectors.shape[1]} ({index.backend}, {dtype}) "
                  f"of {column!r}")  # fmt: skip


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
