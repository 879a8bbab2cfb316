"""Check every row of a manifest against its Schema and report each problem row.

Every value is decoded with the same functions training and serving use, so a row that passes
here loads later. Validation never stops at the first problem: it reads the whole manifest,
then the ``on_bad_row`` policy decides (``skip`` keeps the good rows, ``fail`` raises with the
full report).
"""

from __future__ import annotations

import collections
import csv
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from modalforge.data.audio import DEFAULT_MAX_DECODE_SECONDS, decode_audio
from modalforge.data.errors import DecodeError
from modalforge.data.graph import load_graph
from modalforge.data.image import DEFAULT_MAX_PIXELS, decode_image
from modalforge.data.manifest import Manifest, PathOutsideRoot, is_missing
from modalforge.data.tabular import to_float
from modalforge.data.text import normalize_text
from modalforge.files import atomic_path, atomic_write_json
from modalforge.schema import Column, Modality, Schema

OnBadRow = Literal["skip", "fail"]

# kind -> what it means, in the order reports list them
PROBLEM_KINDS = {
    "missing_value": "a required column is empty",
    "outside_root": "a path that leaves the manifest's folder (or a URL)",
    "missing_file": "the file does not exist",
    "undecodable": "the file exists but cannot be decoded",
    "empty_text": "the text is empty or only whitespace",
    "bad_text": "the text is not usable (not a string, too long, bad encoding)",
    "bad_number": "a tabular value that is not a finite number",
    "unknown_label": "a label outside the declared classes",
}


@dataclass(frozen=True)
class Problem:
    row: int  # 0-based data row
    column: str
    kind: str
    message: str


@dataclass
class ValidationReport:
    n_rows: int
    problems: list[Problem] = field(default_factory=list)
    # column -> number of rows with a usable value
    present: dict[str, int] = field(default_factory=dict)
    where: Callable[[int], str] = field(default=lambda i: f"row {i}", repr=False)

    @property
    def bad_rows(self) -> list[int]:
        return sorted({p.row for p in self.problems})

    @property
    def ok(self) -> bool:
        return not self.problems

    def counts(self) -> dict[str, int]:
        """Problem kind -> number of problems, in PROBLEM_KINDS order."""
        c = collections.Counter(p.kind for p in self.problems)
        return {k: c[k] for k in PROBLEM_KINDS if c[k]}

    def counts_by_column(self) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = collections.defaultdict(dict)
        for (column, kind), n in collections.Counter(
            (p.column, p.kind) for p in self.problems
        ).items():
            out[column][kind] = n
        return dict(out)

    def summary(self) -> str:
        if self.ok:
            return f"{self.n_rows} rows, no problems"
        parts = ", ".join(f"{n} {k}" for k, n in self.counts().items())
        return f"{self.n_rows} rows, {len(self.bad_rows)} bad ({parts})"

    def lines(self, limit: int | None = None) -> list[str]:
        """One line per problem: ``row 7 (line 9), column image: missing_file: …``."""
        shown = self.problems if limit is None else self.problems[:limit]
        out = [f"{self.where(p.row)}, column {p.column}: {p.kind}: {p.message}" for p in shown]
        if limit is not None and len(self.problems) > limit:
            out.append(f"... and {len(self.problems) - limit} more problems")
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "n_rows": self.n_rows,
            "n_bad_rows": len(self.bad_rows),
            "counts": self.counts(),
            "counts_by_column": self.counts_by_column(),
            "present": self.present,
            "problems": [
                {
                    "row": p.row,
                    "where": self.where(p.row),
                    "column": p.column,
                    "kind": p.kind,
                    "message": p.message,
                }
                for p in self.problems
            ],
        }

    def write(self, path: str | Path) -> Path:
        """Write the report as JSON (``.json``) or one problem per CSV line (``.csv``)."""
        path = Path(path)
        if path.suffix.lower() == ".csv":
            with atomic_path(path) as tmp, tmp.open("w", newline="", encoding="utf-8") as f:
                writer = csv.writer(f)
                writer.writerow(["row", "where", "column", "kind", "message"])
                for p in self.problems:
                    writer.writerow([p.row, self.where(p.row), p.column, p.kind, p.message])
        else:
            atomic_write_json(path, self.to_dict(), ensure_ascii=False)
        return path


class BadRowsError(ValueError):
    """Raised by the ``fail`` policy; carries the whole report."""

    def __init__(self, report: ValidationReport, source: str = "manifest") -> None:
        self.report = report
        detail = "\n".join(f"  {line}" for line in report.lines(limit=20))
        super().__init__(f"{source}: {report.summary()}\n{detail}")


@dataclass(frozen=True)
class Limits:
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_audio_seconds: float = DEFAULT_MAX_DECODE_SECONDS


def check_value(
    column: Column, value: Any, manifest: Manifest, limits: Limits = Limits()
) -> tuple[str, str] | None:
    """``None`` if ``value`` is usable for ``column``, else ``(kind, message)``. Never raises for
    bad data; opens a file only after its path is known to stay under the root."""
    modality = column.modality
    try:
        if modality is Modality.TEXT:
            if isinstance(value, str) and not value.strip():
                return "empty_text", "empty text"
            normalize_text(value)
        elif modality is Modality.TABULAR:
            to_float(value)
        elif modality is Modality.LABEL:
            if column.classes is not None and str(value) not in column.classes:
                shown = ", ".join(column.classes[:10]) + (
                    " ..." if len(column.classes) > 10 else ""
                )
                return "unknown_label", f"label {value!r} is not one of the classes ({shown})"
        else:
            try:
                path = manifest.resolve(value)
            except PathOutsideRoot as err:
                return "outside_root", str(err)
            if not path.is_file():
                return "missing_file", f"{value!r} not found under {manifest.root}"
            if modality is Modality.IMAGE:
                decode_image(path, max_pixels=limits.max_pixels)
            elif modality is Modality.AUDIO:
                decode_audio(path, max_seconds=limits.max_audio_seconds)
            elif modality is Modality.GRAPH:
                load_graph(path)
    except DecodeError as err:
        kind = {
            Modality.TEXT: "bad_text",
            Modality.TABULAR: "bad_number",
        }.get(modality, "undecodable")
        if modality.is_file:  # name the file: the row alone does not say which one is broken
            return kind, f"{value}: {err}"
        return kind, str(err)
    return None


def validate_manifest(
    manifest: Manifest,
    schema: Schema,
    limits: Limits = Limits(),
    progress: bool = False,
) -> ValidationReport:
    """Check every schema column of every row. Missing values in optional columns are fine, and
    so is an optional column the manifest lacks altogether (missing in every row)."""
    absent = [c.name for c in schema if c.name not in manifest.columns and c.required]
    if absent:
        raise ValueError(
            f"schema columns not in the manifest: {absent} (it has {manifest.columns})"
        )
    report = ValidationReport(n_rows=len(manifest), where=manifest.describe_row)
    report.present = {c.name: 0 for c in schema}
    records = manifest.frame[[n for n in schema.names if n in manifest.columns]].to_dict("records")
    rows = _progress(records, "validating", progress)
    for i, record in enumerate(rows):
        for column in schema:
            value = record.get(column.name)
            if is_missing(value):
                if column.required:
                    kind = "empty_text" if column.modality is Modality.TEXT else "missing_value"
                    report.problems.append(Problem(i, column.name, kind, "required value is empty"))
                continue
            found = check_value(column, value, manifest, limits)
            if found is None:
                report.present[column.name] += 1
            else:
                report.problems.append(Problem(i, column.name, *found))
    return report


def apply_policy(
    manifest: Manifest, report: ValidationReport, on_bad_row: OnBadRow = "fail"
) -> Manifest:
    """``fail``: raise BadRowsError if any row is bad. ``skip``: the manifest without bad rows."""
    if on_bad_row not in ("skip", "fail"):
        raise ValueError(f"on_bad_row must be 'skip' or 'fail', got {on_bad_row!r}")
    if report.ok:
        return manifest
    if on_bad_row == "fail":
        raise BadRowsError(report, str(manifest.path or "manifest"))
    bad = set(report.bad_rows)
    return manifest.subset([i for i in range(len(manifest)) if i not in bad])


def _progress(items: list, description: str, enabled: bool):
    if not enabled or len(items) < 200:
        return items
    from rich.progress import track

    return track(items, description=description, total=len(items), transient=True)
