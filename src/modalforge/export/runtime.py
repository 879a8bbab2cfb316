"""ONNX Runtime in place of PyTorch for a bundle variant: the same surface as
``MultimodalModel`` where the server uses it (``columns``, ``encoder(column)`` -> a callable with
``output_dim``, ``model({}, mask, features=...)`` -> ``ModelOutput``), so ``serve.Engine`` runs a
variant without knowing it is one. An encoder with a traceable core keeps its Python ``prepare``
(and ``finish``) from the PyTorch encoder; everything else runs in ONNX Runtime.

Execution providers: CUDA (and TensorRT) first when the installed onnxruntime offers them and
``device`` is CUDA, else CPU -- ``onnxruntime.get_available_providers()`` decides, nothing else.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from modalforge.encoders.base import INPUT_KEYS, Encoder, EncoderOutput
from modalforge.encoders.onnx_runtime import has_core
from modalforge.models.multimodal import ModelOutput, MultimodalModel


def session(path: Path, device: str = "cpu", threads: int = 0):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads
    options.log_severity_level = 3  # errors only
    # ORT's workers spin between runs by default; beside torch's OpenMP threads (collation,
    # Whisper's log-mel) on a small CPU that made batch-1 requests ~6x slower (measured: 86 vs
    # 14 ms per demo sample)
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    available = ort.get_available_providers()
    wanted = ["CPUExecutionProvider"]
    if device.startswith("cuda"):
        wanted = ["TensorrtExecutionProvider", "CUDAExecutionProvider", *wanted]
    chosen = [p for p in wanted if p in available] or available
    return ort.InferenceSession(str(path), options, providers=chosen)


class OrtEncoder:
    """One encoder graph; ``__call__(batch) -> EncoderOutput`` (pooled only)."""

    def __init__(self, encoder: Encoder, path: Path, keys: list[str], device: str = "cpu") -> None:
        self.encoder = encoder
        self.output_dim = encoder.output_dim
        self.modality = encoder.modality
        self.core = has_core(encoder)
        self.keys = list(keys)
        self.session = session(path, device)
        self.path = Path(path)

    def __call__(self, batch: dict[str, torch.Tensor]) -> EncoderOutput:
        with torch.no_grad():
            features = self.encoder.prepare(batch) if self.core else batch
        feeds = {k: features[k].detach().cpu().numpy() for k in self.keys}
        pooled = self.session.run(None, feeds)[0]
        return EncoderOutput(pooled=torch.from_numpy(np.ascontiguousarray(pooled)))


class OrtModel:
    """A bundle variant's graphs behind ``MultimodalModel``'s serving surface."""

    def __init__(
        self, model: MultimodalModel, root: Path, info: dict[str, Any], device: str = "cpu"
    ) -> None:
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
        self.head = session(self.root / info["head"]["file"], device)
        self.head_outputs = info["head"]["outputs"]

    def encoder(self, column: str) -> OrtEncoder:
        return self.encoders[column]

    def to(self, device) -> OrtModel:  # the graphs' providers were chosen at load
        return self

    def eval(self) -> OrtModel:
        return self

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
