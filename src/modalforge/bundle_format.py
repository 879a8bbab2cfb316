"""The bundle format's rules: names, the error type, manifest checks and JSON conversion.

:mod:`modalforge.bundle` is the public module (the :class:`~modalforge.bundle.Bundle` class,
``save_bundle``, ``add_variant``, ``load_bundle``, ``write_weights``) and re-exports every name
defined here. This module holds what those functions share and that writes nothing to disk:
the format constants (file names, format version, pickle suffixes, recorded packages),
:class:`BundleError`, the validation of a parsed ``modalforge.json`` (:func:`_validate_meta`),
the conversion of configs / metrics / assets to plain JSON, the checks on bundle-relative
paths, the preparation of tensors for safetensors, provenance and file hashing. The durable,
atomic writes stay in :mod:`modalforge.bundle`.

It never imports :mod:`modalforge.bundle`.
"""

from __future__ import annotations

import datetime as _dt
import importlib.metadata
import json
import math
import platform
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path, PurePosixPath
from typing import Any

import torch

from modalforge.files import sha256_file
from modalforge.schema import Schema, SchemaError

BUNDLE_FORMAT_VERSION = 1
MANIFEST_NAME = "modalforge.json"
WEIGHTS_NAME = "model.safetensors"
#: the variant written by :func:`save_bundle`: the original trained weights
ORIGINAL_VARIANT = "pytorch"
#: file suffixes that usually hold pickles; only allowed as files of a declared variant
PICKLE_SUFFIXES = frozenset({".pt", ".pth", ".pkl", ".pickle", ".bin", ".ckpt", ".joblib"})
#: the packages whose versions are recorded in ``provenance.versions`` (when installed)
RECORDED_PACKAGES = (
    "modalforge",
    "torch",
    "transformers",
    "safetensors",
    "lightning",
    "numpy",
    "onnx",
    "onnxruntime",
    "torch_geometric",
)

_REQUIRED_KEYS = ("format_version", "task", "schema", "model_config", "variants", "files")
_VARIANT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class BundleError(ValueError):
    """A bundle that cannot be written, read or trusted; the message names the file at fault."""

    def __init__(self, message: str, problems: Sequence[str] = ()) -> None:
        super().__init__(message)
        #: one line per problem found (verification collects them all before raising)
        self.problems: list[str] = list(problems) or [message]


# -- checking a manifest ---------------------------------------------------------------------


def _validate_meta(meta: Any, manifest: Path) -> None:
    def fail(problem: str) -> BundleError:
        return BundleError(f"{manifest}: {problem}")

    if not isinstance(meta, dict):
        raise fail(f"expected a JSON object at the top, got {type(meta).__name__}")
    if "format_version" not in meta:
        raise fail("missing required key 'format_version'")
    version = meta["format_version"]
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise fail(
            f"unknown format_version {version!r} "
            f"(this modalforge reads versions 1 to {BUNDLE_FORMAT_VERSION})"
        )
    if version > BUNDLE_FORMAT_VERSION:
        raise fail(
            f"format_version {version} is newer than this modalforge reads "
            f"({BUNDLE_FORMAT_VERSION}); upgrade modalforge to load this bundle"
        )
    missing = [k for k in _REQUIRED_KEYS if k not in meta]
    if missing:
        raise fail(f"missing required keys {missing}")
    if not isinstance(meta["task"], str) or not meta["task"]:
        raise fail(f"'task' must be a non-empty string, got {meta['task']!r}")
    try:
        schema = Schema.from_dict(meta["schema"])
    except SchemaError as err:
        raise fail(f"bad 'schema': {err}") from err
    label_column = meta.get("label_column")
    if label_column is not None and label_column not in schema:
        raise fail(f"label_column {label_column!r} is not in the schema")
    labels = meta.get("labels")
    if labels is not None and not (
        isinstance(labels, list) and all(isinstance(x, str) for x in labels)
    ):
        raise fail("'labels' must be a list of class names")
    for key in ("model_config", "metrics", "extra", "provenance"):
        if key in meta and not isinstance(meta[key], dict):
            raise fail(f"'{key}' must be an object")

    files = meta["files"]
    if not isinstance(files, dict):
        raise fail("'files' must be an object of path -> {sha256, bytes}")
    for name, entry in files.items():
        _check_relpath(name, f"{manifest}: 'files'")
        if name == MANIFEST_NAME:
            raise fail(f"'files' lists {MANIFEST_NAME} itself")
        if not (
            isinstance(entry, dict)
            and isinstance(entry.get("sha256"), str)
            and _SHA256.match(entry["sha256"])
            and isinstance(entry.get("bytes"), int)
            and entry["bytes"] >= 0
        ):
            raise fail(f"'files' entry for {name!r} needs a 'sha256' hex digest and 'bytes'")

    variants = meta["variants"]
    if not isinstance(variants, dict) or ORIGINAL_VARIANT not in variants:
        raise fail(f"'variants' must be an object holding the {ORIGINAL_VARIANT!r} variant")
    for vname, spec in variants.items():
        if not (
            isinstance(spec, dict)
            and isinstance(spec.get("files"), list)
            and all(isinstance(f, str) for f in spec["files"])
        ):
            raise fail(f"variant {vname!r} needs a 'files' list")
        unlisted = [f for f in spec["files"] if f not in files]
        if unlisted:
            raise fail(f"variant {vname!r} names files not in 'files': {unlisted}")
    assets = meta.get("assets", [])
    if not isinstance(assets, list) or any(a not in files for a in assets):
        raise fail("'assets' must be a list of names that are in 'files'")


# -- JSON, paths, tensors, provenance, hashes ------------------------------------------------


def _prepare_tensors(state_dict: Mapping[str, torch.Tensor], where: Path) -> dict[str, Any]:
    """CPU, contiguous, detached tensors; the second and later tensors on one storage are
    cloned, because safetensors refuses to write tensors that share memory."""
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for key, value in state_dict.items():
        if not isinstance(key, str):
            raise BundleError(f"{where}: state_dict key {key!r} is not a string")
        if not isinstance(value, torch.Tensor):
            raise BundleError(
                f"{where}: state_dict[{key!r}] is a {type(value).__name__}, not a tensor"
            )
        if value.is_meta:
            raise BundleError(f"{where}: state_dict[{key!r}] is on the meta device (no data)")
        if value.layout is not torch.strided:
            raise BundleError(f"{where}: state_dict[{key!r}] is sparse; densify it first")
        tensor = value.detach().to("cpu").contiguous()
        ptr = tensor.untyped_storage().data_ptr()
        if ptr and tensor.untyped_storage().nbytes():
            if ptr in seen:
                tensor = tensor.clone()
                ptr = tensor.untyped_storage().data_ptr()
            seen.add(ptr)
        out[key] = tensor
    return out


def _to_json(value: Any, where: str, path: Path, *, nonfinite_to_null: bool = False) -> Any:
    """A plain-JSON copy of ``value`` (dicts with string keys, lists, str, int, float, bool,
    None); 0-d tensors and numpy scalars become numbers. Anything else is a BundleError."""
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, str):
        return str(value)
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            if nonfinite_to_null:
                return None
            raise BundleError(f"{path}: {where} is {value}; JSON cannot hold NaN or infinity")
        return float(value)
    if isinstance(value, Mapping):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise BundleError(f"{path}: {where} has a non-string key {k!r}")
            out[str(k)] = _to_json(v, f"{where}[{k!r}]", path, nonfinite_to_null=nonfinite_to_null)
        return out
    if isinstance(value, list | tuple):
        return [
            _to_json(v, f"{where}[{i}]", path, nonfinite_to_null=nonfinite_to_null)
            for i, v in enumerate(value)
        ]
    if getattr(value, "ndim", None) == 0 and hasattr(value, "item"):  # 0-d tensor, numpy scalar
        return _to_json(value.item(), where, path, nonfinite_to_null=nonfinite_to_null)
    raise BundleError(f"{path}: {where} is a {type(value).__name__}, which is not JSON")


def _parse_schema(data: Any, where: str) -> Schema:
    try:
        return Schema.from_dict(data)
    except SchemaError as err:
        raise BundleError(f"{where}: {err}") from err


def _check_relpath(name: Any, where: str) -> None:
    """A bundle-relative POSIX path without '..', absolute parts or backslashes."""
    ok = isinstance(name, str) and name and "\\" not in name and "\x00" not in name
    if ok:
        parts = PurePosixPath(name).parts
        ok = (
            not PurePosixPath(name).is_absolute()
            and all(p not in ("..", ".") for p in parts)
            and "/".join(parts) == name
        )
    if not ok:
        raise BundleError(f"{where}: {name!r} is not a plain relative path inside the bundle")


def _check_no_nested_clash(names: Iterable[str], where: str) -> None:
    """No name may be both a file and a folder ("a.json" and "a.json/b.json")."""
    names = set(names)
    for name in names:
        parents = {str(p) for p in PurePosixPath(name).parents if str(p) != "."}
        clash = parents & names
        if clash:
            raise BundleError(f"{where}: {name!r} would sit inside the file {sorted(clash)[0]!r}")


def _ordered(meta: dict[str, Any]) -> dict[str, Any]:
    """Top-level keys sorted; values (schema column order, configs) kept as given."""
    return {k: meta[k] for k in sorted(meta)}


def _dumps(value: Any) -> str:
    return json.dumps(value, indent=2, ensure_ascii=False, allow_nan=False) + "\n"


def _provenance() -> dict[str, Any]:
    versions = {"python": platform.python_version()}
    for package in RECORDED_PACKAGES:
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            continue
    return {
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "platform": platform.platform(terse=True),
        "versions": dict(sorted(versions.items())),
    }


def _file_entry(path: Path) -> dict[str, Any]:
    return {"bytes": path.stat().st_size, "sha256": sha256_file(path)}
