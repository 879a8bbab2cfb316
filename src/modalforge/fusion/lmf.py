"""Low-rank multimodal fusion (LMF, Liu et al. 2018): TFN's tensor product without the tensor."""

from __future__ import annotations

import functools

import torch
from torch import nn

from modalforge.fusion.base import Fusion, FusionOutput
from modalforge.fusion.common import masked_inputs
from modalforge.fusion.registry import register_fusion


@register_fusion(
    "lmf",
    "low-rank multimodal fusion: per-modality rank-r factors of the TFN weight tensor",
    tiny={"modality_dim": 8, "rank": 2},
)
class LowRankFusion(Fusion):
    """``z_k = tanh(W_k x_k) (B, d_m)`` (zero where modality ``k`` is missing: its 1 remains),
    factor outputs ``f_k = [z_k; 1] @ F_k`` with ``F_k (rank, d_m + 1, output_dim)`` giving
    ``(rank, B, output_dim)``, their element-wise product over modalities, summed over rank with
    learned rank weights, plus a bias: ``(B, output_dim)``.

    This equals a TFN whose weight tensor has rank ``rank``, at a cost linear in the number of
    modalities instead of exponential.
    """

    def __init__(
        self,
        input_dims: dict[str, int],
        output_dim: int,
        modality_dim: int = 32,
        rank: int = 4,
        dropout: float = 0.1,
    ) -> None:
        super().__init__(input_dims, output_dim)
        # tanh keeps each factor's input bounded, so a product of M factor outputs cannot blow up
        self.proj = nn.ModuleList(
            nn.Sequential(
                nn.Linear(self.input_dims[k], modality_dim), nn.Tanh(), nn.Dropout(dropout)
            )
            for k in self.keys
        )
        # std 1/sqrt(d_m + 1) gives factor outputs of unit order; the reference code's xavier init
        # makes a product of three of them ~1e-4 and its gradients vanish with it
        std = (modality_dim + 1) ** -0.5
        self.factors = nn.ParameterList(
            nn.Parameter(torch.randn(rank, modality_dim + 1, self.output_dim) * std)
            for _ in self.keys
        )
        self.rank_weights = nn.Parameter(torch.full((rank,), 1.0 / rank))
        self.bias = nn.Parameter(torch.zeros(self.output_dim))

    def forward(
        self, features: dict[str, torch.Tensor], mask: dict[str, torch.Tensor] | None = None
    ) -> FusionOutput:
        xs, present = masked_inputs(self, features, mask)
        fs = []
        for i, (proj, factor, x) in enumerate(zip(self.proj, self.factors, xs, strict=True)):
            z = torch.where(present[:, i : i + 1], proj(x), 0.0)
            z = torch.cat([z, torch.ones_like(z[:, :1])], dim=1)  # (B, d_m + 1)
            fs.append(torch.matmul(z, factor))  # (rank, B, output_dim)
        fused = functools.reduce(torch.mul, fs)
        fused = (self.rank_weights.view(-1, 1, 1) * fused).sum(dim=0) + self.bias
        return FusionOutput(fused)
