"""Late fusion: one output head per modality, their outputs averaged over present modalities."""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from modalforge.fusion.base import Fusion, FusionOutput
from modalforge.fusion.common import masked_inputs, masked_softmax, mlp
from modalforge.fusion.registry import register_fusion


@register_fusion(
    "late",
    "a head per modality producing the task outputs, averaged (or learned-softmax weighted) "
    "over present modalities",
    tiny={"width": 32},
)
class LateFusion(Fusion):
    """Each modality's head maps ``x_k (B, D_k)`` to outputs ``(B, output_dim)`` on its own; the
    fused outputs are their weighted sum with weights ``(B, M)`` that are uniform over the present
    modalities (``weighting="mean"``) or a softmax of one learned logit per modality renormalized
    over them (``weighting="learned"``). A row with no modality present gives zeros.
    """

    produces_outputs = True

    def __init__(
        self,
        input_dims: dict[str, int],
        output_dim: int,
        width: int = 256,
        dropout: float = 0.1,
        weighting: Literal["mean", "learned"] = "mean",
    ) -> None:
        super().__init__(input_dims, output_dim)
        if weighting not in ("mean", "learned"):
            raise ValueError(f"weighting must be 'mean' or 'learned', not {weighting!r}")
        self.weighting = weighting
        self.heads = nn.ModuleList(
            mlp(self.input_dims[k], width, self.output_dim, dropout) for k in self.keys
        )
        self.weight_logits = (
            nn.Parameter(torch.zeros(len(self.keys))) if weighting == "learned" else None
        )

    def forward(
        self, features: dict[str, torch.Tensor], mask: dict[str, torch.Tensor] | None = None
    ) -> FusionOutput:
        xs, present = masked_inputs(self, features, mask)
        outputs = torch.stack(
            [head(x) for head, x in zip(self.heads, xs, strict=True)], dim=1
        )  # (B, M, output_dim)
        if self.weight_logits is None:
            weights = present.to(outputs.dtype)
            weights = weights / weights.sum(dim=1, keepdim=True).clamp_min(1.0)
        else:
            weights = masked_softmax(self.weight_logits.expand_as(present), present)
        fused = (weights.unsqueeze(-1) * outputs).sum(dim=1)
        return FusionOutput(fused, weights)
