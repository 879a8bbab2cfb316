"""Tabular (numeric) columns: parse values, standardize with statistics fitted on training rows."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

from modalforge.data.errors import DecodeError


def to_float(value: Any) -> float:
    """A manifest / request value -> a finite float. Raises DecodeError."""
    if isinstance(value, bool):
        return float(value)
    try:
        number = float(value.strip() if isinstance(value, str) else value)
    except (TypeError, ValueError):
        raise DecodeError(f"not a number: {value!r}") from None
    if not math.isfinite(number):
        raise DecodeError(f"not a finite number: {value!r}")
    return number


@dataclass(frozen=True)
class Standardizer:
    """(x - mean) / std per column; fitted on training data, saved as JSON in the bundle."""

    mean: tuple[float, ...]
    std: tuple[float, ...]

    @classmethod
    def fit(cls, rows: Iterable[Iterable[float]]) -> Standardizer:
        arr = np.asarray([list(r) for r in rows], dtype=np.float64)
        if arr.ndim != 2 or arr.shape[0] == 0:
            raise ValueError("Standardizer.fit needs a non-empty 2-D table")
        mean = np.nanmean(arr, axis=0)
        std = np.nanstd(arr, axis=0)
        std = np.where(np.isfinite(std) & (std > 1e-12), std, 1.0)
        mean = np.where(np.isfinite(mean), mean, 0.0)
        return cls(tuple(float(m) for m in mean), tuple(float(s) for s in std))

    def __call__(self, values: np.ndarray) -> np.ndarray:
        return ((np.asarray(values, dtype=np.float64) - self.mean) / self.std).astype(np.float32)

    def to_dict(self) -> dict[str, list[float]]:
        return {"mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def from_dict(cls, data: dict[str, list[float]]) -> Standardizer:
        return cls(tuple(data["mean"]), tuple(data["std"]))
