"""The one surface every encoder exposes, pretrained or from scratch.

An encoder takes the tensors its modality's preprocessing makes and returns an ``EncoderOutput``:
``pooled`` features ``(B, D)`` always, and ``sequence`` features ``(B, T, D)`` (tokens, frames,
grid cells) with their ``mask`` ``(B, T)`` where the architecture has them. ``freeze()`` stops
gradients and fixes batch-norm / dropout; ``encoder_id`` names the weights *and* the
preprocessing, so a feature cache keyed by it is invalidated by any change to either.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from modalforge.schema import Modality

# the batch keys each modality's encoders read
INPUT_KEYS: dict[Modality, tuple[str, ...]] = {
    Modality.IMAGE: ("pixels",),  # (B, 3, H, W) float32, normalized per ImageConfig
    Modality.TEXT: ("input_ids", "attention_mask"),  # (B, L) int64 each
    Modality.AUDIO: ("waves", "wave_lengths"),  # (B, T) float32 at 16 kHz, (B,) int64 samples
    Modality.TABULAR: ("values",),  # (B, F) float32
    Modality.GRAPH: ("x", "edge_index", "batch"),  # torch_geometric-style mini-batch
}


@dataclass
class EncoderOutput:
    pooled: torch.Tensor  # (B, D)
    sequence: torch.Tensor | None = None  # (B, T, D)
    mask: torch.Tensor | None = None  # (B, T) bool, True where sequence holds data


class Encoder(nn.Module):
    """Base class. Subclasses set ``modality``, ``output_dim`` and ``preprocessing`` and
    implement ``forward(batch) -> EncoderOutput``."""

    modality: ClassVar[Modality]
    name: str = "encoder"
    output_dim: int
    #: the parameters of the data/ preprocessing this encoder expects (JSON-serializable)
    preprocessing: dict[str, Any]
    #: identifies the weights source (package + version, or "random:<seed>")
    weights_id: str = "random"
    #: options that change the features but are neither weights nor preprocessing (pooling)
    id_extras: dict[str, Any] | None = None

    def __init__(self) -> None:
        super().__init__()
        self._frozen = False

    @property
    def pretrained(self) -> bool:
        """Whether the weights came from somewhere (a package, a file) rather than random init."""
        return not self.weights_id.startswith("random")

    def forward(self, batch: dict[str, torch.Tensor]) -> EncoderOutput:  # pragma: no cover
        raise NotImplementedError

    def freeze(self) -> Encoder:
        """No gradients, eval-mode batch norm and dropout, for good (``train()`` keeps it)."""
        self._frozen = True
        for p in self.parameters():
            p.requires_grad_(False)
        return self.train(False)

    def train(self, mode: bool = True) -> Encoder:
        return super().train(mode and not self._frozen)

    @property
    def frozen(self) -> bool:
        return self._frozen

    #: whether ``forward`` splits into an untraced ``prepare`` and a traceable
    #: ``forward_features`` (+ optional ``finish``), so ONNX export traces only the network
    #: (``runtime.onnx_encoder``); such encoders set it and implement the three
    traceable_core: ClassVar[bool] = False

    def prepare(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The untraced preprocessing before ``forward_features`` (identity by default)."""
        return batch

    def forward_features(self, features: dict[str, torch.Tensor]) -> EncoderOutput:
        """The traceable network on ``prepare``'s outputs (``forward`` by default)."""
        return self.forward(features)

    @property
    def feature_axes(self) -> dict[str, tuple[int, ...]]:
        """The axes of ``prepare``'s tensors that vary between calls (default: every axis)."""
        return {}

    def finish(self, output: EncoderOutput) -> EncoderOutput:
        """Cheap untraced post-processing of ``forward_features``' output (identity)."""
        return output

    def unfreeze_top(self, n: int) -> None:
        """Let only the last ``n`` blocks train (``finetune top:N``); encoders with blocks
        implement it."""
        raise ValueError(f"encoder {self.name!r} cannot be partially unfrozen")

    @property
    def encoder_id(self) -> str:
        """A stable hash of (class, name, weights, preprocessing, output_dim, extras)."""
        payload = json.dumps(
            {
                "class": type(self).__qualname__,
                "name": self.name,
                "weights": self.weights_id,
                "preprocessing": self.preprocessing,
                "output_dim": self.output_dim,
                "extras": self.id_extras or {},
            },
            sort_keys=True,
            default=str,
        )
        return f"{self.name}-{hashlib.sha256(payload.encode()).hexdigest()[:16]}"


def masked_mean(sequence: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean over time of (B, T, D) where mask (B, T) is true; all-false rows give zeros."""
    if mask is None:
        return sequence.mean(dim=1)
    weights = mask.to(sequence.dtype).unsqueeze(-1)
    return (sequence * weights).sum(1) / weights.sum(1).clamp_min(1.0)


def weights_fingerprint(module: nn.Module) -> str:
    """Hash of every parameter and buffer: a cached export or feature is only reused for the
    same weights."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()[:12]
