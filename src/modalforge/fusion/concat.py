"""Mid fusion by concatenation: per-modality projections, concatenated, then an MLP."""

from __future__ import annotations

import torch
from torch import nn

from modalforge.fusion.base import Fusion, FusionOutput
from modalforge.fusion.common import masked_inputs, mlp, projection
from modalforge.fusion.registry import register_fusion


@register_fusion(
    "concat",
    "per-modality projection MLPs to `width` (missing zeroed), concatenated, then an MLP",
    tiny={"width": 32},
)
class ConcatFusion(Fusion):
    """``x_k (B, D_k) -> h_k (B, width)`` (Linear + GELU + Dropout), ``h_k = 0`` where modality
    ``k`` is missing, ``[h_1; ...; h_M] (B, M * width)`` through an MLP to ``output_dim``."""

    def __init__(
        self,
        input_dims: dict[str, int],
        output_dim: int,
        width: int = 256,
        dropout: float = 0.1,
    ) -> None:
        super().__init__(input_dims, output_dim)
        self.proj = nn.ModuleList(projection(self.input_dims[k], width, dropout) for k in self.keys)
        self.mlp = mlp(len(self.keys) * width, width, self.output_dim, dropout)

    def forward(
        self, features: dict[str, torch.Tensor], mask: dict[str, torch.Tensor] | None = None
    ) -> FusionOutput:
        xs, present = masked_inputs(self, features, mask)
        hs = [
            torch.where(present[:, i : i + 1], proj(x), 0.0)
            for i, (proj, x) in enumerate(zip(self.proj, xs, strict=True))
        ]
        return FusionOutput(self.mlp(torch.cat(hs, dim=1)))
