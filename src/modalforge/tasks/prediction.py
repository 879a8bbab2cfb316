"""Predictions as numbers and as tables: shared by a classifier and an ensemble of them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd


@dataclass
class Prediction:
    probs: np.ndarray  # (N, C) probabilities (classification) or (N, 1) values
    weights: np.ndarray | None  # (N, M) fusion weights, if the fusion has them
    present: dict[str, np.ndarray]  # column -> (N,) bool


def prediction_table(probs: np.ndarray, labels: list[str] | None) -> pd.DataFrame:
    """(N, C) probabilities -> label, confidence and ``p:<class>`` columns (a classifier's
    ``labels``); (N, 1) values -> a ``prediction`` column (``labels`` None: regression)."""
    if labels is None:
        return pd.DataFrame({"prediction": probs[:, 0]})
    table = pd.DataFrame({"label": [labels[i] for i in probs.argmax(1)]})
    table["confidence"] = probs.max(1)
    for i, name in enumerate(labels):
        table[f"p:{name}"] = probs[:, i]
    return table


def accuracy_by(frame: pd.DataFrame, column: str, y: np.ndarray, pred: np.ndarray,
                labels: list[str]) -> dict[str, dict[str, Any]]:  # fmt: skip
    """Accuracy per value of ``column``, beside the accuracy of always answering that group's
    most common label (counted on these rows: the strongest constant answer there is)."""
    if column not in frame:
        raise ValueError(f"evaluate by {column!r}: no such column (columns: {list(frame)})")
    keys = frame[column].astype(str).to_numpy()
    out = {}
    for key in sorted(set(keys)):
        rows = keys == key
        majority = int(np.bincount(y[rows]).argmax())
        out[key] = {"rows": int(rows.sum()), "accuracy": float((pred[rows] == y[rows]).mean()),
                    "majority": labels[majority],
                    "majority_accuracy": float((y[rows] == majority).mean())}  # fmt: skip
    return out


__all__ = ["Prediction", "accuracy_by", "prediction_table"]
