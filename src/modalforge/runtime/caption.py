"""A captioning variant's graphs (``export.caption`` writes them) behind ``CaptionModel``'s
decoding surface, so ``models.decoding`` and the engine run it as they run the PyTorch model.

* ``memory`` graph: ``pixels (B, 3, H, W)`` -> ``memory (B, grid + 1, dim)``;
* ``step`` graph: transformer ``memory, prefix (B, t)`` -> ``logits (B, V)``; GRU ``memory, h,
  token (B,)`` -> ``logits, h`` (and a ``start`` graph: ``memory`` -> the first ``h``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from modalforge.runtime.session import session


class OrtCaptioner:
    """The memory and step graphs behind ``CaptionModel``'s decoding surface (``memory``,
    ``start``, ``step``, ``encoder(column)``), so ``runtime.Engine`` and ``models.decoding`` run a
    variant as they run the PyTorch model."""

    def __init__(self, model, root: Path, info: dict[str, Any], device: str = "cpu") -> None:
        self.config = model.config
        self.columns = list(model.columns)
        spec = info["caption"]
        self.graphs = {role: session(Path(root) / spec[role], device)
                       for role in ("memory", "step", "start") if role in spec}  # fmt: skip
        self._encoder = _MemoryEncoder(self, model.encoder(self.columns[0]))

    def encoder(self, column: str):
        return self._encoder

    def to(self, device) -> OrtCaptioner:  # the providers were chosen at load
        return self

    def eval(self) -> OrtCaptioner:
        return self

    def memory(self, features=None, inputs=None) -> torch.Tensor:
        if inputs is None:
            raise ValueError("an ONNX captioner reads pixels, not cached features")
        pixels = inputs["pixels"].detach().cpu().numpy()
        return torch.from_numpy(self.graphs["memory"].run(None, {"pixels": pixels})[0])

    def start(self, memory: torch.Tensor, bos: int) -> dict[str, torch.Tensor]:
        token = torch.full((len(memory),), bos, dtype=torch.long)
        if self.config.decoder == "transformer":
            return {"prefix": token[:, None]}
        (h,) = self.graphs["start"].run(None, {"memory": memory.detach().cpu().numpy()})
        return {"h": torch.from_numpy(h), "token": token}

    def step(self, memory: torch.Tensor, state: dict[str, torch.Tensor]):
        m = memory.detach().cpu().numpy()
        if self.config.decoder == "transformer":
            feeds = {"memory": m, "prefix": state["prefix"].cpu().numpy()}
            (logits,) = self.graphs["step"].run(None, feeds)
            return torch.from_numpy(logits), state
        logits, h = self.graphs["step"].run(None, {"memory": m, "h": state["h"].cpu().numpy(),
                                               "token": state["token"].cpu().numpy()})  # fmt: skip
        return torch.from_numpy(logits), {**state, "h": torch.from_numpy(h)}


class _MemoryEncoder:
    """``encoder(column)`` of an ONNX captioner: runs the memory graph (what ``Engine.tune``
    times per chunk size)."""

    def __init__(self, owner: OrtCaptioner, encoder) -> None:
        self.owner, self.output_dim, self.modality = owner, encoder.output_dim, encoder.modality

    def __call__(self, batch):
        return self.owner.memory(inputs=batch)


__all__ = ["OrtCaptioner"]
