"""Input checks and conversions shared by the evaluation functions.

Everything public in ``modalforge.evaluate`` takes numpy arrays, torch tensors (any device) or
nested lists; these helpers turn them into CPU float64 / int64 tensors once, with one clear error
for each way an input can be wrong, and turn results back into plain JSON values.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

ArrayLike = np.ndarray | torch.Tensor | Sequence[Any]

# how far a row of probabilities may sum from 1: float32 softmax is off by ~1e-7, and a late
# fusion that averages per-modality softmaxes is exact up to rounding too
_ROW_SUM_TOL = 1e-3


def to_tensor(x: ArrayLike, dtype: torch.dtype) -> torch.Tensor:
    """Any array-like -> a CPU tensor of ``dtype`` (a copy detached from any graph)."""
    if isinstance(x, torch.Tensor):
        return x.detach().to(device="cpu", dtype=dtype)
    return torch.as_tensor(np.asarray(x), dtype=dtype)


def as_labels(y_true: ArrayLike, num_classes: int | None = None) -> torch.Tensor:
    """``(N,)`` integer class indices -> int64 tensor ``(N,)``. Integral floats are accepted."""
    raw = to_tensor(y_true, torch.float64)
    if raw.ndim != 1 or raw.numel() == 0:
        raise ValueError(f"y_true must be a non-empty 1-D array, got shape {tuple(raw.shape)}")
    if not torch.isfinite(raw).all() or (raw != raw.round()).any():
        raise ValueError("y_true must hold integer class indices")
    labels = raw.to(torch.int64)
    if num_classes is not None and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(
            f"y_true holds class indices outside [0, {num_classes}): "
            f"min {int(labels.min())}, max {int(labels.max())}"
        )
    return labels


def as_probs(probs: ArrayLike, n: int, num_classes: int | None = None) -> torch.Tensor:
    """``(N, C)`` class probabilities -> float64 tensor ``(N, C)``.

    Raises on logits: torchmetrics silently softmaxes any input outside ``[0, 1]``, which would
    give plausible numbers for the wrong thing.
    """
    p = to_tensor(probs, torch.float64)
    if p.ndim != 2 or p.shape[0] != n:
        raise ValueError(f"probs must have shape (N={n}, C), got {tuple(p.shape)}")
    if num_classes is not None and p.shape[1] != num_classes:
        raise ValueError(f"probs has {p.shape[1]} columns but there are {num_classes} classes")
    if p.shape[1] < 2:
        raise ValueError("probs needs at least 2 columns (classes)")
    if not torch.isfinite(p).all():
        raise ValueError("probs holds NaN or inf")
    if p.min() < 0 or p.max() > 1:
        raise ValueError("probs must lie in [0, 1] (pass softmax(logits), not logits)")
    worst = (p.sum(dim=1) - 1).abs().max().item()
    if worst > _ROW_SUM_TOL:
        raise ValueError(f"rows of probs must sum to 1 (worst row is off by {worst:.3g})")
    return p


def as_values(x: ArrayLike, name: str) -> torch.Tensor:
    """``(N,)`` or ``(N, T)`` regression values -> float64 tensor of the same shape."""
    t = to_tensor(x, torch.float64)
    if t.ndim not in (1, 2) or t.shape[0] == 0:
        raise ValueError(f"{name} must have shape (N,) or (N, T) with N > 0, got {tuple(t.shape)}")
    if not torch.isfinite(t).all():
        raise ValueError(f"{name} holds NaN or inf")
    return t


def scalar(x: float | torch.Tensor) -> float:
    """A number or one-element tensor as a Python float.

    A float32 result (torchmetrics computes its ratios in float32) goes through its shortest
    decimal form, so an accuracy of 0.845 is stored as 0.845 and not 0.8450000286102295.
    """
    if isinstance(x, torch.Tensor):
        if x.dtype == torch.float32:
            return float(str(np.float32(x.item())))
        return float(x.item())
    return float(x)


def opt_float(x: float | torch.Tensor) -> float | None:
    """A scalar as a Python float, with NaN (undefined) as ``None``."""
    value = scalar(x)
    return None if math.isnan(value) else value


def json_safe(obj: Any) -> Any:
    """Nested data -> only dict/list/str/int/float/bool/None; NaN and inf become ``None``,
    arrays become lists, anything unknown becomes its ``str``."""
    if obj is None or isinstance(obj, bool | str):
        return obj
    if isinstance(obj, int | np.integer):
        return int(obj)
    if isinstance(obj, float | np.floating):
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, np.bool_):
        return bool(obj)
    if isinstance(obj, torch.Tensor):
        obj = obj.detach().cpu().numpy()
    if isinstance(obj, np.ndarray):
        return json_safe(obj.tolist())
    if isinstance(obj, Mapping):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple | set | frozenset):
        items = sorted(obj, key=str) if isinstance(obj, set | frozenset) else obj
        return [json_safe(v) for v in items]
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "to_dict"):
        return json_safe(obj.to_dict())
    return str(obj)
