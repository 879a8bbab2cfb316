"""Batch inference over a manifest: every row scored by a ``runtime.Engine``, in-process or on
Ray Data (``runtime.batch_ray``), into a folder of Parquet shards.

One function scores for both paths, so their outputs are equal by construction: ``Scorer``
turns a pandas frame of manifest rows into an Arrow table of results. Each row becomes the
request fields the server would get (image / audio / graph files read as bytes from the path
resolved under the manifest's root, with the manifest's own path rules), and
``Engine.handle`` decodes each request alone with the training featurizers and isolates a
sample that fails (``predict_apart``) -- so a corrupt row gets an ``error`` and every other row
its result, never a crash.

Output columns: ``row`` (0-based row in the manifest), ``id`` (the id column, else the row
number, as text), ``error`` / ``error_column`` (null for a good row), then the task's results,
null on a failed row: ``label``, ``confidence``, ``p:<class>``, ``contribution:<column>``
(classification, named as ``modalforge predict --out x.csv`` names them); ``prediction``
(regression); ``embedding:<column>`` (list<float32>, contrastive); ``caption``; ``text``
(transcription); and ``modalities`` (the inputs the row had). The schema is fixed up front, so
every shard of both paths has the same columns and types, even a shard of failures only.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from modalforge.data.manifest import (
    Manifest,
    ManifestError,
    PathOutsideRoot,
    is_missing,
    iter_manifest,
    resolve_path,
)
from modalforge.errors import RequestError
from modalforge.schema import Column, Modality
from modalforge.tasks.registry import CAPTION, EMBED, PREDICT, TRANSCRIBE

#: the input frames' column of row numbers (kept as a column: Ray Data drops a pandas index)
ROW = "__row__"
#: the largest file a row may name (image / audio decoders cap pixels and seconds, but the bytes
#: are read first)
MAX_FILE_BYTES = 256 * 2**20
#: results per Parquet shard
SHARD_ROWS = 10_000
#: failures kept for the summary (all of them are in the shards' ``error`` column)
FIRST_FAILURES = 20
SUMMARY = "_summary.json"  # readers of a Parquet folder skip names starting with "_"


@dataclass
class Failure:
    row: int
    id: str | None
    column: str | None
    message: str


@dataclass
class BatchSummary:
    """What a batch run did: rows scored and failed, the first failures, how it ran."""

    out: str
    mode: str  # "in-process" or "ray"
    rows: int = 0
    failed: int = 0
    shards: int = 0
    seconds: float = 0.0
    batch_size: int = 0
    actors: int | None = None
    cpus_per_actor: float | None = None
    torch_threads: int | None = None
    blocks: int | None = None
    rows_per_actor: list[int] | None = None
    failures: list[Failure] = field(default_factory=list)

    @property
    def rows_per_second(self) -> float:
        return self.rows / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "rows_per_second": round(self.rows_per_second, 2)}


# -- scoring: manifest rows -> results (both paths) ----------------------------------------------
def output_schema(engine, inputs: list[Column]):
    """The results' Arrow schema for ``engine``'s task (chosen by capability, not task name)."""
    import pyarrow as pa

    fields = [("row", pa.int64()), ("id", pa.string()), ("error", pa.string()),
              ("error_column", pa.string())]  # fmt: skip
    names = [c.name for c in engine.inputs]
    if engine.can(PREDICT) and engine.predictor.classifies:
        fields += [("label", pa.string()), ("confidence", pa.float64())]
        fields += [(f"p:{label}", pa.float64()) for label in engine.labels]
        fields += [(f"contribution:{c}", pa.float64()) for c in names]
    elif engine.can(PREDICT):
        fields += [("prediction", pa.float64())]
        fields += [(f"contribution:{c}", pa.float64()) for c in names]
    elif engine.can(EMBED):
        fields += [(f"embedding:{c.name}", pa.list_(pa.float32())) for c in inputs]
    elif engine.can(CAPTION):
        fields += [("caption", pa.string())]
    elif engine.can(TRANSCRIBE):
        fields += [("text", pa.string())]
    else:
        raise ValueError(f"{engine.name} is a {engine.task} model: batch predict scores "
                         "classifiers, regressors, contrastive, caption and transcription "
                         "models")  # fmt: skip
    fields += [("modalities", pa.list_(pa.string()))]
    return pa.schema(fields)


#: an adapter's dict-valued result -> the prefix of its flattened columns
_PREFIX = {"probabilities": "p:", "contributions": "contribution:", "embeddings": "embedding:"}


def flatten(result: Mapping[str, Any], names: set[str]) -> dict[str, Any]:
    """One adapter result -> output columns: dicts spread as ``prefix<key>``, the rest as is;
    what the schema (``names``) has no column for (fusion weights, decoding) is left out."""
    out: dict[str, Any] = {}
    for key, value in result.items():
        if key in _PREFIX and isinstance(value, Mapping):
            out.update({f"{_PREFIX[key]}{k}": v for k, v in value.items()})
        elif key in names:
            out[key] = value
    return {k: v for k, v in out.items() if k in names}


class Scorer:
    """A frame of manifest rows (with ``ROW``) -> the results table (``output_schema``).

    ``columns``: the input columns to send (default: every input of the model; ``index build``
    sends one tower's); ``id_column``: the column of ids (None: the row number)."""

    def __init__(self, engine, root: str | Path, columns: list[str] | None = None,
                 id_column: str | None = None) -> None:  # fmt: skip
        self.engine = engine
        self.root = Path(root)
        inputs = list(engine.inputs)
        if columns is not None:
            unknown = sorted(set(columns) - {c.name for c in inputs})
            if unknown:
                raise ValueError(
                    f"{unknown}: not inputs of this model ({[c.name for c in inputs]})"
                )
            inputs = [c for c in inputs if c.name in columns]
        self.inputs = inputs
        self.id_column = id_column
        self.schema = output_schema(engine, inputs)
        self._names = set(self.schema.names)

    def __call__(self, frame: pd.DataFrame):
        import pyarrow as pa

        records = frame.to_dict("records")
        out: list[Any] = [None] * len(records)
        good, requests = [], []
        for i, record in enumerate(records):
            try:
                requests.append(self.fields(record))
                good.append(i)
            except RequestError as err:
                out[i] = err
        for i, result in zip(good, self.engine.handle(requests) if requests else [], strict=True):
            out[i] = result
        rows = []
        for record, result in zip(records, out, strict=True):
            row = int(record[ROW])
            key = record.get(self.id_column) if self.id_column else row
            base = {"row": row, "id": None if is_missing(key) else str(key)}
            if isinstance(result, RequestError):
                base.update(error=result.message, error_column=result.param)
            elif isinstance(result, BaseException):  # the model failed on this sample alone
                base["error"] = f"prediction failed: {type(result).__name__}: {result}"
            else:
                base.update(flatten(result, self._names))
            rows.append(base)
        return pa.Table.from_pylist(rows, schema=self.schema)

    def fields(self, record: Mapping[str, Any]) -> dict[str, Any]:
        """A manifest row -> the request fields the server would get. Raises RequestError
        naming the column for a path outside the root, a missing or unreadable file."""
        fields: dict[str, Any] = {}
        for column in self.inputs:
            value = record.get(column.name)
            if is_missing(value):
                continue
            fields[column.name] = self._read(column, value) if column.modality.is_file else value
        return fields

    def _read(self, column: Column, value: Any) -> bytes:
        name = column.name
        try:
            path = resolve_path(self.root, value)
        except PathOutsideRoot as err:
            raise RequestError(f"{name!r}: {err}", param=name) from None
        try:
            size = path.stat().st_size if path.is_file() else None
            if size is None:
                raise RequestError(f"{name!r}: {str(value)!r} not found under {self.root}",
                                   param=name)  # fmt: skip
            if size > MAX_FILE_BYTES:
                raise RequestError(f"{name!r}: {str(value)!r} is {size:,} bytes, over the "
                                   f"limit of {MAX_FILE_BYTES:,}", param=name)  # fmt: skip
            return path.read_bytes()
        except OSError as err:
            raise RequestError(f"{name!r}: cannot read {str(value)!r}: {err.strerror or err}",
                               param=name) from None  # fmt: skip


# -- reading the manifest -----------------------------------------------------------------------
def manifest_frames(
    path: Path, rows: int, inputs: list[Column], split: str | None = None,
    id_column: str | None = None, skip_empty: bool = False,
) -> tuple[str | None, Iterator[pd.DataFrame]]:  # fmt: skip
    """The id column to use and the manifest's rows (of ``split``) in frames of at most
    ``rows`` rows, each with its row numbers in ``ROW``. Checks the header first (raises
    ManifestError naming the file): the model's required inputs, ``split``, ``id_column``.
    ``skip_empty``: leave out rows with none of the ``inputs`` (index build: nothing to embed;
    predict reports such a row as failed)."""
    path = Path(path)
    strings = [c.name for c in inputs if c.modality is not Modality.TABULAR]
    frames = iter_manifest(path, rows, strings=strings)
    first = next(frames, None)
    if first is None:
        return id_column, iter(())
    have = set(first.columns)
    absent = [c.name for c in inputs if c.required and c.name not in have]
    if absent:
        raise ManifestError(f"{path}: no column {absent} (required inputs of this model; "
                            f"it has {sorted(have)})")  # fmt: skip
    if not any(c.name in have for c in inputs):
        raise ManifestError(f"{path}: none of the model's inputs {[c.name for c in inputs]} is "
                            f"a column (it has {sorted(have)})")  # fmt: skip
    if split and "split" not in have:
        raise ManifestError(f"{path}: --split {split}: no split column")
    if id_column is not None and id_column not in have:
        raise ManifestError(f"{path}: id column {id_column!r} not found (it has {sorted(have)})")
    key = id_column or ("id" if "id" in have else None)
    keep = [c.name for c in inputs if c.name in have] + ([key] if key else [])
    keep = list(dict.fromkeys(keep))

    def gen() -> Iterator[pd.DataFrame]:
        for frame in _chain(first, frames):
            if split:
                frame = frame[frame["split"].astype(str) == split]
            if skip_empty:
                sent = [c.name for c in inputs if c.name in have]
                frame = frame[~frame[sent].map(is_missing).all(axis=1)]
            if len(frame):
                frame = frame[keep].copy()
                frame[ROW] = frame.index
                yield frame.reset_index(drop=True)

    return key, gen()


def _chain(first: pd.DataFrame, rest: Iterable[pd.DataFrame]) -> Iterator[pd.DataFrame]:
    yield first
    yield from rest


def count_rows(path: Path) -> int | None:
    """The manifest's rows without reading them (Parquet's metadata); None where only a full
    read would tell (CSV / JSONL: the bar then counts up without a total)."""
    if path.suffix.lower() != ".parquet":
        return None
    import pyarrow.parquet as pq

    return pq.ParquetFile(path).metadata.num_rows


# -- writing the shards ---------------------------------------------------------------------------
class ShardWriter:
    """Result tables -> ``part-00000.parquet``, ... of ``rows_per_shard`` rows in ``folder``
    (the temporary folder ``atomic_dir`` swaps in); ``summary.shards`` counts them."""

    def __init__(self, folder: Path, schema, summary: BatchSummary,
                 rows_per_shard: int = SHARD_ROWS) -> None:  # fmt: skip
        self.folder, self.schema, self.summary = folder, schema, summary
        self.rows_per_shard = rows_per_shard
        self._buffer: list = []
        self._buffered = 0

    def write(self, table) -> None:
        self._buffer.append(table)
        self._buffered += table.num_rows
        while self._buffered >= self.rows_per_shard:
            self._flush(self.rows_per_shard)

    def _flush(self, n: int) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        whole = pa.concat_tables(self._buffer) if self._buffer else self.schema.empty_table()
        pq.write_table(whole.slice(0, n), self.folder / f"part-{self.summary.shards:05d}.parquet")
        self.summary.shards += 1
        rest = whole.slice(n)
        self._buffer, self._buffered = ([rest] if rest.num_rows else []), rest.num_rows

    def close(self) -> None:
        """Write what is left; a run of no rows still writes one empty shard (the columns)."""
        if self._buffered or not self.summary.shards:
            self._flush(self._buffered)


def check_out(out: Path) -> None:
    """Refuse an ``--out`` that is a file or a folder this command did not write (one with its
    ``_summary.json`` is replaced, atomically, at the end)."""
    if out.is_file() or out.is_symlink():
        raise FileExistsError(f"--out {out}: a file is in the way (batch output is a folder)")
    if out.is_dir() and any(out.iterdir()) and not (out / SUMMARY).is_file():
        raise FileExistsError(f"--out {out}: a folder that is not a batch predict output; "
                              "choose another path")  # fmt: skip


# -- the two paths --------------------------------------------------------------------------------
def score_manifest(
    bundle: Path,
    manifest: Path,
    summary: BatchSummary,
    *,
    ray: bool = False,
    actors: int | None = None,
    id_column: str | None = None,
    split: str | None = None,
    columns: list[str] | None = None,
    ray_address: str | None = None,
    skip_empty: bool = False,
    progress: bool = True,
):
    """-> (the results' schema, the results of every row of ``manifest``, as Arrow tables,
    counted into ``summary`` as they come). ``ray``: on Ray Data with a pool of ``actors``
    engines (default: sized from the free CPUs, ``batch_ray.plan_pool``), else in this process,
    streaming the manifest ``summary.batch_size`` rows at a time. Bad rows come back with their
    error; bad commands (a bundle that cannot batch-predict, a column missing) raise first."""
    from modalforge.runtime.engine import Engine

    if summary.batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {summary.batch_size}")
    bundle, manifest = Path(bundle).resolve(), Path(manifest).resolve()
    engine = Engine.from_bundle(bundle)
    scorer = Scorer(engine, manifest.parent, columns)
    key, frames = manifest_frames(manifest, summary.batch_size, scorer.inputs, split, id_column,
                                  skip_empty)  # fmt: skip
    scorer.id_column = key
    if ray:
        from modalforge.runtime.batch_ray import ray_tables

        del engine, scorer.engine  # each actor loads its own
        tables = ray_tables(bundle, manifest.parent, frames, summary, columns=columns,
                            id_column=key, actors=actors, address=ray_address)  # fmt: skip
    else:
        tables = (scorer(frame) for frame in frames)
    total = None if split else count_rows(manifest)
    return scorer.schema, _progress(_counted(tables, scorer.schema, summary), total, summary,
                                    progress)  # fmt: skip


def _counted(tables: Iterable, schema, summary: BatchSummary) -> Iterator:
    import pyarrow.compute as pc

    for table in tables:
        table = table.select(schema.names).cast(schema)
        summary.rows += table.num_rows
        bad = table.filter(pc.is_valid(table["error"]))
        summary.failed += bad.num_rows
        for r in bad.slice(0, max(0, FIRST_FAILURES - len(summary.failures))).to_pylist():
            summary.failures.append(Failure(r["row"], r["id"], r["error_column"], r["error"]))
        yield table


def predict_manifest(
    bundle: str | Path,
    manifest: str | Path,
    out: str | Path,
    *,
    batch_size: int = 64,
    rows_per_shard: int = SHARD_ROWS,
    **options: Any,
) -> BatchSummary:
    """Score every row of ``manifest`` with ``bundle`` into the Parquet folder ``out``: shards
    of ``rows_per_shard`` rows and ``_summary.json``, built in a temporary folder and swapped
    in whole. ``options``: ``score_manifest``'s (ray, actors, id_column, split, ...)."""
    from modalforge.files import atomic_dir

    out = Path(out)
    check_out(out)
    summary = BatchSummary(out=str(out), mode="ray" if options.get("ray") else "in-process",
                           batch_size=batch_size)  # fmt: skip
    t0 = time.perf_counter()
    schema, tables = score_manifest(Path(bundle), Path(manifest), summary, **options)
    with atomic_dir(out, point="batch") as tmp:
        writer = ShardWriter(tmp, schema, summary, rows_per_shard)
        for table in tables:
            writer.write(table)
        writer.close()
        summary.seconds = time.perf_counter() - t0
        (tmp / SUMMARY).write_text(json.dumps(summary.to_dict(), indent=2) + "\n")
    return summary


def _progress(tables: Iterable, total: int | None, summary: BatchSummary, enabled: bool):
    if not enabled:
        yield from tables
        return
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    columns = [TextColumn("[progress.description]{task.description}"), BarColumn(),
               MofNCompleteColumn(), TextColumn("{task.fields[failed]} failed"),
               TimeElapsedColumn(), TimeRemainingColumn()]  # fmt: skip
    with Progress(*columns, transient=True) as bar:
        task = bar.add_task(f"scoring ({summary.mode})", total=total, failed=0)
        for table in tables:
            yield table
            bar.update(task, advance=table.num_rows, failed=summary.failed)


def describe(manifest: Path, failure: Failure) -> str:
    """``row 7 (line 9), id x, column image: message`` for a person reading the manifest."""
    where = Manifest(pd.DataFrame(), manifest.parent, manifest).describe_row(failure.row)
    ident = (
        f", id {failure.id}" if failure.id is not None and failure.id != str(failure.row) else ""
    )
    column = f", column {failure.column}" if failure.column else ""
    return f"{where}{ident}{column}: {failure.message}"


def blocks_for(rows: int, actors: int, batch_size: int) -> int:
    """How many blocks to cut ``rows`` into: at least two per actor (one in work, one queued,
    so no actor idles while another does all the work), else one per ``batch_size`` rows."""
    return max(1, min(rows, max(2 * actors, math.ceil(rows / batch_size))))


__all__ = ["BatchSummary", "Failure", "Scorer", "ShardWriter", "describe", "manifest_frames",
           "output_schema", "predict_manifest", "score_manifest"]  # fmt: skip
