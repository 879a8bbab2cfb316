"""Tensor fusion (TFN, Zadeh et al. 2017): the outer product of ``[z_k; 1]`` over modalities."""

from __future__ import annotations

import functools

import torch
from torch import nn

from modalforge.fusion.base import Fusion, FusionOutput
from modalforge.fusion.common import masked_inputs, mlp
from modalforge.fusion.registry import register_fusion


@register_fusion(
    "tensor",
    "TFN: outer product of per-modality [z; 1] (all unimodal, bimodal, ... terms), then an MLP",
    tiny={"width": 32, "modality_dim": 4},
)
class TensorFusion(Fusion):
    """``z_k = tanh(W_k x_k) (B, d_m)`` (``z_k = 0`` where modality ``k`` is missing, so only its
    appended 1 survives), ``[z_1; 1] ⊗ ... ⊗ [z_M; 1]`` flattened to ``(B, prod_k (d_m + 1))``,
    then an MLP to ``output_dim``.

    The appended 1 keeps every lower-order term (each ``z_k`` alone, each pair, ...) in the
    product. Its width grows as ``(d_m + 1) ** M``: 729 for three modalities at ``d_m = 8``,
    59049 for five; keep ``modality_dim`` small.
    """

    def __init__(
        self,
        input_dims: dict[str, int],
        output_dim: int,
        width: int = 256,
        dropout: float = 0.1,
        modality_dim: int = 8,
    ) -> None:
        super().__init__(input_dims, output_dim)
        # tanh keeps each factor in [-1, 1], so a product of M of them cannot blow up
        self.proj = nn.ModuleList(
            nn.Sequential(nn.Linear(self.input_dims[k], modality_dim), nn.Tanh()) for k in self.keys
        )
        self.tensor_dim = (modality_dim + 1) ** len(self.keys)
        self.mlp = mlp(self.tensor_dim, width, self.output_dim, dropout)

    def forward(
        self, features: dict[str, torch.Tensor], mask: dict[str, torch.Tensor] | None = None
    ) -> FusionOutput:
        xs, present = masked_inputs(self, features, mask)
        zs = []
        for i, (proj, x) in enumerate(zip(self.proj, xs, strict=True)):
            z = torch.where(present[:, i : i + 1], proj(x), 0.0)
            zs.append(torch.cat([z, torch.ones_like(z[:, :1])], dim=1))  # (B, d_m + 1)
        fused = functools.reduce(_outer, zs)  # (B, prod_k (d_m + 1))
        return FusionOutput(self.mlp(fused))


def _outer(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise outer product, flattened: ``(B, P), (B, Q) -> (B, P * Q)``."""
    return (a.unsqueeze(2) * b.unsqueeze(1)).flatten(1)
