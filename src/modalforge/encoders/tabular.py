"""Tabular encoder: standardized numeric columns ``{"values": (B, F)}`` -> an MLP -> (B, D)."""

from __future__ import annotations

import torch
from torch import nn

from modalforge.encoders.base import Encoder, EncoderOutput
from modalforge.encoders.registry import register_encoder
from modalforge.schema import Modality


class TabularMLP(Encoder):
    modality = Modality.TABULAR

    def __init__(self, n_features: int, hidden: int = 64, layers: int = 2, dropout: float = 0.1):
        super().__init__()
        blocks: list[nn.Module] = []
        width = n_features
        for _ in range(layers):
            blocks += [
                nn.Linear(width, hidden),
                nn.LayerNorm(hidden),
                nn.GELU(),
                nn.Dropout(dropout),
            ]
            width = hidden
        self.net = nn.Sequential(*blocks)
        self.output_dim = width
        self.preprocessing = {"n_features": n_features, "standardize": True}

    def forward(self, batch: dict[str, torch.Tensor]) -> EncoderOutput:
        return EncoderOutput(pooled=self.net(batch["values"]))


@register_encoder(
    "tabular_mlp",
    Modality.TABULAR,
    "MLP over standardized numeric columns, from scratch",
    tiny={"n_features": 3, "hidden": 16},
    reference={"n_features": 16},
)
def tabular_mlp(n_features: int, **kwargs) -> TabularMLP:
    return TabularMLP(n_features, **kwargs)
