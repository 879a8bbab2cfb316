"""Export variants of a bundle, each checked against the PyTorch model before it is added.

    report = export_bundle("runs/demo/bundle", manifest, label="category")   # adds "onnx"

``onnx.py`` writes the graphs, ``runtime.py`` runs them with ONNX Runtime behind the model
surface the server uses, ``parity.py`` compares and gates. A variant that fails its gate is not
added: ``ParityGateError`` says which numbers broke which rule.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from modalforge.export.parity import GATES, Gate, compare, gate, request_fields


class ParityGateError(RuntimeError):
    def __init__(self, variant: str, problems: list[str], result: dict[str, Any]) -> None:
        super().__init__(f"variant {variant!r} failed its parity gate: " + "; ".join(problems))
        self.problems = problems
        self.result = result


def _examples(engine, manifest) -> dict[str, dict]:
    """Per input column, a collated batch of 3 real rows holding it (placeholders if fewer)."""
    out = {}
    rows = manifest.frame.to_dict("records") if manifest is not None else []
    for column in engine.inputs:
        items = []
        for row in rows:
            fields = request_fields(engine, manifest, row)
            if column.name in fields:
                items.append(engine.decode({column.name: fields[column.name]}).values[column.name])
            if len(items) == 3:
                break
        featurizer = engine.featurizers[column.name]
        while len(items) < 3:
            items.append(featurizer.placeholder())
        out[column.name] = featurizer.collate(items)
    return out


def export_bundle(
    bundle: str | Path,
    manifest,
    label: str | None = None,
    name: str = "onnx",
    rule: Gate | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Export ``bundle`` to ONNX, compare it with PyTorch on ``manifest`` (held-out rows), and
    add it as variant ``name`` when it passes ``rule`` (default: the fp32 gate). Returns the
    variant's metadata, parity included; raises ParityGateError when the gate fails."""
    from modalforge.bundle import add_variant
    from modalforge.export.onnx import export_onnx
    from modalforge.export.runtime import OrtModel
    from modalforge.predictor import MultimodalPredictor
    from modalforge.serve.engine import Engine

    rule = rule or GATES["fp32"]
    predictor = MultimodalPredictor.load(bundle)
    reference = Engine(predictor, device="cpu")
    reference.tune()
    with tempfile.TemporaryDirectory(prefix="modalforge-export-") as tmp:
        start = time.perf_counter()
        files, info = export_onnx(predictor.model, _examples(reference, manifest), Path(tmp))
        info["export_seconds"] = round(time.perf_counter() - start, 2)
        candidate = Engine(
            predictor, device="cpu", variant=name, model=OrtModel(predictor.model, Path(tmp), info)
        )
        result = compare(reference, candidate, manifest, label)
        problems = gate(result, rule)
        info["parity"] = {**result, "gate": asdict(rule), "passed": not problems}
        if problems:
            raise ParityGateError(name, problems, result)
        add_variant(bundle, name, files, info, overwrite=overwrite)
    return info


__all__ = ["GATES", "Gate", "ParityGateError", "compare", "export_bundle", "gate"]
