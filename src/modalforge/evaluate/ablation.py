"""How much each modality matters: predict with modalities removed, and summarize fusion weights.

The model is not known here: the caller passes ``predict_fn(drop)``, which predicts the whole
evaluation set with the modalities in ``drop`` masked as missing, the same way a sample with a
missing value is seen at serving time.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch

from modalforge.evaluate._convert import ArrayLike, as_labels, as_probs, to_tensor
from modalforge.evaluate.metrics import accuracy_macro_f1

AblationMetric = Literal["accuracy", "macro_f1"]
PredictFn = Callable[[set[str]], ArrayLike]


@dataclass(frozen=True)
class AblationRow:
    name: str  # "all", "without <m>" or "only <m>"
    dropped: tuple[str, ...]  # the removed modalities, sorted
    accuracy: float
    macro_f1: float
    metric: str  # which of accuracy / macro_f1 ``delta`` is measured in
    delta: float  # this row's ``metric`` minus the "all" row's (negative: removing hurts)

    @property
    def value(self) -> float:
        """This row's ``metric``."""
        return self.accuracy if self.metric == "accuracy" else self.macro_f1

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "dropped": list(self.dropped),
            "accuracy": self.accuracy,
            "macro_f1": self.macro_f1,
            "metric": self.metric,
            "delta": self.delta,
        }


def modality_ablation(
    predict_fn: PredictFn,
    y_true: ArrayLike,
    modalities: list[str],
    *,
    metric: AblationMetric = "accuracy",
) -> list[AblationRow]:
    """Rows ``all``, then ``without m`` for each modality, then ``only m`` for each.

    ``predict_fn(drop)`` gets a fresh ``set`` of modality names to remove and returns ``(N, C)``
    class probabilities for the ``(N,)`` labels ``y_true``. It is called once per distinct drop
    set (with two modalities, ``only a`` is ``without b``), at most ``2 M + 1`` times.
    """
    if metric not in ("accuracy", "macro_f1"):
        raise ValueError(f"metric must be 'accuracy' or 'macro_f1', got {metric!r}")
    names = list(modalities)
    if not names or len(set(names)) != len(names):
        raise ValueError(f"modalities must be non-empty and unique, got {names}")
    y = as_labels(y_true)
    plan = [("all", frozenset[str]())]
    plan += [(f"without {m}", frozenset({m})) for m in names]
    plan += [(f"only {m}", frozenset(names) - {m}) for m in names]

    scores: dict[frozenset[str], tuple[float, float]] = {}
    num_classes: int | None = None
    for _, drop in plan:
        if drop in scores:
            continue
        probs = as_probs(predict_fn(set(drop)), len(y), num_classes)
        num_classes = probs.shape[1]
        scores[drop] = accuracy_macro_f1(y, probs)

    pick = 0 if metric == "accuracy" else 1
    base = scores[frozenset()][pick]
    return [
        AblationRow(
            name=name,
            dropped=tuple(sorted(drop)),
            accuracy=scores[drop][0],
            macro_f1=scores[drop][1],
            metric=metric,
            delta=scores[drop][pick] - base,
        )
        for name, drop in plan
    ]


def summarize_weights(
    weights: ArrayLike, modalities: list[str], present: ArrayLike | None = None
) -> dict[str, dict[str, float | int | None]]:
    """``(N, M)`` per-sample fusion weights (``FusionOutput.weights``, columns in ``modalities``
    order) -> ``{modality: {"mean", "std", "n"}}`` over the ``n`` rows where that modality is
    present. ``present`` is an ``(N, M)`` bool mask; without it a modality counts as present
    where its weight is > 0 (fusions give a missing modality weight 0). ``std`` is the population
    standard deviation; mean and std are ``None`` when ``n`` is 0."""
    w = to_tensor(weights, torch.float64).numpy()
    if w.ndim != 2 or w.shape[1] != len(modalities):
        raise ValueError(f"weights must have shape (N, M={len(modalities)}), got {tuple(w.shape)}")
    mask = w > 0 if present is None else to_tensor(present, torch.bool).numpy()
    if mask.shape != w.shape:
        raise ValueError(f"present has shape {mask.shape}, weights {w.shape}")
    out: dict[str, dict[str, float | int | None]] = {}
    for j, name in enumerate(modalities):
        column = w[mask[:, j], j]
        n = int(column.size)
        out[name] = {
            "mean": float(column.mean()) if n else None,
            "std": float(column.std()) if n else None,
            "n": n,
        }
    return out
