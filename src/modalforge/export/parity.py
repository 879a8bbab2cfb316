"""The parity gate: a variant against the PyTorch model on held-out rows.

    result = compare(reference_engine, variant_engine, manifest, label="category")
    problems = gate(result, GATES["fp32"])      # [] when the variant may ship

Both engines decode the same rows with the same preprocessing; the comparison is on the head's
logits (max abs difference), on the predicted class (agreement), and, where the rows have labels,
on accuracy and macro-F1 (the deltas). Defaults: fp32 variants must agree on >= 99.9 % of rows;
int8 and pruned variants may lose at most 1 point of macro-F1, distilled students 5 points.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from modalforge.data.manifest import Manifest, is_missing, resolve_path
from modalforge.schema import Modality


class ParityGateError(RuntimeError):
    def __init__(self, variant: str, problems: list[str], result: dict[str, Any],
                 info: dict[str, Any] | None = None) -> None:  # fmt: skip
        super().__init__(f"variant {variant!r} failed its parity gate: " + "; ".join(problems))
        self.problems = problems
        self.result = result
        self.info = info or {}  # the variant's metadata (quantization reports, ...)


@dataclass(frozen=True)
class Gate:
    min_agreement: float | None = None  # share of rows with the same predicted class
    max_f1_drop: float | None = None  # macro-F1 points (0.01 = 1 point) the variant may lose
    max_logit_diff: float | None = None


GATES = {
    "fp32": Gate(min_agreement=0.999),
    "int8": Gate(max_f1_drop=0.01),
    "pruned": Gate(max_f1_drop=0.01),
    # a smaller model of its own: it trades some accuracy for speed by design
    "distilled": Gate(max_f1_drop=0.05),
    # a contrastive model's fp32 towers: its "logits" are the embeddings (unit length)
    "embeddings": Gate(max_logit_diff=1e-4),
}


def request_fields(engine, manifest: Manifest, row: dict[str, Any]) -> dict[str, Any]:
    """A manifest row -> the fields a request would carry (file columns read as bytes)."""
    fields = {}
    for column in engine.inputs:
        value = row.get(column.name)
        if is_missing(value):
            continue
        if column.modality in (Modality.IMAGE, Modality.AUDIO):
            value = resolve_path(manifest.root, value).read_bytes()
        fields[column.name] = value
    return fields


def compare(
    reference, candidate, manifest: Manifest, label: str | None = None, batch_size: int = 32
) -> dict[str, Any]:
    """Logits of both engines on every row of ``manifest`` -> parity numbers."""
    from sklearn.metrics import accuracy_score, f1_score

    rows = manifest.frame.to_dict("records")
    ref, cand, kept = [], [], []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        samples = [reference.decode(request_fields(reference, manifest, r)) for r in chunk]
        if candidate.predictor is not reference.predictor:  # a model of its own (distilled):
            # its own inputs and preprocessing
            theirs = [candidate.decode(request_fields(candidate, manifest, r)) for r in chunk]
        else:
            theirs = samples
        ref.append(reference.outputs(samples))
        cand.append(candidate.outputs(theirs))
        kept.extend(chunk)
    a, b = np.concatenate(ref), np.concatenate(cand)
    result: dict[str, Any] = {
        "rows": len(a),
        "max_abs_logit_diff": float(np.abs(a - b).max()),
        "mean_abs_logit_diff": float(np.abs(a - b).mean()),
    }
    if reference.labels:  # a classifier: compare predicted classes (and scores, with labels)
        pa, pb = a.argmax(1), b.argmax(1)
        result["agreement"] = float((pa == pb).mean())
        if label is not None and label in manifest.frame:
            index = {c: i for i, c in enumerate(reference.labels)}
            y = np.array([index.get(str(r[label]), -1) for r in kept])
            known = y >= 0
            for name, pred in (("reference", pa), ("variant", pb)):
                result[f"{name}_accuracy"] = float(accuracy_score(y[known], pred[known]))
                result[f"{name}_f1_macro"] = float(
                    f1_score(
                        y[known],
                        pred[known],
                        average="macro",
                        labels=list(range(len(index))),
                        zero_division=0,
                    )
                )
            result["f1_macro_drop"] = result["reference_f1_macro"] - result["variant_f1_macro"]
            result["accuracy_drop"] = result["reference_accuracy"] - result["variant_accuracy"]
    return result


def gate(result: dict[str, Any], rule: Gate) -> list[str]:
    """The ways ``result`` breaks ``rule`` (empty: it passes)."""
    problems = []
    agreement = result.get("agreement")
    if rule.min_agreement is not None and agreement is not None and agreement < rule.min_agreement:
        problems.append(f"prediction agreement {agreement:.4f} is below {rule.min_agreement:.4f}")
    if rule.max_f1_drop is not None:
        if "f1_macro_drop" not in result:
            problems.append("macro-F1 cannot be checked: the rows have no labels")
        elif result["f1_macro_drop"] > rule.max_f1_drop:
            problems.append(
                f"macro-F1 drops {100 * result['f1_macro_drop']:.2f} points "
                f"(allowed {100 * rule.max_f1_drop:.2f})"
            )
    if rule.max_logit_diff is not None and result["max_abs_logit_diff"] > rule.max_logit_diff:
        problems.append(
            f"max abs logit difference {result['max_abs_logit_diff']:.2e} exceeds "
            f"{rule.max_logit_diff:.2e}"
        )
    return problems
