"""Element-wise product fusion (MLB, the low-rank bilinear pooling of Kim et al. 2017)."""

from __future__ import annotations

import functools

import torch
from torch import nn

from modalforge.fusion.base import Fusion, FusionOutput
from modalforge.fusion.common import masked_inputs
from modalforge.fusion.registry import register_fusion


@register_fusion(
    "product",
    "tanh projections multiplied element-wise (MLB low-rank bilinear), missing ones set to 1",
    tiny={"width": 32},
)
class ProductFusion(Fusion):
    """``z_k = tanh(W_k x_k) (B, d)``, ``z_k = 1`` (the multiplicative identity) where modality
    ``k`` is missing, ``prod_k z_k (B, d)``, dropout, linear to ``output_dim``. With every modality
    missing the product is all ones, which is finite but carries no information."""

    def __init__(
        self,
        input_dims: dict[str, int],
        output_dim: int,
        width: int = 256,
        dropout: float = 0.1,
    ) -> None:
        super().__init__(input_dims, output_dim)
        self.proj = nn.ModuleList(nn.Linear(self.input_dims[k], width) for k in self.keys)
        self.dropout = nn.Dropout(dropout)
        self.out = nn.Linear(width, self.output_dim)

    def forward(
        self, features: dict[str, torch.Tensor], mask: dict[str, torch.Tensor] | None = None
    ) -> FusionOutput:
        xs, present = masked_inputs(self, features, mask)
        zs = [
            torch.where(present[:, i : i + 1], torch.tanh(proj(x)), 1.0)  # (B, d)
            for i, (proj, x) in enumerate(zip(self.proj, xs, strict=True))
        ]
        fused = functools.reduce(torch.mul, zs)
        return FusionOutput(self.out(self.dropout(fused)))
