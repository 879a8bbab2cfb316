"""Manifests: one row per sample, in CSV, JSONL or Parquet.

File columns hold paths relative to the manifest's folder (its *root*). A path is resolved with
symlinks followed and must stay under the root: ``../../etc/passwd`` or an absolute path elsewhere
is a bad row, never a file that gets opened.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from modalforge.files import atomic_path

FORMATS = {".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet"}


class ManifestError(ValueError):
    """A manifest that cannot be read at all (as opposed to bad rows inside it)."""


class PathOutsideRoot(ValueError):
    """A manifest path that would resolve outside the manifest's root folder."""


@dataclass
class Manifest:
    """A manifest's rows and the folder its relative paths resolve against."""

    frame: pd.DataFrame
    root: Path
    path: Path | None = None

    def __len__(self) -> int:
        return len(self.frame)

    @property
    def columns(self) -> list[str]:
        return [str(c) for c in self.frame.columns]

    def resolve(self, value: Any) -> Path:
        return resolve_path(self.root, value)

    def subset(self, index) -> Manifest:
        return Manifest(self.frame.iloc[list(index)].reset_index(drop=True), self.root, self.path)

    def describe_row(self, i: int) -> str:
        """How a person finds row ``i`` (0-based) in the file: CSV line numbers count the header."""
        if self.path is not None and self.path.suffix.lower() == ".csv":
            return f"row {i} (line {i + 2})"
        if self.path is not None and FORMATS.get(self.path.suffix.lower()) == "jsonl":
            return f"row {i} (line {i + 1})"
        return f"row {i}"


def is_missing(value: Any) -> bool:
    """True for None, NaN and blank strings: the ways a manifest says 'no value'."""
    if value is None:
        return True
    if isinstance(value, float) and math.isnan(value):
        return True
    if isinstance(value, str) and not value.strip():
        return True
    try:
        return bool(pd.isna(value)) if not isinstance(value, list | tuple | dict) else False
    except (TypeError, ValueError):
        return False


def resolve_path(root: Path, value: Any) -> Path:
    """Resolve a manifest value to a file path under ``root``.

    Raises ``PathOutsideRoot`` for URLs, and for paths (absolute, ``..``-laden or through a
    symlink) that leave ``root``. Nothing is opened here.
    """
    text = str(value).strip()
    if "://" in text or text.startswith("data:"):
        raise PathOutsideRoot(f"{text!r} is a URL; manifests hold file paths under their folder")
    if "\x00" in text:
        raise PathOutsideRoot(f"{text!r} contains a NUL byte")
    root = Path(os.path.realpath(root))
    candidate = Path(os.path.realpath(root / text))  # an absolute `text` replaces root here
    if candidate != root and root not in candidate.parents:
        raise PathOutsideRoot(f"{text!r} resolves outside the manifest folder {root}")
    return candidate


def _format(path: Path) -> str:
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise ManifestError(
            f"{path}: unknown manifest format {path.suffix!r} (use .csv, .jsonl or .parquet)"
        )
    if not path.is_file():
        raise ManifestError(f"{path}: manifest file not found")
    return fmt


# keep_default_na=False + explicit na_values: the text "NA" or "null" in a caption column is
# data, only empty cells are missing.
_CSV = {"keep_default_na": False, "na_values": [""], "encoding": "utf-8"}


def _columns(path: Path, frame: pd.DataFrame) -> pd.DataFrame:
    frame.columns = [str(c) for c in frame.columns]
    if len(frame.columns) != len(set(frame.columns)):
        raise ManifestError(f"{path}: duplicate column names")
    return frame


def read_manifest(path: str | Path, root: str | Path | None = None) -> Manifest:
    """Read a CSV / JSONL / Parquet manifest. ``root`` defaults to the manifest's folder."""
    path = Path(path)
    fmt = _format(path)
    try:
        if fmt == "csv":
            frame = pd.read_csv(path, **_CSV)
        elif fmt == "jsonl":
            frame = pd.read_json(path, lines=True, dtype=False, encoding="utf-8")
        else:
            frame = pd.read_parquet(path)
    except UnicodeDecodeError as err:
        raise ManifestError(f"{path}: not valid UTF-8 ({err.reason} at byte {err.start})") from err
    except (ValueError, OSError, pd.errors.ParserError) as err:
        raise ManifestError(f"{path}: cannot parse as {fmt}: {err}") from err
    frame = _columns(path, frame)
    return Manifest(frame=frame, root=Path(root) if root is not None else path.parent, path=path)


def iter_manifest(
    path: str | Path, rows: int, strings: Sequence[str] = ()
) -> Iterator[pd.DataFrame]:
    """The manifest ``read_manifest`` reads, in frames of at most ``rows`` rows, so a manifest of
    any length is read in constant memory (Parquet by row batches, CSV / JSONL by lines). The
    frames' index counts rows from the file's first (0-based, across frames). ``strings``: CSV
    columns read as text in every frame (a frame of digit-only captions would otherwise parse as
    numbers in that frame alone)."""
    path = Path(path)
    fmt = _format(path)
    start = 0
    try:
        if fmt == "parquet":
            import pyarrow.parquet as pq

            frames = (b.to_pandas() for b in pq.ParquetFile(path).iter_batches(batch_size=rows))
        elif fmt == "csv":
            frames = pd.read_csv(path, chunksize=rows, dtype=dict.fromkeys(strings, str), **_CSV)
        else:
            frames = pd.read_json(path, lines=True, dtype=False, encoding="utf-8", chunksize=rows)
        for frame in frames:
            frame = _columns(path, frame)
            frame.index = pd.RangeIndex(start, start + len(frame))
            start += len(frame)
            yield frame
    except UnicodeDecodeError as err:
        raise ManifestError(f"{path}: not valid UTF-8 ({err.reason} at byte {err.start})") from err
    except (ValueError, OSError, pd.errors.ParserError) as err:
        raise ManifestError(f"{path}: cannot parse as {fmt} (near row {start}): {err}") from err


def write_manifest(frame: pd.DataFrame, path: str | Path) -> Path:
    """Write ``frame`` in the format named by ``path``'s suffix, atomically."""
    path = Path(path)
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise ManifestError(f"{path}: unknown manifest format {path.suffix!r}")
    with atomic_path(path, point="manifest") as tmp:
        if fmt == "csv":
            frame.to_csv(tmp, index=False)
        elif fmt == "jsonl":
            frame.to_json(tmp, orient="records", lines=True, force_ascii=False)
        else:
            frame.to_parquet(tmp, index=False)
    return path
