"""Column types of a manifest, and the Schema that travels from data to a running service.

A Schema maps manifest columns to a modality (``image | text | audio | graph | tabular | label``)
and says whether each is required. It is inferred from a manifest, declared in YAML, or given on
the command line as ``name=type`` (a trailing ``?`` marks a column optional).
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class Modality(enum.StrEnum):
    IMAGE = "image"
    TEXT = "text"
    AUDIO = "audio"
    GRAPH = "graph"
    TABULAR = "tabular"
    LABEL = "label"

    @property
    def is_file(self) -> bool:
        """Whether values of this type are paths to files under the manifest's root."""
        return self in (Modality.IMAGE, Modality.AUDIO, Modality.GRAPH)


class SchemaError(ValueError):
    """A schema that cannot be parsed or does not fit its manifest."""


@dataclass(frozen=True)
class Column:
    name: str
    modality: Modality
    required: bool = True
    # label columns only: the allowed classes, in order (None: whatever the data holds).
    classes: tuple[str, ...] | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"type": self.modality.value, "required": self.required}
        if self.classes is not None:
            out["classes"] = list(self.classes)
        return out

    @classmethod
    def from_spec(cls, name: str, spec: str | Mapping[str, Any]) -> Column:
        if isinstance(spec, str):
            spec = {"type": spec}
        if not isinstance(spec, Mapping) or "type" not in spec:
            raise SchemaError(f"column {name!r}: expected a type name or a mapping with 'type'")
        unknown = set(spec) - {"type", "required", "classes"}
        if unknown:
            raise SchemaError(f"column {name!r}: unknown keys {sorted(unknown)}")
        type_name = str(spec["type"])
        required = bool(spec.get("required", True))
        if type_name.endswith("?"):
            type_name, required = type_name[:-1], False
        try:
            modality = Modality(type_name)
        except ValueError:
            choices = ", ".join(m.value for m in Modality)
            raise SchemaError(
                f"column {name!r}: unknown type {type_name!r} (choose from {choices})"
            ) from None
        classes = spec.get("classes")
        if classes is not None:
            if modality is not Modality.LABEL:
                raise SchemaError(f"column {name!r}: 'classes' is only allowed on label columns")
            classes = tuple(str(c) for c in classes)
            if len(set(classes)) != len(classes):
                raise SchemaError(f"column {name!r}: 'classes' has duplicates")
        return cls(name=name, modality=modality, required=required, classes=classes)


@dataclass(frozen=True)
class Schema:
    columns: tuple[Column, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        names = [c.name for c in self.columns]
        dupes = {n for n in names if names.count(n) > 1}
        if dupes:
            raise SchemaError(f"columns declared twice: {sorted(dupes)}")

    def __getitem__(self, name: str) -> Column:
        for column in self.columns:
            if column.name == name:
                return column
        raise KeyError(name)

    def __contains__(self, name: object) -> bool:
        return any(c.name == name for c in self.columns)

    def __iter__(self):
        return iter(self.columns)

    def __len__(self) -> int:
        return len(self.columns)

    @property
    def names(self) -> list[str]:
        return [c.name for c in self.columns]

    def of(self, modality: Modality | str) -> list[Column]:
        modality = Modality(modality)
        return [c for c in self.columns if c.modality is modality]

    @property
    def inputs(self) -> list[Column]:
        """The model inputs: every column that is not a label, in sorted name order."""
        return sorted((c for c in self.columns if c.modality is not Modality.LABEL),
                      key=lambda c: c.name)  # fmt: skip

    def replace(self, column: Column) -> Schema:
        """A copy with ``column`` added or replacing the column of the same name."""
        kept = [c for c in self.columns if c.name != column.name]
        return Schema(tuple([*kept, column]))

    def select(self, names: Iterable[str]) -> Schema:
        wanted = list(names)
        missing = [n for n in wanted if n not in self]
        if missing:
            raise SchemaError(f"columns not in the schema: {missing}")
        return Schema(tuple(self[n] for n in wanted))

    # -- (de)serialization -------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {"columns": {c.name: c.to_dict() for c in self.columns}}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Schema:
        columns = data.get("columns", data) if isinstance(data, Mapping) else None
        if not isinstance(columns, Mapping) or not columns:
            raise SchemaError("a schema needs a non-empty 'columns' mapping of name -> type")
        return cls(tuple(Column.from_spec(str(n), s) for n, s in columns.items()))

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_yaml(cls, path: str | Path) -> Schema:
        path = Path(path)
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError) as err:
            raise SchemaError(f"{path}: cannot read schema: {err}") from err
        try:
            return cls.from_dict(data or {})
        except SchemaError as err:
            raise SchemaError(f"{path}: {err}") from err

    @classmethod
    def from_specs(cls, specs: Iterable[str]) -> Schema:
        """Parse CLI specs such as ``["image=image", "caption=text?", "category=label"]``;
        a spec may also hold several comma-separated pairs."""
        columns = []
        for spec in specs:
            for part in filter(None, (p.strip() for p in spec.split(","))):
                name, sep, type_name = part.partition("=")
                if not sep or not name.strip() or not type_name.strip():
                    raise SchemaError(
                        f"bad column spec {part!r}: expected NAME=TYPE (TYPE? = optional)"
                    )
                columns.append(Column.from_spec(name.strip(), type_name.strip()))
        return cls(tuple(columns))
