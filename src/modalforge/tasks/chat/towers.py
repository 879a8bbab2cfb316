"""The chat model's frozen towers: a packaged encoder each for images and audio, pooled to a fixed
number of tokens.

* image: EfficientNet-Lite0's spatial grid (4 x 4 x 1280 at 128 px, 7 x 7 at 224) average-pooled
  to ``sqrt(tokens) x sqrt(tokens)``;
* audio: Whisper tiny.en's encoder on the clip's own frames (the trimmed window), the frames
  holding audio average-pooled in time into ``tokens`` segments.

Tokens go through the project's feature cache (their own ``kind``, apart from pooled features),
so training computes each image and clip once; serving encodes on the fly.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from modalforge.data.dataset import Featurizer
from modalforge.encoders import create_encoder
from modalforge.schema import Modality


class Tower:
    def __init__(self, modality: Modality, encoder: str, kwargs: dict[str, Any], tokens: int,
                 encoder_module=None) -> None:  # fmt: skip
        if tokens < 1:
            raise ValueError(f"{modality.value} tokens must be >= 1, got {tokens}")
        if modality is Modality.IMAGE and math.isqrt(tokens) ** 2 != tokens:
            raise ValueError(f"image tokens must be a square (4, 9, 16, ...), got {tokens}")
        self.modality = modality
        self.tokens = tokens
        self.encoder = (encoder_module or create_encoder(encoder, **kwargs)).freeze().eval()
        self.dim = int(self.encoder.output_dim)
        self.featurizer = Featurizer(modality, self.encoder.preprocessing)
        self._lock = threading.Lock()  # one forward at a time: the server calls from threads

    def load(self, value: Any, root: Path | None = None):
        """Decode one image / clip: bytes, a path under ``root``, or (no ``root``) a path the
        caller vouches for (one the conversation reader resolved, one given on the command
        line). Raises DecodeError."""
        if root is None and not isinstance(value, bytes | bytearray):
            path = Path(value)
            root, value = path.parent, path.name
        return self.featurizer.load(value, root)

    @torch.no_grad()
    def encode(self, items: Sequence[Any]) -> torch.Tensor:
        """Decoded items -> (B, tokens, dim)."""
        batch = self.featurizer.collate(list(items))
        with self._lock:
            out = self.encoder(batch)
        sequence, mask = out.sequence, out.mask
        if self.modality is Modality.IMAGE:
            side = math.isqrt(sequence.shape[1])
            grid = sequence.transpose(1, 2).reshape(len(items), self.dim, side, side)
            pooled = F.adaptive_avg_pool2d(grid, math.isqrt(self.tokens))
            return pooled.flatten(2).transpose(1, 2).contiguous()
        rows = []
        for seq, keep in zip(sequence, mask, strict=True):
            frames = seq[keep] if keep.any() else seq[:1]
            rows.append(F.adaptive_avg_pool1d(frames.T[None], self.tokens)[0].T)
        return torch.stack(rows)

    def features(self, cache, values: Sequence[Any], root: Path | None, progress: bool = True,
                 batch_size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        """(N, tokens, dim) tokens of ``values`` through ``cache`` and a presence mask (N,)."""

        def encode(chunk):
            return self.encode([self.load(v, root) for v in chunk]).flatten(1)

        flat, present = cache.features(
            self.encoder, self.modality, list(values), root, encode, batch_size=batch_size,
            progress=progress, kind=f"chat{self.tokens}", dim=self.tokens * self.dim,
        )  # fmt: skip
        return flat.view(len(values), self.tokens, self.dim), present


__all__ = ["Tower"]
