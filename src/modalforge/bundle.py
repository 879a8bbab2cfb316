"""The Bundle: the one folder that everything downstream of training reads.

A bundle is a folder holding

* ``modalforge.json`` — the manifest: format version, task, schema, label map, model config
  (encoders with their preprocessing parameters, fusion, head), metrics, variants, provenance
  (creation time, package versions) and the sha256 + size of every other file in the bundle;
* ``model.safetensors`` — the trained weights (the ``"pytorch"`` variant);
* optional JSON assets (a word vocabulary, tabular statistics, ...) and export variants
  (``model.onnx``, ``model.int8.onnx``, ...) added later with :func:`add_variant`.

A bundle never contains pickles: weights are written and read with ``safetensors`` only (never
``torch.save`` / ``torch.load``), and :func:`load_bundle` refuses a folder holding ``*.pt``,
``*.pth``, ``*.pkl``, ``*.bin``, ... files that are not files of a declared variant.

Writes are atomic (through :mod:`modalforge.files`): :func:`save_bundle` builds the whole bundle
in a hidden temporary folder next to the target and swaps it into place; :func:`add_variant`
stages the variant's files under hidden names, drops the variant from ``modalforge.json`` first
when its files are about to be overwritten, renames the files in, then replaces
``modalforge.json`` in one ``os.replace``. A reader, or a rerun after ``kill -9``, therefore
sees the old bundle or variant, none, or the new one, never a half-written one or a manifest
whose sha256s do not match. (Neither function is safe against two writers changing the *same*
bundle at the same time.)

This is the public module: :class:`Bundle`, :func:`save_bundle`, :func:`add_variant`,
:func:`load_bundle`, :func:`write_weights` and the durable-write helpers live here. The format's
rules that these share — the constants (``MANIFEST_NAME``, ``BUNDLE_FORMAT_VERSION``,
``PICKLE_SUFFIXES``, ...), :class:`BundleError`, manifest validation, JSON conversion, path
checks, tensor preparation, provenance and hashing — live in :mod:`modalforge.bundle_format`
and are re-exported from here, so import them from ``modalforge.bundle`` as before.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from modalforge.bundle_format import (  # re-exported: these names were defined here
    _REQUIRED_KEYS,  # noqa: F401
    _SHA256,  # noqa: F401
    _VARIANT_NAME,
    BUNDLE_FORMAT_VERSION,
    MANIFEST_NAME,
    ORIGINAL_VARIANT,
    PICKLE_SUFFIXES,
    RECORDED_PACKAGES,  # noqa: F401
    WEIGHTS_NAME,
    BundleError,
    _check_no_nested_clash,
    _check_relpath,
    _dumps,
    _file_entry,
    _ordered,
    _parse_schema,
    _prepare_tensors,
    _provenance,
    _to_json,
    _validate_meta,
)
from modalforge.files import (
    atomic_dir,
    atomic_write_text,
    crash_point,
    fsync_file,
    remove_stale_temps,
    sha256_file,
    temp_name,
)
from modalforge.schema import Schema

# -- the Bundle ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Bundle:
    """A bundle folder and its parsed ``modalforge.json`` (``meta``), with typed accessors.

    Get one from :func:`load_bundle`, :func:`save_bundle` or :func:`add_variant`.
    """

    path: Path
    meta: dict[str, Any] = field(repr=False)

    # -- accessors ---------------------------------------------------------------------------
    @property
    def manifest_path(self) -> Path:
        return self.path / MANIFEST_NAME

    @property
    def format_version(self) -> int:
        return int(self.meta["format_version"])

    @property
    def task(self) -> str:
        """``"classification" | "regression" | "contrastive" | "caption" | "transcribe" | ...``
        (any non-empty string is accepted)."""
        return str(self.meta["task"])

    @property
    def schema(self) -> Schema:
        return Schema.from_dict(self.meta["schema"])

    @property
    def label_column(self) -> str | None:
        return self.meta.get("label_column")

    @property
    def labels(self) -> list[str]:
        """The class names; a class id is its index here. Empty for tasks without classes."""
        return list(self.meta.get("labels") or [])

    @property
    def model_config(self) -> dict[str, Any]:
        """Encoders per input column (name, kwargs, preprocessing), fusion, head, ..."""
        return self.meta["model_config"]

    @property
    def preprocessing(self) -> dict[str, dict[str, Any]]:
        """``{input column: preprocessing params}`` from ``model_config["preprocessing"]``: what
        the server needs to decode a request exactly as training did."""
        found = self.model_config.get("preprocessing") or {}
        if not isinstance(found, Mapping):
            return {}
        return {str(col): dict(p) for col, p in found.items() if isinstance(p, Mapping)}

    @property
    def metrics(self) -> dict[str, Any]:
        return self.meta.get("metrics") or {}

    @property
    def variants(self) -> dict[str, dict[str, Any]]:
        """``{name: {"files": [...], "format": ..., ...}}``; ``"pytorch"`` is the original."""
        return self.meta["variants"]

    @property
    def files(self) -> dict[str, dict[str, Any]]:
        """``{relative path: {"sha256": hex, "bytes": size}}`` for every file but the manifest."""
        return self.meta["files"]

    @property
    def assets(self) -> list[str]:
        """The names of the JSON side files (read them with :meth:`asset`)."""
        return list(self.meta.get("assets") or [])

    @property
    def provenance(self) -> dict[str, Any]:
        return self.meta.get("provenance") or {}

    @property
    def created(self) -> str | None:
        """When the bundle was written: ISO 8601, UTC."""
        return self.provenance.get("created")

    @property
    def versions(self) -> dict[str, str]:
        """``{"python": ..., "torch": ..., "modalforge": ..., ...}`` at the time of writing."""
        return dict(self.provenance.get("versions") or {})

    @property
    def extra(self) -> dict[str, Any]:
        """Free-form JSON given to :func:`save_bundle` as ``extra`` (run config, data hash...)."""
        return self.meta.get("extra") or {}

    # -- contents ----------------------------------------------------------------------------
    def variant_files(self, variant: str = ORIGINAL_VARIANT) -> list[Path]:
        """Absolute paths of a variant's files, in the order they were recorded."""
        if variant not in self.variants:
            raise BundleError(
                f"{self.manifest_path}: no variant {variant!r} "
                f"(the bundle has {sorted(self.variants)})"
            )
        return [self.path / name for name in self.variants[variant]["files"]]

    def state_dict(
        self, variant: str = ORIGINAL_VARIANT, device: str | torch.device = "cpu"
    ) -> dict[str, torch.Tensor]:
        """The weights of a safetensors variant as ``{name: tensor}`` (via safetensors, never
        pickle). Tensors that were tied when saved come back as separate, equal tensors; loading
        them into a model whose parameters are tied restores the tie."""
        paths = [p for p in self.variant_files(variant) if p.suffix == ".safetensors"]
        if not paths:
            fmt = self.variants[variant].get("format")
            raise BundleError(
                f"{self.manifest_path}: variant {variant!r} (format {fmt!r}) has no "
                ".safetensors file to load a state dict from"
            )
        out: dict[str, torch.Tensor] = {}
        for p in paths:
            try:
                part = load_file(p, device=str(device))
            except FileNotFoundError:
                raise BundleError(f"{p}: missing (listed in {MANIFEST_NAME})") from None
            except Exception as err:  # safetensors raises its own error types
                raise BundleError(f"{p}: cannot read safetensors weights: {err}") from err
            clash = sorted(set(part) & set(out))
            if clash:
                raise BundleError(f"{p}: tensors also found in another shard: {clash[:5]}")
            out.update(part)
        return out

    def asset(self, name: str) -> Any:
        """A JSON side file saved with ``save_bundle(..., assets={name: value})``."""
        if name not in self.assets:
            raise BundleError(
                f"{self.manifest_path}: no asset {name!r} (the bundle has {self.assets})"
            )
        path = self.path / name
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise BundleError(f"{path}: missing (listed in {MANIFEST_NAME})") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise BundleError(f"{path}: cannot read JSON asset: {err}") from err

    def verify(self) -> None:
        """Check every listed file's size and sha256; raise :class:`BundleError` naming each
        file that is missing or changed."""
        problems: list[str] = []
        for name, entry in self.files.items():
            path = self.path / name
            if not path.is_file():
                problems.append(f"{path}: missing (listed in {MANIFEST_NAME})")
                continue
            size = path.stat().st_size
            if size != entry["bytes"]:
                problems.append(
                    f"{path}: changed since the bundle was written "
                    f"(size {size} bytes, expected {entry['bytes']})"
                )
                continue
            digest = sha256_file(path)
            if digest != entry["sha256"]:
                problems.append(
                    f"{path}: changed since the bundle was written "
                    f"(sha256 {digest[:12]}…, expected {entry['sha256'][:12]}…)"
                )
        if problems:
            head = problems[0] if len(problems) == 1 else f"{len(problems)} files failed checks"
            raise BundleError(
                f"bundle {self.path} failed verification: {head}"
                + ("" if len(problems) == 1 else "\n  " + "\n  ".join(problems)),
                problems,
            )


# -- writing ---------------------------------------------------------------------------------


def save_bundle(
    path: str | os.PathLike[str],
    *,
    task: str,
    schema: Schema | Mapping[str, Any],
    label_column: str | None,
    labels: Sequence[str] | None,
    model_config: Mapping[str, Any],
    state_dict: Mapping[str, torch.Tensor],
    metrics: Mapping[str, Any] | None = None,
    extra: Mapping[str, Any] | None = None,
    assets: Mapping[str, Any] | None = None,
    overwrite: bool = False,
) -> Bundle:
    """Write a bundle folder at ``path`` and return it.

    ``state_dict`` goes to ``model.safetensors``: tensors are detached, moved to the CPU and made
    contiguous; a tensor sharing memory with one already written (tied weights such as an
    embedding reused as an output projection, or two views of one buffer) is *cloned*, since
    safetensors refuses to write shared storage. Loading gives separate tensors with equal
    values; ``model.load_state_dict`` copies them into the model's (still tied) parameters.

    ``metrics``: numbers (0-d tensors and numpy scalars are converted); a NaN or infinite metric
    is written as ``null`` (JSON has no NaN). ``extra``: any JSON. ``assets``: ``{"vocab.json":
    value}`` side files written as JSON inside the bundle and listed in ``files``.

    The bundle is built in a hidden temporary folder next to ``path`` and renamed into place.
    An existing bundle is only replaced with ``overwrite=True``; a folder that is not a bundle
    (and not empty) is never replaced.
    """
    path = Path(path)
    _check_target(path, overwrite)
    schema = schema if isinstance(schema, Schema) else _parse_schema(schema, "schema")
    if not isinstance(task, str) or not task:
        raise BundleError(f"{path}: task must be a non-empty string, got {task!r}")
    if label_column is not None and label_column not in schema:
        raise BundleError(
            f"{path}: label column {label_column!r} is not in the schema {schema.names}"
        )
    label_list = [str(x) for x in (labels or [])]
    if len(set(label_list)) != len(label_list):
        raise BundleError(f"{path}: labels have duplicates: {label_list}")
    if labels is not None and not label_list:  # [] is a mistake; no classes is None
        raise BundleError(f"{path}: labels is empty: a model with classes needs its labels "
                          "(class names); a model without them passes None")  # fmt: skip
    asset_values = dict(assets or {})
    for name in asset_values:
        _check_relpath(name, f"{path}: asset")
        if not name.endswith(".json"):
            raise BundleError(f"{path}: asset {name!r}: asset names must end in .json")
        if name in (MANIFEST_NAME, WEIGHTS_NAME):
            raise BundleError(f"{path}: asset {name!r}: that name is reserved")
    _check_no_nested_clash([*asset_values, MANIFEST_NAME, WEIGHTS_NAME], f"{path}: asset")

    tensors = _prepare_tensors(state_dict, path)
    meta_base: dict[str, Any] = {
        "format_version": BUNDLE_FORMAT_VERSION,
        "task": task,
        "schema": schema.to_dict(),
        "label_column": label_column,
        "labels": label_list,
        "model_config": _to_json(model_config, "model_config", path),
        "metrics": _to_json(metrics or {}, "metrics", path, nonfinite_to_null=True),
        "extra": _to_json(extra or {}, "extra", path),
        "assets": sorted(asset_values),
        "variants": {ORIGINAL_VARIANT: {"format": "safetensors", "files": [WEIGHTS_NAME]}},
        "provenance": _provenance(),
    }
    asset_json = {
        name: _dumps(_to_json(value, f"assets[{name!r}]", path))
        for name, value in asset_values.items()
    }

    # built in a hidden sibling folder, fsynced, then swapped in (modalforge.files.atomic_dir)
    with atomic_dir(path, point="bundle") as tmp:
        save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})  # as write_weights
        crash_point("bundle.weights")
        for name, text in asset_json.items():
            target = tmp / name
            target.parent.mkdir(parents=True, exist_ok=True)
            _write_text(target, text)
        files = {name: _file_entry(tmp / name) for name in [WEIGHTS_NAME, *asset_json]}
        meta = _ordered({**meta_base, "files": dict(sorted(files.items()))})
        _write_text(tmp / MANIFEST_NAME, _dumps(meta))
        _check_target(path, overwrite)  # again: it may have changed while we were writing
    return Bundle(path=path, meta=meta)


def add_variant(
    bundle: Bundle | str | os.PathLike[str],
    name: str,
    files: Mapping[str, Path | str | bytes],
    info: Mapping[str, Any],
    *,
    overwrite: bool = False,
) -> Bundle:
    """Add an export variant (ONNX, int8, pruned, ...) to a bundle and return the updated bundle.

    ``files``: ``{name inside the bundle: source path or bytes}``; ``info``: JSON describing the
    variant and must hold ``"format"`` (``"onnx"``, ``"onnx-int8"``, ``"safetensors"``...), plus
    anything else (opset, parity results, ...). The bundle is verified first. The original
    weights, the manifest, assets and other variants' files are never overwritten; an existing
    variant of the same name is replaced only with ``overwrite=True``.
    """
    # re-read from disk: the manifest may have changed since this Bundle object was made
    bundle = load_bundle(bundle.path if isinstance(bundle, Bundle) else bundle, verify=True)
    root = bundle.path
    where = f"{root}: variant {name!r}"
    if not isinstance(name, str) or not _VARIANT_NAME.match(name):
        raise BundleError(f"{where}: a variant name is letters, digits, '_', '.', '-'")
    if name == ORIGINAL_VARIANT:
        raise BundleError(f"{where}: that is the original model; it is never replaced")
    if name in bundle.variants and not overwrite:
        raise BundleError(f"{where}: exists already (pass overwrite=True to replace it)")
    if not files:
        raise BundleError(f"{where}: no files given")
    if not isinstance(info, Mapping):
        raise BundleError(f"{where}: info must be a mapping, got {type(info).__name__}")
    info = _to_json(info, f"variants[{name!r}]", root)
    if not isinstance(info.get("format"), str) or not info["format"]:
        raise BundleError(f"{where}: info needs a 'format' string (e.g. 'onnx')")
    if "files" in info:
        raise BundleError(f"{where}: 'files' in info is reserved (pass the files separately)")

    taken = {MANIFEST_NAME, *bundle.assets}
    for other, spec in bundle.variants.items():
        if other != name:
            taken.update(spec["files"])
    for fname in files:
        _check_relpath(fname, f"{where}: file")
        if fname in taken:
            raise BundleError(f"{where}: file {fname!r} belongs to the bundle already")
    old_files = set(bundle.variants.get(name, {}).get("files", []))
    _check_no_nested_clash([*taken, *old_files - set(files), *files], f"{where}: file")

    # Order, so that a crash anywhere leaves the old variant, no variant or the new one, and
    # never a manifest whose sha256s do not match the files: stage every file under a hidden
    # temporary name; if files the manifest lists are about to be overwritten, first drop the
    # variant from the manifest; rename the files in; then write the new manifest.
    for folder in {root, *((root / fname).parent for fname in files)}:
        remove_stale_temps(folder)
    staged: dict[str, Path] = {}
    try:
        for fname, source in files.items():
            target = root / fname
            target.parent.mkdir(parents=True, exist_ok=True)
            staged[fname] = tmp = temp_name(target)
            if isinstance(source, bytes | bytearray | memoryview):
                tmp.write_bytes(bytes(source))
            else:
                source = Path(source)
                if not source.is_file():
                    raise BundleError(f"{where}: source {source} is not a file")
                shutil.copyfile(source, tmp)
            fsync_file(tmp)
        entries = {fname: _file_entry(tmp) for fname, tmp in staged.items()}
        crash_point("variant.staged")
        if old_files & set(files):
            _write_manifest_atomic(root, _without_variant(bundle.meta, name))
        for fname, tmp in staged.items():
            os.replace(tmp, root / fname)
        staged.clear()
        crash_point("variant.files")
    except BaseException:
        for tmp in staged.values():
            tmp.unlink(missing_ok=True)
        raise

    meta = _without_variant(bundle.meta, name)
    meta["files"].update(entries)
    meta["files"] = dict(sorted(meta["files"].items()))
    created = _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")
    meta["variants"][name] = {**info, "files": list(files), "created": created}
    meta["variants"] = {
        ORIGINAL_VARIANT: meta["variants"][ORIGINAL_VARIANT],
        **{k: v for k, v in sorted(meta["variants"].items()) if k != ORIGINAL_VARIANT},
    }
    _write_manifest_atomic(root, meta)
    for stale in old_files - set(files):
        with contextlib.suppress(OSError):
            (root / stale).unlink()
    return Bundle(path=root, meta=meta)


# -- reading ---------------------------------------------------------------------------------


def load_bundle(path: str | os.PathLike[str], verify: bool = True) -> Bundle:
    """Read and check a bundle folder.

    Raises :class:`BundleError` (naming the file and the problem) when ``path`` is not a folder,
    ``modalforge.json`` is missing, not valid JSON, of an unknown or newer format version, or
    lacks required keys; when the folder holds pickle-like files (``*.pt``, ``*.pkl``, ...) that
    are not files of a declared variant; and, with ``verify=True``, when any listed file is
    missing or its size / sha256 changed.
    """
    path = Path(path)
    if not path.exists():
        raise BundleError(f"{path}: no such bundle folder")
    if not path.is_dir():
        raise BundleError(f"{path}: not a folder (a bundle is a folder holding {MANIFEST_NAME})")
    manifest = path / MANIFEST_NAME
    if not manifest.is_file():
        raise BundleError(f"{manifest}: missing; {path} is not a modalforge bundle")
    try:
        text = manifest.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise BundleError(f"{manifest}: cannot read: {err}") from err
    try:
        meta = json.loads(text)
    except json.JSONDecodeError as err:
        raise BundleError(
            f"{manifest}: invalid JSON at line {err.lineno} column {err.colno}: {err.msg}"
        ) from err
    _validate_meta(meta, manifest)
    bundle = Bundle(path=path, meta=meta)
    _refuse_pickles(bundle)
    if verify:
        bundle.verify()
    return bundle


def _refuse_pickles(bundle: Bundle) -> None:
    allowed = {f for spec in bundle.variants.values() for f in spec["files"]}
    found = sorted(
        p.relative_to(bundle.path).as_posix()
        for p in bundle.path.rglob("*")
        if p.suffix.lower() in PICKLE_SUFFIXES and not p.is_dir()
    )
    bad = [f for f in found if f not in allowed]
    if bad:
        listed = ", ".join(str(bundle.path / f) for f in bad)
        raise BundleError(
            f"{listed}: pickle-like file in bundle {bundle.path} that is no declared variant; "
            "a bundle never contains pickles (remove it, or save weights as safetensors)",
            [f"{bundle.path / f}: pickle-like file not declared as a variant" for f in bad],
        )


# -- helpers ---------------------------------------------------------------------------------


def _check_target(path: Path, overwrite: bool) -> None:
    if path.is_symlink() or (path.exists() and not path.is_dir()):
        raise BundleError(f"{path}: exists and is not a folder; refusing to replace it")
    if path.is_dir():
        if (path / MANIFEST_NAME).is_file():
            if not overwrite:
                raise BundleError(
                    f"{path}: a bundle exists already (pass overwrite=True to replace it)"
                )
        elif any(path.iterdir()):
            raise BundleError(
                f"{path}: a non-empty folder that is not a bundle; refusing to replace it"
            )


def _without_variant(meta: dict[str, Any], name: str) -> dict[str, Any]:
    """A deep copy of a bundle manifest without variant ``name`` and its files."""
    meta = json.loads(json.dumps(meta))
    for stale in meta["variants"].pop(name, {}).get("files", []):
        meta["files"].pop(stale, None)
    return meta


def _write_manifest_atomic(root: Path, meta: dict[str, Any]) -> None:
    atomic_write_text(root / MANIFEST_NAME, _dumps(meta), point="variant.manifest")


def write_weights(state_dict: Mapping[str, torch.Tensor], path: str | os.PathLike[str]) -> Path:
    """A state dict as a safetensors file the way bundles store weights (e.g. a variant's)."""
    path = Path(path)
    save_file(_prepare_tensors(state_dict, path), str(path), metadata={"format": "pt"})
    return path


def _write_text(path: Path, text: str) -> None:
    """A bundle file inside ``atomic_dir``'s folder (which fsyncs every file before the swap)."""
    path.write_text(text, encoding="utf-8")
