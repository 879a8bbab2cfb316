"""ONNX Runtime in place of PyTorch for a bundle variant: the same surface as the PyTorch model
where the engine uses it (``columns``, ``encoder(column)`` -> a callable with ``output_dim``; a
classifier's ``model({}, mask, features=...)`` -> ``ModelOutput``, a contrastive model's
``project(column, pooled)``), so ``runtime.Engine`` runs a variant without knowing it is one. An
encoder with a traceable core keeps its Python ``prepare`` from the PyTorch encoder; everything
else runs in ONNX Runtime. Sessions come from ``runtime.session``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from modalforge.encoders.base import INPUT_KEYS, Encoder, EncoderOutput
from modalforge.models.multimodal import ModelOutput
from modalforge.runtime.session import session, single_torch_thread


class OrtEncoder:
    """One encoder graph; ``__call__(batch) -> EncoderOutput`` (pooled only)."""

    def __init__(self, encoder: Encoder, path: Path, keys: list[str], device: str = "cpu") -> None:
        self.encoder = encoder
        self.output_dim = encoder.output_dim
        self.modality = encoder.modality
        self.core = encoder.traceable_core
        self.keys = list(keys)
        self.session = session(path, device)
        self.path = Path(path)

    def __call__(self, batch: dict[str, torch.Tensor]) -> EncoderOutput:
        if self.core:
            with torch.no_grad(), single_torch_thread():
                features = self.encoder.prepare(batch)
        else:
            features = batch
        feeds = {k: features[k].detach().cpu().numpy() for k in self.keys}
        pooled = self.session.run(None, feeds)[0]
        return EncoderOutput(pooled=torch.from_numpy(np.ascontiguousarray(pooled)))


class _OrtEncoders:
    """Every input column's encoder graph (``info["encoders"]``) behind ``encoder(column)``."""

    def __init__(self, model, root: Path, info: dict[str, Any], device: str = "cpu") -> None:
        self.columns = list(model.columns)
        self.root = Path(root)
        self.info = info
        self.encoders = {}
        for column in self.columns:
            spec = info["encoders"][column]
            keys = spec.get("inputs") or list(INPUT_KEYS[model.encoder(column).modality])
            self.encoders[column] = OrtEncoder(
                model.encoder(column), self.root / spec["file"], keys, device
            )

    def encoder(self, column: str) -> OrtEncoder:
        return self.encoders[column]

    def to(self, device):  # the graphs' providers were chosen at load
        return self

    def eval(self):
        return self


class OrtModel(_OrtEncoders):
    """A classifier variant's graphs (encoders + the fusion head ``info["head"]``) behind
    ``MultimodalModel``'s serving surface."""

    def __init__(self, model, root: Path, info: dict[str, Any], device: str = "cpu") -> None:
        super().__init__(model, root, info, device)
        self.head = session(self.root / info["head"]["file"], device)
        self.head_outputs = info["head"]["outputs"]

    def __call__(self, inputs=None, mask=None, features=None) -> ModelOutput:
        if inputs:
            features = {
                **(features or {}),
                **{c: self.encoders[c](b).pooled for c, b in inputs.items()},
            }
        feeds = {}
        for c in self.columns:
            feeds[f"feat.{c}"] = features[c].detach().cpu().float().numpy()
            feeds[f"mask.{c}"] = mask[c].detach().cpu().numpy().astype(bool)
        out = self.head.run(None, feeds)
        logits = torch.from_numpy(out[0])
        weights = torch.from_numpy(out[1]) if len(out) > 1 else None
        return ModelOutput(logits, weights)


class OrtTowers(_OrtEncoders):
    """A contrastive variant's graphs (each tower's encoder + its projection,
    ``info["projections"]``) behind ``ContrastiveModel``'s ``encoder`` / ``project``."""

    def __init__(self, model, root: Path, info: dict[str, Any], device: str = "cpu") -> None:
        super().__init__(model, root, info, device)
        self.projections = {c: session(self.root / p["file"], device)
                            for c, p in info["projections"].items()}  # fmt: skip

    def project(self, column: str, pooled: torch.Tensor) -> torch.Tensor:
        """A tower's unit-length embeddings of its pooled features."""
        feeds = {"pooled": pooled.detach().cpu().float().numpy()}
        return torch.from_numpy(self.projections[column].run(None, feeds)[0])


__all__ = ["OrtEncoder", "OrtModel", "OrtTowers", "session", "single_torch_thread"]
