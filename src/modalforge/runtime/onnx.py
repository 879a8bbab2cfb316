"""ONNX Runtime in place of PyTorch for a bundle variant: the same surface as
``MultimodalModel`` where the server uses it (``columns``, ``encoder(column)`` -> a callable with
``output_dim``, ``model({}, mask, features=...)`` -> ``ModelOutput``), so ``serve.Engine`` runs a
variant without knowing it is one. An encoder with a traceable core keeps its Python ``prepare``
(and ``finish``) from the PyTorch encoder; everything else runs in ONNX Runtime.

Execution providers: CUDA (and TensorRT) first when the installed onnxruntime offers them and
``device`` is CUDA, else CPU -- ``onnxruntime.get_available_providers()`` decides, nothing else.
"""

from __future__ import annotations

import contextlib
import threading
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


_threads_lock = threading.Lock()
_threads_users = 0
_threads_saved = 1


@contextlib.contextmanager
def single_torch_thread():
    """torch on one intra-op thread inside: for the Python-side ``prepare`` (Whisper's log-mel
    is a dozen small torch ops) that runs right before an ONNX Runtime call. With torch's two
    OpenMP threads, the idle one spin-waits after each parallel region and holds the core that
    ORT's worker then needs: on the 2-core demo machine Whisper's graph ran at 6.0 ms per
    request instead of 4.5 ms (and the log-mel, beside any other busy process, took 90 ms
    instead of 1 ms). Process-wide (torch has no per-thread setting), so nested / concurrent
    users share it and the last one out restores the previous count."""
    global _threads_users, _threads_saved
    with _threads_lock:
        if _threads_users == 0:
            _threads_saved = torch.get_num_threads()
            if _threads_saved != 1:
                torch.set_num_threads(1)
        _threads_users += 1
    try:
        yield
    finally:
        with _threads_lock:
            _threads_users -= 1
            if _threads_users == 0 and _threads_saved != 1:
                torch.set_num_threads(_threads_saved)


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
        if self.core:
            with torch.no_grad(), single_torch_thread():
                features = self.encoder.prepare(batch)
        else:
            features = batch
        feeds = {k: features[k].detach().cpu().numpy() for k in self.keys}
        pooled = self.session.run(None, feeds)[0]
        return EncoderOutput(pooled=torch.from_numpy(np.ascontiguousarray(pooled)))


class OrtModel:
    """A bundle variant's graphs behind ``MultimodalModel``'s serving surface (a contrastive
    model's: ``encoder(column)`` + ``project(column, pooled)``)."""

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
        if "projections" in info:
            self.projections = {c: session(self.root / p["file"], device)
                                for c, p in info["projections"].items()}  # fmt: skip
        else:
            self.head = session(self.root / info["head"]["file"], device)
            self.head_outputs = info["head"]["outputs"]

    def project(self, column: str, pooled: torch.Tensor) -> torch.Tensor:
        """A contrastive tower's unit-length embeddings of its pooled features."""
        feeds = {"pooled": pooled.detach().cpu().float().numpy()}
        return torch.from_numpy(self.projections[column].run(None, feeds)[0])

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
