"""Gated attention fusion: a softmax over present modalities weights their projections."""

from __future__ import annotations

import math

import torch
from torch import nn

from modalforge.fusion.base import Fusion, FusionOutput
from modalforge.fusion.common import masked_inputs, masked_softmax, projection
from modalforge.fusion.registry import register_fusion


@register_fusion(
    "attention",
    "per-modality projections weighted by a softmax over present modalities of learned scores",
    tiny={"width": 32},
)
class AttentionFusion(Fusion):
    """``h_k = proj_k(x_k) (B, d)``, ``s_k = <h_k, q> / sqrt(d)`` with a learned scoring vector
    ``q``, ``a = softmax(s)`` over the present modalities ``(B, M)``, ``sum_k a_k h_k (B, d)``,
    then a linear output projection to ``output_dim`` (``project_output=False`` returns the
    ``(B, d)`` sum itself and needs ``width == output_dim``). ``weights`` is ``a``; a row with no
    modality present gets zero weights and a fused vector of zeros (plus the output bias).
    """

    def __init__(
        self,
        input_dims: dict[str, int],
        output_dim: int,
        width: int = 256,
        dropout: float = 0.1,
        project_output: bool = True,
    ) -> None:
        super().__init__(input_dims, output_dim)
        if not project_output and width != self.output_dim:
            raise ValueError(
                f"project_output=False needs width == output_dim ({width} != {output_dim})"
            )
        self.proj = nn.ModuleList(projection(self.input_dims[k], width, dropout) for k in self.keys)
        # no bias: softmax ignores a shift shared by all modalities, so a bias would get no gradient
        self.score = nn.Linear(width, 1, bias=False)
        self.scale = 1.0 / math.sqrt(width)
        self.out = nn.Linear(width, self.output_dim) if project_output else nn.Identity()

    def forward(
        self, features: dict[str, torch.Tensor], mask: dict[str, torch.Tensor] | None = None
    ) -> FusionOutput:
        xs, present = masked_inputs(self, features, mask)
        h = torch.stack([proj(x) for proj, x in zip(self.proj, xs, strict=True)], dim=1)  # (B,M,d)
        weights = masked_softmax(self.score(h).squeeze(-1) * self.scale, present)  # (B, M)
        fused = (weights.unsqueeze(-1) * h).sum(dim=1)  # (B, d)
        return FusionOutput(self.out(fused), weights)
