"""A captioning bundle as ONNX: the encoder graph and one decoder step, checked against PyTorch.

* ``onnx/memory.onnx``: ``pixels (B, 3, H, W)`` -> ``memory (B, grid + 1, dim)`` (the image
  encoder, its grid, the bridge);
* ``onnx/step.onnx``: one decoder step. Transformer: ``memory, prefix (B, t) int64`` -> ``logits
  (B, V)`` for the token after the prefix (``t`` is dynamic). GRU: ``memory, h, token (B,)`` ->
  ``logits, h``; and ``onnx/start.onnx``, ``memory`` -> its first state ``h``.

Decoding (greedy, beam, sampling) stays in Python (``models.decoding``) and calls the step graph
as it calls the PyTorch model, so the two decode alike. The gate: on held-out images the ONNX
captions (greedy and beam) equal PyTorch's on at least 98 % of them, and the first step's logits
and the memory differ by at most 1e-3.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from modalforge.runtime.caption import OrtCaptioner

MEMORY, STEP, START = "onnx/memory.onnx", "onnx/step.onnx", "onnx/start.onnx"
#: what a caption variant must meet against PyTorch
CAPTION_GATE = {"min_agreement": 0.98, "max_abs_diff": 1e-3}
MAX_ROWS = 64


class _Memory(nn.Module):
    def __init__(self, model) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model.memory(inputs={"pixels": pixels})


class _Start(nn.Module):
    def __init__(self, model) -> None:
        super().__init__()
        self.model = model

    def forward(self, memory: torch.Tensor) -> torch.Tensor:
        return self.model.init_state(memory)


class _TransformerStep(nn.Module):
    def __init__(self, model) -> None:
        super().__init__()
        self.model = model

    def forward(self, memory: torch.Tensor, prefix: torch.Tensor) -> torch.Tensor:
        return self.model._transformer(memory, prefix, padded=False)[:, -1]


class _GruStep(nn.Module):
    def __init__(self, model) -> None:
        super().__init__()
        self.model = model

    def forward(self, memory: torch.Tensor, h: torch.Tensor, token: torch.Tensor):
        return self.model.gru_step(memory, h, token)


def export_caption_onnx(model, pixels: torch.Tensor, out_dir: Path) -> tuple[dict, dict]:
    """The memory and step graphs of ``model`` (traced on ``pixels``, >= 2 images) -> files
    under ``out_dir`` and the variant's metadata."""
    from modalforge.export.onnx import _save_dynamo

    model = model.eval()
    batch = torch.export.Dim.AUTO
    gru = model.config.decoder == "gru"
    _save_dynamo(_Memory(model), (pixels,), ["pixels"], ["memory"], ({0: batch},),
                 out_dir / MEMORY)  # fmt: skip
    with torch.no_grad():
        memory = model.memory(inputs={"pixels": pixels})
    n = len(pixels)
    files = {MEMORY: out_dir / MEMORY, STEP: out_dir / STEP}
    graphs = {"memory": MEMORY, "step": STEP}
    if gru:
        _save_dynamo(_Start(model), (memory,), ["memory"], ["h"], ({0: batch},),
                     out_dir / START)  # fmt: skip
        files[START], graphs["start"] = out_dir / START, START
        example = (memory, model.init_state(memory), torch.full((n,), 2, dtype=torch.long))
        _save_dynamo(_GruStep(model), example, ["memory", "h", "token"], ["logits", "h_next"],
                     ({0: batch}, {0: batch}, {0: batch}), out_dir / STEP)  # fmt: skip
    else:
        prefix = torch.full((n, 3), 2, dtype=torch.long)
        shapes = ({0: batch}, {0: batch, 1: torch.export.Dim.AUTO})
        _save_dynamo(_TransformerStep(model), (memory, prefix), ["memory", "prefix"], ["logits"],
                     shapes, out_dir / STEP)  # fmt: skip
    return files, {"format": "onnx", "caption": {**graphs, "decoder": model.config.decoder}}


def export_caption_bundle(bundle, manifest, label: str | None = None, name: str = "onnx",
                          rule=None, overwrite: bool = False, quantize: str | None = None,
                          calibration=None) -> dict[str, Any]:  # fmt: skip
    """Export a captioning bundle, decode held-out images of ``manifest`` (its ``test`` split
    when it has one; at most 64) with PyTorch and with the graphs, and add the variant when the
    captions agree (``CAPTION_GATE``; ``label`` and ``rule`` are not used). Raises
    ``ParityGateError`` otherwise."""
    from modalforge.bundle import add_variant
    from modalforge.data.manifest import Manifest, read_manifest
    from modalforge.export.parity import ParityGateError
    from modalforge.models.decoding import DecodeOptions
    from modalforge.tasks import load

    if quantize:
        raise ValueError("--quantize: int8 captioning graphs are not offered yet")
    predictor = load(bundle)
    rows = manifest if isinstance(manifest, Manifest) else read_manifest(manifest)
    if "split" in rows.frame and (rows.frame["split"] == "test").any():
        rows = rows.subset(np.flatnonzero(rows.frame["split"].to_numpy() == "test"))
    rows = rows.subset(range(min(MAX_ROWS, len(rows))))
    feat = predictor._featurizer(predictor.image)
    pixels = feat.collate([feat.load(v, rows.root) for v in rows.frame[predictor.image]])["pixels"]
    model = predictor.model.eval()
    with tempfile.TemporaryDirectory(prefix="modalforge-export-") as tmp:
        start = time.perf_counter()
        files, info = export_caption_onnx(model, pixels[:3], Path(tmp))
        info["export_seconds"] = round(time.perf_counter() - start, 2)
        ort = OrtCaptioner(model, Path(tmp), info)
        with torch.no_grad():
            ref_memory = model.memory(inputs={"pixels": pixels})
            memory = ort.memory(inputs={"pixels": pixels})
            diff = float((ref_memory - memory).abs().max())
            first = model.step(ref_memory, model.start(ref_memory, predictor.vocab.bos_id))[0]
            logits = ort.step(memory, ort.start(memory, predictor.vocab.bos_id))[0]
            diff = max(diff, float((first - logits).abs().max()))
        agreement = {}
        for method in ("greedy", "beam"):
            options = DecodeOptions(method, max_length=predictor.config.max_length)
            ref = predictor.captions_from_memory(ref_memory, options)
            got = predictor.captions_from_memory(ort.memory(inputs={"pixels": pixels}), options,
                                                 model=ort)  # fmt: skip
            agreement[method] = float(np.mean([a == b for a, b in zip(ref, got, strict=True)]))
        result = {"rows": len(rows), "max_abs_diff": diff, "agreement": agreement}
        problems = [f"{m} captions agree on {a:.3f} < {CAPTION_GATE['min_agreement']}"
                    for m, a in agreement.items() if a < CAPTION_GATE["min_agreement"]]  # fmt: skip
        if not diff <= CAPTION_GATE["max_abs_diff"]:
            problems.append(f"max abs difference {diff:.2e} > {CAPTION_GATE['max_abs_diff']}")
        info["parity"] = {**result, "gate": CAPTION_GATE, "passed": not problems}
        if problems:
            raise ParityGateError(name, problems, result, info)
        files = {f"{name}/{k}": v for k, v in files.items()}
        info["caption"] = {k: v if k == "decoder" else f"{name}/{v}"
                           for k, v in info["caption"].items()}  # fmt: skip
        add_variant(bundle, name, files, info, overwrite=overwrite)
    return info


__all__ = ["CAPTION_GATE", "OrtCaptioner", "export_caption_bundle", "export_caption_onnx"]
