"""A trained model as ONNX graphs: one per encoder and one for the fusion head.

Each graph takes flat tensors. An encoder graph takes its modality's batch keys (or, for an
encoder with a traceable core such as Whisper, the outputs of its Python ``prepare``: log-mel
frames and lengths) and returns the pooled features ``(B, D)``. The head graph takes, for every
input column in sorted order, ``feat.<column>`` ``(B, D)`` float32 and ``mask.<column>`` ``(B,)``
bool -- the presence mask -- and returns ``logits`` ``(B, C)`` (and ``weights`` ``(B, M)`` when the
fusion has them). So a request with a missing modality runs in ONNX as it does in PyTorch: that
encoder is not run and its mask is False. Batch axes are dynamic; preprocessing stays in Python,
shared with training (``data/``).

    files, info = export_onnx(predictor.model, examples, out_dir)   # -> {role: path}, metadata
"""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from modalforge.models.multimodal import MultimodalModel
from modalforge.runtime.onnx_encoder import OnnxEncoder, graph_files, quiet_exporter

HEAD = "onnx/head.onnx"


def encoder_file(column: str) -> str:
    return f"onnx/encoder.{column}.onnx"


class HeadGraph(nn.Module):
    """(feat_0, mask_0, feat_1, mask_1, ...) in sorted column order -> logits[, weights]."""

    def __init__(self, model: MultimodalModel) -> None:
        super().__init__()
        self.fusion, self.head = model.fusion, model.head
        self.columns = list(model.columns)

    def forward(self, *tensors: torch.Tensor):
        feats = {c: tensors[2 * i] for i, c in enumerate(self.columns)}
        mask = {c: tensors[2 * i + 1] for i, c in enumerate(self.columns)}
        fused = self.fusion(feats, mask)
        logits = self.head(fused.fused)
        return logits if fused.weights is None else (logits, fused.weights)


def projection_file(column: str) -> str:
    return f"onnx/project.{column}.onnx"


class ProjectionGraph(nn.Module):
    """A contrastive tower's head: pooled features (B, D_in) -> unit-length embedding (B, D)."""

    def __init__(self, model, column: str) -> None:
        super().__init__()
        self.model, self.column = model, column

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.model.project(self.column, pooled)


def export_projection(model, column: str, path: Path, batch: int = 3) -> dict[str, Any]:
    example = torch.randn(batch, model.encoder(column).output_dim)
    _save_dynamo(ProjectionGraph(model, column).eval(), (example,), ["pooled"], ["embedding"],
                 ({0: torch.export.Dim.AUTO},), path)  # fmt: skip
    return {"file": projection_file(column), "inputs": ["pooled"], "outputs": ["embedding"]}


def _save_dynamo(graph: nn.Module, example: tuple, inputs: list[str], outputs: list[str],
                 dynamic_shapes: tuple, path: Path) -> None:  # fmt: skip
    """``torch.onnx.export`` (the dynamo exporter) -> ``path``, quietly. ``dynamic_shapes``:
    one entry per parameter of ``graph.forward`` (a ``*tensors`` parameter takes a tuple)."""
    quiet_exporter()
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(graph, example, input_names=inputs, output_names=outputs,
                                    dynamic_shapes=dynamic_shapes,
                                    dynamo=True, verbose=False)  # fmt: skip
        program.save(str(path), external_data=False)


def head_input_names(columns: list[str]) -> list[str]:
    return [name for c in columns for name in (f"feat.{c}", f"mask.{c}")]


def export_head(model: MultimodalModel, path: Path, batch: int = 3) -> dict[str, Any]:
    """The fusion + head graph -> ``path``; returns its input / output names."""
    model = model.eval()
    columns = list(model.columns)
    example = []
    for c in columns:
        example.append(torch.randn(batch, model.encoder(c).output_dim))
        example.append(torch.tensor([True, False, True][:batch] + [True] * max(0, batch - 3)))
    graph = HeadGraph(model).eval()
    with torch.no_grad():
        weights = model.fusion(
            {c: example[2 * i] for i, c in enumerate(columns)},
            {c: example[2 * i + 1] for i, c in enumerate(columns)},
        ).weights
    outputs = ["logits"] if weights is None else ["logits", "weights"]
    shapes = tuple({0: torch.export.Dim.AUTO} for _ in example)
    _save_dynamo(graph, tuple(example), head_input_names(columns), outputs, (shapes,), path)
    return {"inputs": head_input_names(columns), "outputs": outputs}


def export_encoders(
    model, examples: dict[str, dict[str, torch.Tensor]], out_dir: Path
) -> tuple[dict[str, Path], dict[str, Any]]:
    """Every encoder of ``model`` (on ``examples[column]``, a collated batch of >= 2 rows) ->
    ONNX files under ``out_dir``, each checked against PyTorch on its example (``OnnxEncoder``'s
    tolerance); returns ``{name inside the bundle: path}`` and ``{column: graph metadata}``."""
    out_dir = Path(out_dir)
    files: dict[str, Path] = {}
    encoders: dict[str, Any] = {}
    for column in model.columns:
        encoder = model.encoder(column)
        runner = OnnxEncoder(encoder, examples[column], cache=out_dir / "cache")
        target = out_dir / encoder_file(column)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(runner.path, target)
        files[encoder_file(column)] = target
        for data in graph_files(runner.path)[1:]:  # external weights (graphs over ~1.5 GB)
            name = f"{Path(encoder_file(column)).parent}/{data.name}"
            shutil.copyfile(data, out_dir / name)
            files[name] = out_dir / name
        encoders[column] = {
            "file": encoder_file(column),
            "inputs": list(runner.keys),
            "core": runner.core,
            "max_abs_diff_on_export": runner.max_abs_diff,
        }
    return files, encoders


def _opset(path: Path) -> int | None:
    import onnx

    opset = {op.domain or "ai.onnx": op.version for op in onnx.load(path).opset_import}
    return opset.get("ai.onnx")


def export_onnx(
    model: MultimodalModel, examples: dict[str, dict[str, torch.Tensor]], out_dir: Path
) -> tuple[dict[str, Path], dict[str, Any]]:
    """A classifier's graphs: every encoder (``export_encoders``) and the fusion head -> ONNX
    files under ``out_dir``; returns ``{name inside the bundle: path}`` and the variant
    metadata (graph inputs / outputs, opset)."""
    files, encoders = export_encoders(model, examples, out_dir)
    info: dict[str, Any] = {"format": "onnx", "encoders": encoders}
    last = Path(out_dir) / HEAD
    info["head"] = {"file": HEAD, **export_head(model, last)}
    files[HEAD] = last
    info["opset"] = _opset(last)
    return files, info


def export_towers_onnx(
    model, examples: dict[str, dict[str, torch.Tensor]], out_dir: Path
) -> tuple[dict[str, Path], dict[str, Any]]:
    """A contrastive model's graphs: every tower's encoder and its projection (no head)."""
    files, encoders = export_encoders(model, examples, out_dir)
    info: dict[str, Any] = {"format": "onnx", "encoders": encoders, "projections": {}}
    for column in model.columns:
        path = Path(out_dir) / projection_file(column)
        info["projections"][column] = export_projection(model, column, path)
        files[projection_file(column)] = path
    info["opset"] = _opset(path)
    return files, info
