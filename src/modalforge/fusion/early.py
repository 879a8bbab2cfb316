"""Early fusion: one MLP over the concatenated input features and the presence mask."""

from __future__ import annotations

import torch

from modalforge.fusion.base import Fusion, FusionOutput
from modalforge.fusion.common import masked_inputs, mlp
from modalforge.fusion.registry import register_fusion


@register_fusion(
    "early",
    "concatenated input features (missing zeroed) plus the presence mask, then one MLP",
    tiny={"width": 32},
)
class EarlyFusion(Fusion):
    """``[x_1; ...; x_M; present]`` of width ``sum(D_k) + M`` through one MLP to ``output_dim``.

    No per-modality processing: every interaction is left to the MLP. The presence bits tell it
    a zeroed modality from one whose features happen to be zero.
    """

    def __init__(
        self,
        input_dims: dict[str, int],
        output_dim: int,
        width: int = 256,
        dropout: float = 0.1,
    ) -> None:
        super().__init__(input_dims, output_dim)
        in_dim = sum(self.input_dims.values()) + len(self.keys)
        self.mlp = mlp(in_dim, width, self.output_dim, dropout)

    def forward(
        self, features: dict[str, torch.Tensor], mask: dict[str, torch.Tensor] | None = None
    ) -> FusionOutput:
        xs, present = masked_inputs(self, features, mask)
        flat = torch.cat([*xs, present.to(xs[0].dtype)], dim=1)  # (B, sum(D_k) + M)
        return FusionOutput(self.mlp(flat))
