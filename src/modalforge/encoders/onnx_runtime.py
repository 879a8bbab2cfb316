"""Run a frozen encoder through ONNX Runtime: exported once, cached, checked against PyTorch.

``OnnxEncoder(encoder, example)`` exports ``encoder`` (frozen) to
``$MODALFORGE_CACHE/onnx/<encoder_id>.onnx`` unless that file is already there, compares its
outputs with PyTorch on ``example`` (max abs difference of the pooled features must stay within
``atol``, or the export is deleted and an error raised), then answers ``__call__(batch)`` with an
``EncoderOutput`` computed by ONNX Runtime. CUDA is used when the installed onnxruntime has it.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from modalforge.encoders.base import INPUT_KEYS, Encoder, EncoderOutput

# which input axes vary between calls, per batch key
DYNAMIC_AXES = {
    "pixels": (0, 2, 3),
    "input_ids": (0, 1),
    "attention_mask": (0, 1),
    "waves": (0, 1),
    "wave_lengths": (0,),
    "values": (0,),
}


class ParityError(RuntimeError):
    """An exported graph whose outputs differ from PyTorch's beyond tolerance."""


class _Flat(nn.Module):
    """Positional tensors in, (pooled, sequence) out: the shape ONNX export wants."""

    def __init__(self, encoder: Encoder, keys: tuple[str, ...], with_sequence: bool) -> None:
        super().__init__()
        self.encoder, self.keys, self.with_sequence = encoder, keys, with_sequence

    def forward(self, *tensors: torch.Tensor):
        out = self.encoder(dict(zip(self.keys, tensors, strict=True)))
        return (out.pooled, out.sequence) if self.with_sequence else (out.pooled,)


def providers() -> list[str]:
    import onnxruntime as ort

    available = ort.get_available_providers()
    wanted = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return [p for p in wanted if p in available] or available


def weights_fingerprint(module: nn.Module) -> str:
    """Hash of every parameter and buffer: a cached export is only reused for the same weights."""
    import hashlib

    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()[:12]


def cache_root() -> Path:
    from modalforge.data.catalog._common import cache_dir

    return cache_dir() / "onnx"


class OnnxEncoder:
    def __init__(
        self,
        encoder: Encoder,
        example: dict[str, torch.Tensor],
        with_sequence: bool = False,
        atol: float = 1e-3,
        cache: Path | None = None,
    ) -> None:
        import onnxruntime as ort

        encoder.freeze()
        self.encoder = encoder
        self.keys = tuple(k for k in INPUT_KEYS[encoder.modality] if k in example)
        self.with_sequence = with_sequence
        suffix = "seq" if with_sequence else "pooled"
        name = f"{encoder.encoder_id}-{weights_fingerprint(encoder)}-{suffix}.onnx"
        self.path = (cache or cache_root()) / name
        fresh = not self.path.is_file()
        if fresh:
            self._export(example)
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = ort.InferenceSession(str(self.path), options, providers=providers())
        self.max_abs_diff = self._check(example, atol)

    def _export(self, example: dict[str, torch.Tensor]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp.onnx")
        outputs = ["pooled", "sequence"] if self.with_sequence else ["pooled"]
        # one symbolic dimension per name, shared across inputs (batch, tokens, ...)
        dims = {"0": torch.export.Dim.AUTO}
        shapes = tuple({axis: dims["0"] if axis == 0 else torch.export.Dim.AUTO
                        for axis in DYNAMIC_AXES[k]} for k in self.keys)  # fmt: skip
        # the dynamo exporter: the legacy TorchScript one is deprecated and bakes in
        # size-dependent values such as TF "SAME" pads
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                _Flat(self.encoder, self.keys, self.with_sequence).eval(),
                tuple(example[k] for k in self.keys),
                input_names=list(self.keys),
                output_names=outputs,
                dynamic_shapes=(shapes,),
                dynamo=True,
                verbose=False,
            )
            program.save(str(tmp), external_data=False)
        tmp.replace(self.path)

    def _check(self, example: dict[str, torch.Tensor], atol: float) -> float:
        with torch.no_grad():
            expected = self.encoder(example).pooled.numpy()
        got = self.run(example)[0]
        diff = float(np.abs(got - expected).max())
        if not diff <= atol:
            self.path.unlink(missing_ok=True)
            raise ParityError(
                f"{self.encoder.name}: ONNX Runtime differs from PyTorch by {diff:.2e} "
                f"(tolerance {atol:.0e}); the export was discarded"
            )
        return diff

    def run(self, batch: dict[str, torch.Tensor]) -> list[np.ndarray]:
        feeds = {k: batch[k].detach().cpu().numpy() for k in self.keys}
        return self.session.run(None, feeds)

    def __call__(self, batch: dict[str, torch.Tensor]) -> EncoderOutput:
        outputs = [torch.from_numpy(o) for o in self.run(batch)]
        sequence = outputs[1] if self.with_sequence else None
        mask = batch.get("attention_mask")
        return EncoderOutput(
            pooled=outputs[0], sequence=sequence, mask=None if mask is None else mask.bool()
        )
