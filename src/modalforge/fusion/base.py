"""The one surface every fusion exposes.

A fusion takes modality-keyed pooled features ``{name: (B, D_name)}`` and a presence mask
``{name: (B,) bool}`` and returns a ``FusionOutput`` whose ``fused`` is ``(B, output_dim)``.
Keys are always iterated in sorted order, so adding a modality needs no fusion change. A missing
modality (mask False) must not influence the result and must never produce NaN; its feature
values are ignored (callers may pass zeros).

Most fusions produce a representation for a task head. Late fusion produces the task outputs
itself (``produces_outputs = True``; ``output_dim`` is then the number of outputs).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn


@dataclass
class FusionOutput:
    fused: torch.Tensor  # (B, output_dim)
    #: (B, M) per-modality weights in sorted key order, where the fusion has them (attention,
    #: learned late-fusion weights); rows sum to 1 over present modalities
    weights: torch.Tensor | None = None


class Fusion(nn.Module):
    produces_outputs: ClassVar[bool] = False
    #: the registry name, set by ``create_fusion``
    name: str = "fusion"

    def __init__(self, input_dims: dict[str, int], output_dim: int) -> None:
        super().__init__()
        if not input_dims:
            raise ValueError("a fusion needs at least one modality")
        self.keys = sorted(input_dims)
        self.input_dims = {k: int(input_dims[k]) for k in self.keys}
        self.output_dim = int(output_dim)

    def forward(
        self, features: dict[str, torch.Tensor], mask: dict[str, torch.Tensor] | None = None
    ) -> FusionOutput:  # pragma: no cover
        raise NotImplementedError

    def presence(
        self, features: dict[str, torch.Tensor], mask: dict[str, torch.Tensor] | None
    ) -> torch.Tensor:
        """(B, M) float presence matrix in sorted key order (all ones without a mask)."""
        batch = next(iter(features.values())).shape[0]
        device = next(iter(features.values())).device
        cols = []
        for k in self.keys:
            if mask is not None and k in mask:
                cols.append(mask[k].to(device=device, dtype=torch.float32).reshape(batch))
            else:
                cols.append(torch.ones(batch, device=device))
        return torch.stack(cols, dim=1)
