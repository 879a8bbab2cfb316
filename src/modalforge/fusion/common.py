"""Building blocks shared by the fusions: masking, masked softmax, small MLPs.

Per-modality modules live in ``nn.ModuleList``s in sorted key order (index ``i`` is
``fusion.keys[i]``) rather than ``nn.ModuleDict``s, because a modality is named after its column
and a column may be called ``values``, ``keys`` or ``a.b``, which a ``ModuleDict`` rejects.
"""

from __future__ import annotations

import torch
from torch import nn

from modalforge.fusion.base import Fusion


def masked_inputs(
    fusion: Fusion, features: dict[str, torch.Tensor], mask: dict[str, torch.Tensor] | None
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The features in sorted key order, each ``(B, D_k)`` with missing rows set to zero, and the
    ``(B, M)`` bool presence matrix.

    ``torch.where`` (not a multiplication by the mask) so that NaN or inf in a missing row cannot
    leak into the result.
    """
    missing = [k for k in fusion.keys if k not in features]
    if missing:
        raise KeyError(f"features lack modalities {missing} (pass zeros and mask them out)")
    present = fusion.presence(features, mask) > 0
    xs = [
        torch.where(present[:, i : i + 1], features[k], torch.zeros_like(features[k]))
        for i, k in enumerate(fusion.keys)
    ]
    return xs, present


def masked_softmax(scores: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    """Softmax of ``(B, M)`` scores over the present modalities; missing ones get weight 0.

    A row with no modality present would be all ``-inf`` and softmax to NaN, so its scores are
    left unmasked for the softmax and the result zeroed afterwards: such rows get all-zero weights.
    """
    any_present = present.any(dim=1, keepdim=True)
    scores = scores.masked_fill(~present & any_present, float("-inf"))
    return scores.softmax(dim=1) * present.to(scores.dtype)


def projection(in_dim: int, out_dim: int, dropout: float) -> nn.Sequential:
    """Linear + GELU + Dropout: ``(B, in_dim) -> (B, out_dim)``."""
    return nn.Sequential(nn.Linear(in_dim, out_dim), nn.GELU(), nn.Dropout(dropout))


def mlp(in_dim: int, width: int, out_dim: int, dropout: float) -> nn.Sequential:
    """One hidden layer of ``width``: ``(B, in_dim) -> (B, width) -> (B, out_dim)``."""
    return nn.Sequential(projection(in_dim, width, dropout), nn.Linear(width, out_dim))
