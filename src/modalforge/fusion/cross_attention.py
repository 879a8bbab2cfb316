"""Cross-attention fusion: a transformer over one token per modality and a fusion token."""

from __future__ import annotations

import torch
from torch import nn

from modalforge.fusion.base import Fusion, FusionOutput
from modalforge.fusion.common import masked_inputs
from modalforge.fusion.registry import register_fusion


@register_fusion(
    "cross_attention",
    "transformer encoder over one token per modality plus a learned fusion [CLS] token",
    tiny={"width": 32, "layers": 1, "heads": 2},
)
class CrossAttentionFusion(Fusion):
    """``x_k (B, D_k)`` to a token ``(B, d)`` plus a learned modality embedding; a learned fusion
    token is prepended, giving ``(B, 1 + M, d)``; an ``nn.TransformerEncoder`` runs with the
    missing modalities as padding (the fusion token is never masked, so no row is all padding);
    the fusion token's output, layer-normed, is projected to ``output_dim``.

    ``weights`` ``(B, M)`` is the last layer's attention of the fusion token to the modality
    tokens, averaged over heads, renormalized over the present modalities (zeros where none is).
    """

    def __init__(
        self,
        input_dims: dict[str, int],
        output_dim: int,
        width: int = 256,
        layers: int = 2,
        heads: int = 4,
        dropout: float = 0.1,
        ff_mult: int = 2,
    ) -> None:
        super().__init__(input_dims, output_dim)
        if width % heads:
            raise ValueError(f"width ({width}) must be divisible by heads ({heads})")
        self.tokenize = nn.ModuleList(nn.Linear(self.input_dims[k], width) for k in self.keys)
        self.modality_embedding = nn.Parameter(torch.randn(len(self.keys), width) * 0.02)
        self.cls = nn.Parameter(torch.randn(1, 1, width) * 0.02)
        layer = nn.TransformerEncoderLayer(
            width,
            heads,
            dim_feedforward=ff_mult * width,
            dropout=dropout,
            activation="gelu",
            batch_first=True,
            norm_first=True,
        )
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)
        self.out = nn.Linear(width, self.output_dim)

    def forward(
        self, features: dict[str, torch.Tensor], mask: dict[str, torch.Tensor] | None = None
    ) -> FusionOutput:
        xs, present = masked_inputs(self, features, mask)
        tokens = torch.stack([tok(x) for tok, x in zip(self.tokenize, xs, strict=True)], dim=1)
        tokens = tokens + self.modality_embedding  # (B, M, d)
        x = torch.cat([self.cls.expand(tokens.shape[0], -1, -1), tokens], dim=1)  # (B, 1 + M, d)
        padding = torch.cat([torch.zeros_like(present[:, :1]), ~present], dim=1)  # True = ignore
        # the layers are run one by one, as TransformerEncoder does, to keep the last one's input
        # for the attention weights
        for layer in self.encoder.layers[:-1]:
            x = layer(x, src_key_padding_mask=padding)
        last = self.encoder.layers[-1]
        weights = _cls_attention(last.self_attn, last.norm1(x), padding)[:, 1:]  # (B, M)
        weights = weights / weights.sum(dim=1, keepdim=True).clamp_min(1e-12)
        x = last(x, src_key_padding_mask=padding)
        return FusionOutput(self.out(self.norm(x[:, 0])), weights)


def _cls_attention(
    attn: nn.MultiheadAttention, x: torch.Tensor, padding: torch.Tensor
) -> torch.Tensor:
    """Attention probabilities ``(B, T)`` of token 0 of ``x (B, T, d)`` over all tokens, averaged
    over heads: one query, recomputed from ``attn``'s weights because the encoder layer asks
    ``attn`` for none (and ``need_weights`` would return them after dropout)."""
    heads, head_dim = attn.num_heads, attn.head_dim
    w_q, w_k, _ = attn.in_proj_weight.chunk(3)
    b_q, b_k, _ = attn.in_proj_bias.chunk(3)
    q = nn.functional.linear(x[:, :1], w_q, b_q).unflatten(-1, (heads, head_dim)).transpose(1, 2)
    k = nn.functional.linear(x, w_k, b_k).unflatten(-1, (heads, head_dim)).transpose(1, 2)
    scores = q @ k.transpose(-1, -2) * head_dim**-0.5  # (B, heads, 1, T)
    scores = scores.masked_fill(padding[:, None, None, :], float("-inf"))
    return scores.softmax(dim=-1).mean(dim=1).squeeze(1)
