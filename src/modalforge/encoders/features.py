"""One way to run an encoder over many inputs, shared by training, evaluation and serving.

``encode_items`` collates already-decoded items (what ``Featurizer.load`` returns) and runs the
encoder once, returning pooled features or the flattened grid; ``load_items`` decodes manifest
values for it (placeholders where a value is missing). The feature cache, a predictor's
embeddings and the server's engine all go through these two, so the three can never encode a
value differently.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch

from modalforge.data.manifest import is_missing
from modalforge.schema import Modality

Output = Literal["pooled", "grid"]


def load_items(featurizer, values: Sequence[Any], root: Path | None) -> list[Any]:
    """Decoded items of ``values`` (a placeholder where a value is missing)."""
    return [featurizer.placeholder() if is_missing(v) else featurizer.load(v, root) for v in values]


def encode_items(
    encoder,
    featurizer,
    items: Sequence[Any],
    device: torch.device | None = None,
    lock: threading.Lock | None = None,
    output: Output = "pooled",
) -> torch.Tensor:
    """``encoder`` over ``items`` as one batch: pooled features ``(B, D)``, or with ``output
    "grid"`` the sequence flattened to ``(B, T * D)`` (a captioner's memory). ``lock`` guards
    collation of text: a Hugging Face tokenizer refuses concurrent calls."""
    guard = lock if lock is not None and featurizer.modality is Modality.TEXT else None
    with guard or contextlib.nullcontext():
        batch = featurizer.collate(list(items))
    if device is not None:
        batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
    out = encoder(batch)
    return out.sequence.flatten(1) if output == "grid" else out.pooled


__all__ = ["encode_items", "load_items"]
