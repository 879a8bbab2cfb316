"""Scoring manifest rows for batch predict (``runtime.batch``): the part both paths share.

One function scores for both paths (the in-process loop calls it on each frame, each Ray
Data actor of ``runtime.batch_ray`` holds one), so their outputs are equal by construction:
``Scorer`` turns a pandas frame of manifest rows into an Arrow table of results. Each row
becomes the request fields the server would get (image / audio / graph files read as bytes
from the path resolved under the manifest's root, with the manifest's own path rules), and
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

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from modalforge.data.manifest import PathOutsideRoot, is_missing, resolve_path
from modalforge.errors import RequestError
from modalforge.schema import Column
from modalforge.tasks.registry import CAPTION, EMBED, PREDICT, TRANSCRIBE

#: the input frames' column of row numbers (kept as a column: Ray Data drops a pandas index)
ROW = "__row__"
#: the largest file a row may name (image / audio decoders cap pixels and seconds, but the bytes
#: are read first)
MAX_FILE_BYTES = 256 * 2**20


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


def blocks_for(rows: int, actors: int, batch_size: int) -> int:
    """How many blocks to cut ``rows`` into: at least two per actor (one in work, one queued,
    so no actor idles while another does all the work), else one per ``batch_size`` rows."""
    return max(1, min(rows, max(2 * actors, math.ceil(rows / batch_size))))


__all__ = ["MAX_FILE_BYTES", "ROW", "BatchSummary", "Failure", "Scorer", "blocks_for", "flatten",
           "output_schema"]  # fmt: skip
