"""Infer a Schema from a manifest: file extensions, column dtypes, then the files' first bytes."""

from __future__ import annotations

import pandas as pd
from pandas.api import types as ptypes

from modalforge.data.manifest import Manifest, PathOutsideRoot, is_missing
from modalforge.data.sniff import modality_from_name, sniff_file
from modalforge.schema import Column, Modality, Schema

# Columns that describe a row rather than feed a model; never typed unless declared.
METADATA_COLUMNS = frozenset({"id", "uid", "key", "group", "split", "fold", "source", "license"})
LABEL_COLUMNS = frozenset({"label", "labels", "class", "target", "y"})
AGREEMENT = 0.8  # share of non-missing values that must agree on a file modality


def _file_modality(values: pd.Series, manifest: Manifest, sample: int) -> Modality | None:
    """The modality most values point at, by extension first and by content second."""
    strings = [str(v) for v in values]
    by_name = [modality_from_name(s) for s in strings]
    for modality in (Modality.IMAGE, Modality.AUDIO, Modality.GRAPH):
        if sum(m is modality for m in by_name) >= AGREEMENT * len(strings):
            return modality
    sniffed: list[Modality | None] = []
    for s in strings[:sample]:
        try:
            path = manifest.resolve(s)
        except PathOutsideRoot:
            sniffed.append(None)
            continue
        sniffed.append(sniff_file(path) if path.is_file() else None)
    for modality in (Modality.IMAGE, Modality.AUDIO, Modality.GRAPH):
        if sniffed and sum(m is modality for m in sniffed) >= AGREEMENT * len(sniffed):
            return modality
    return None


def _looks_categorical(values: pd.Series) -> bool:
    """Few distinct short values, each repeated: a class column rather than free text."""
    n = len(values)
    if n < 20:
        return False
    n_unique = values.astype(str).nunique()
    mean_words = values.astype(str).str.split().str.len().mean()
    return n_unique <= min(200, 0.2 * n) and mean_words <= 4


def infer_column(
    name: str, series: pd.Series, manifest: Manifest, sample: int = 64
) -> Column | None:
    """Type one column, or None when it is metadata or holds no values to judge by."""
    values = series[[not is_missing(v) for v in series]]
    required = len(values) == len(series)
    if name.lower() in LABEL_COLUMNS:
        return Column(name, Modality.LABEL, required)
    if name.lower() in METADATA_COLUMNS or name.startswith("_") or values.empty:
        return None
    if ptypes.is_bool_dtype(series) or ptypes.is_numeric_dtype(series):
        return Column(name, Modality.TABULAR, required)
    if all(isinstance(v, dict | list) for v in values[:sample]):
        return None  # nested JSON that is not a graph file: nothing we can type
    modality = _file_modality(values, manifest, sample)
    if modality is not None:
        return Column(name, modality, required)
    if _looks_categorical(values):
        return Column(name, Modality.LABEL, required)
    return Column(name, Modality.TEXT, required)


def infer_schema(
    manifest: Manifest,
    label: str | None = None,
    declared: Schema | None = None,
    sample: int = 64,
) -> Schema:
    """A Schema for ``manifest``. Declared columns win; ``label`` forces that column to a label."""
    declared = declared or Schema()
    missing = [c.name for c in declared if c.name not in manifest.columns]
    if missing:
        raise ValueError(f"declared columns not in the manifest: {missing}")
    if label is not None and label not in manifest.columns:
        raise ValueError(
            f"label column {label!r} not in the manifest (columns: {manifest.columns})"
        )
    columns: list[Column] = []
    for name in manifest.columns:
        if name in declared:
            columns.append(declared[name])
            continue
        if name == label:
            required = not any(is_missing(v) for v in manifest.frame[name])
            columns.append(Column(name, Modality.LABEL, required))
            continue
        column = infer_column(name, manifest.frame[name], manifest, sample)
        if column is not None:
            columns.append(column)
    return Schema(tuple(columns))
