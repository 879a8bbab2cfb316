"""`modalforge index` and `search`: embedding indexes of a contrastive bundle."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from modalforge.cli._common import _split_rows, console, fail

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
