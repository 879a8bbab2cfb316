"""Tasks as plug-ins: one module per task and one registry (``tasks.registry``) that says, per
task, its predictor, serving adapter, config, ONNX runtime model, exporter and capabilities.

    from modalforge import tasks

    predictor = tasks.load("runs/emoji/bundle")          # whatever task the bundle holds
    tasks.for_bundle(predictor.bundle).can("embed")      # what it can do
    tasks.get("contrastive").resolve("predictor")        # the class, imported on demand

Importing this package imports no task module: entries name their classes as strings.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from modalforge.tasks.registry import (
    TASKS,
    TaskSpec,
    for_bundle,
    get,
    implied_task,
    list_tasks,
    spec_for,
    trainable,
    with_capability,
)


def load(
    path: str | Path,
    variant: str = "pytorch",
    cache_dir: str | Path | None = None,
    device: str | None = None,
    kind: type | None = None,
) -> Any:
    """The predictor of the bundle at ``path`` (weights verified by hash), of whatever task it
    holds. ``variant``: the trained weights (``pytorch``) or a PyTorch variant ``modalforge
    export`` added -- other weights for the same model (format ``safetensors``, e.g. pruned) or a
    model of its own stored as a bundle inside the bundle (format ``bundle``, a distilled
    student). ONNX variants run through ``modalforge.runtime.Engine.from_bundle``. ``kind``: the
    class the caller needs (a bundle of another kind is refused, naming what to use)."""
    from modalforge.bundle import BundleError, load_bundle

    bundle = load_bundle(path)
    spec = for_bundle(bundle)
    cls = spec.resolve("predictor")
    if kind is not None and not issubclass(cls, kind):
        raise BundleError(f"{path}: a {spec.summary} bundle: load it with modalforge.tasks.load "
                          f"(it is a {cls.__module__}.{cls.__qualname__})")  # fmt: skip
    if variant != "pytorch":
        found = bundle.variants.get(variant)
        if found is None:
            raise BundleError(f"{path}: no variant {variant!r} (it has {sorted(bundle.variants)})")
        if found["format"] == "bundle":
            return load(bundle.path / found["folder"], cache_dir=cache_dir, device=device,
                        kind=kind)  # fmt: skip
        if found["format"] != "safetensors":
            raise BundleError(
                f"{path}: variant {variant!r} is {found['format']!r}, not PyTorch weights: "
                "run it with Engine.from_bundle or modalforge serve --variant"
            )
    return cls.from_bundle(bundle, variant=variant, cache_dir=cache_dir, device=device)


__all__ = [
    "TASKS",
    "TaskSpec",
    "for_bundle",
    "get",
    "implied_task",
    "list_tasks",
    "load",
    "spec_for",
    "trainable",
    "with_capability",
]
