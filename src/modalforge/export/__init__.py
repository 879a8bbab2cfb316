"""Export variants of a bundle, each checked against the PyTorch model before it is added.

    report = export_bundle("runs/demo/bundle", manifest, label="category")   # adds "onnx"

Which exporter runs is the bundle's task's (``tasks.registry``): ``variants`` writes a
classifier's or a contrastive model's graphs (``onnx.py``), ``caption`` a captioner's;
``modalforge.runtime`` runs them behind the model surface the engine uses, ``parity.py``
compares and gates. A variant that fails its gate is not added: ``ParityGateError`` says which
numbers broke which rule. ``compress`` adds PyTorch variants (pruned, distilled).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from modalforge.export.parity import GATES, Gate, ParityGateError, compare, gate
from modalforge.export.variants import MIN_COSINE, SCHEMES
from modalforge.tasks.registry import ONNX


def export_bundle(
    bundle: str | Path,
    manifest,
    label: str | None = None,
    name: str = "onnx",
    rule: Gate | None = None,
    overwrite: bool = False,
    quantize: str | None = None,
    calibration=None,
) -> dict[str, Any]:
    """Export ``bundle`` to ONNX, compare it with PyTorch on ``manifest`` (held-out rows), and
    add it as variant ``name`` when it passes ``rule`` (default: the task's gate -- fp32, int8
    with ``quantize``, embeddings for a contrastive model, captions for a captioner). With
    ``quantize`` each encoder gets its preferred int8 graph; while the whole variant fails the
    gate, the encoder furthest from fp32 falls back to its next option (in the end fp32); an
    exporter whose graphs have no int8 form refuses ``quantize``.
    Returns the variant's metadata, parity included; raises ParityGateError when the gate
    fails."""
    from modalforge.bundle import load_bundle
    from modalforge.tasks import for_bundle

    spec = for_bundle(load_bundle(bundle, verify=False))
    if not spec.can(ONNX):
        raise ValueError(f"{bundle}: a {spec.summary} bundle has no ONNX export")
    exporter = spec.resolve("exporter")
    return exporter(bundle, manifest, label=label, name=name, rule=rule, overwrite=overwrite,
                    quantize=quantize, calibration=calibration)  # fmt: skip


__all__ = [
    "GATES",
    "MIN_COSINE",
    "SCHEMES",
    "Gate",
    "ParityGateError",
    "compare",
    "export_bundle",
    "gate",
]
