"""Batch inference over a manifest: every row scored by a ``runtime.Engine``, in-process or on
Ray Data (``runtime.batch_ray``), into a folder of Parquet shards (``predict_manifest``), or
streamed to a caller (``score_manifest``: ``index build``).

Both paths score with ``batch_score.Scorer`` (see there for the output columns), so their
outputs are equal by construction. In-process, the manifest is read ``batch_size`` rows at a
time (``data.manifest.iter_manifest``) and the results written in shards of ``SHARD_ROWS``: the
memory stays flat whatever the manifest's length. The folder is built in a temporary one and
swapped in whole (``files.atomic_dir``).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import pandas as pd

from modalforge.data.manifest import Manifest, ManifestError, is_missing, iter_manifest
from modalforge.runtime.batch_score import ROW, BatchSummary, Failure, Scorer, blocks_for
from modalforge.schema import Column, Modality

#: results per Parquet shard
SHARD_ROWS = 10_000
#: failures kept for the summary (all of them are in the shards' ``error`` column)
FIRST_FAILURES = 20
SUMMARY = "_summary.json"  # readers of a Parquet folder skip names starting with "_"


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
    # tuned once, here, as the server tunes at start-up (chunk sizes, text padding: measured 38
    # -> 81 rows/s on the demo classifier); Ray's actors apply this same tuning, so both paths
    # run alike
    engine.warmup(min(summary.batch_size, 32))
    scorer = Scorer(engine, manifest.parent, columns)
    key, frames = manifest_frames(manifest, summary.batch_size, scorer.inputs, split, id_column,
                                  skip_empty)  # fmt: skip
    scorer.id_column = key
    if ray:
        from modalforge.runtime.batch_ray import ray_tables

        tuning = engine.tuning
        del engine, scorer.engine  # each actor loads its own
        tables = ray_tables(bundle, manifest.parent, frames, summary, columns=columns,
                            id_column=key, actors=actors, address=ray_address,
                            tuning=tuning)  # fmt: skip
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


__all__ = ["ROW", "SHARD_ROWS", "SUMMARY", "BatchSummary", "Failure", "Scorer", "ShardWriter",
           "blocks_for", "check_out", "describe", "manifest_frames", "predict_manifest",
           "score_manifest"]  # fmt: skip
