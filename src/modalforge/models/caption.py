"""Image captioning: a registered image encoder's grid features + a decoder over a word vocabulary.

Two decoders, one interface (``logits`` for teacher forcing, ``start`` / ``step`` for decoding):

* ``gru`` -- Show, Attend and Tell (Xu et al. 2015) with a GRU cell: at each step additive
  attention over the grid (``v . tanh(W_m m + W_h h)``), the context gated by
  ``sigmoid(W_b h)``, the cell fed ``[word embedding, context]``, its first state
  ``tanh(W_i mean(memory))``, the output layer reading ``[h, context, embedding]``.
* ``transformer`` -- a pre-norm transformer decoder (causal self-attention, cross-attention to
  the grid), learned positions, the output layer tied to the word embeddings.

The memory is the grid (``(H/32) x (W/32)`` positions for EfficientNet) projected to
``decoder_dim``, plus the pooled feature as one more position. Frozen encoders' grids come from
the feature cache (flattened), so training touches only the decoder. Decoding -- greedy, beam
search with a length penalty, nucleus sampling -- is in :mod:`modalforge.models.decoding`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from modalforge.encoders import Encoder, create_encoder
from modalforge.models.multimodal import EncoderSpec, apply_training_mode, default_training_mode

DECODERS = ("transformer", "gru")


@dataclass
class CaptionConfig:
    """Everything needed to rebuild a captioner; saved in every run and bundle."""

    image: str  # the image column
    caption: str  # the caption column (a target, not an input)
    encoder: EncoderSpec
    vocab_size: int
    grid: int  # positions in the encoder's grid (16 for EfficientNet at 128 px)
    decoder: str = "transformer"
    decoder_dim: int = 256  # the decoder's width (word embeddings, attention, GRU state)
    layers: int = 2
    heads: int = 4
    dropout: float = 0.3
    max_length: int = 24  # tokens including <bos> and <eos>
    task: str = "caption"

    def __post_init__(self) -> None:
        if self.decoder not in DECODERS:
            raise ValueError(f"decoder must be one of {DECODERS}, not {self.decoder!r}")
        if self.decoder_dim % self.heads:
            raise ValueError(f"decoder_dim {self.decoder_dim} is not divisible by heads "
                             f"{self.heads}")  # fmt: skip

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CaptionConfig:
        """From ``to_dict``'s output (bundles written before the widths had one name each say
        ``dim`` for ``decoder_dim``)."""
        data = dict(data)
        data["encoder"] = EncoderSpec(**data["encoder"])
        if "dim" in data:
            data["decoder_dim"] = data.pop("dim")
        return cls(**data)


class CaptionModel(nn.Module):
    """``memory(features)`` -> ``(B, grid + 1, decoder_dim)``; ``logits(memory, tokens)`` ->
    ``(B, T, V)`` (teacher forcing: position t predicts token t + 1); ``start`` / ``step``:
    decoding one token at a time, the state a dict of tensors (the prefix, or the GRU's hidden
    state and last token) -- what the ONNX export's one-step graph runs."""

    def __init__(self, encoder: Encoder, config: CaptionConfig) -> None:
        super().__init__()
        self.config = config
        self.columns = [config.image]
        self.encoders = nn.ModuleList([encoder])
        d, v = config.decoder_dim, config.vocab_size
        self.bridge = nn.Sequential(nn.Linear(encoder.output_dim, d), nn.LayerNorm(d),
                                    nn.Dropout(config.dropout))  # fmt: skip
        self.embed = nn.Embedding(v, d, padding_idx=0)
        self.drop = nn.Dropout(config.dropout)
        if config.decoder == "transformer":
            self.positions = nn.Embedding(config.max_length, d)
            layer = nn.TransformerDecoderLayer(d, config.heads, 4 * d, config.dropout,
                                               activation="gelu", batch_first=True,
                                               norm_first=True)  # fmt: skip
            self.decoder = nn.TransformerDecoder(layer, config.layers, norm=nn.LayerNorm(d))
            self.out = nn.Linear(d, v)
            self.out.weight = self.embed.weight  # tied (Press & Wolf 2017)
            # scaled by sqrt(d) on the way in, so N(0, 1/d) keeps both ends at unit scale (the
            # default N(0, 1) starts the tied output layer at logits of ~sqrt(d))
            nn.init.normal_(self.embed.weight, std=d**-0.5)
            with torch.no_grad():
                self.embed.weight[0].zero_()
        else:
            self.init_h = nn.Linear(d, d)
            self.att_m, self.att_h = nn.Linear(d, d), nn.Linear(d, d, bias=False)
            self.att_v = nn.Linear(d, 1, bias=False)
            self.gate = nn.Linear(d, d)
            self.cell = nn.GRUCell(2 * d, d)
            self.out = nn.Linear(3 * d, v)

    def encoder(self, column: str) -> Encoder:
        if column != self.config.image:
            raise KeyError(f"no encoder for column {column!r} (the image column is "
                           f"{self.config.image!r})")  # fmt: skip
        return self.encoders[0]  # type: ignore[return-value]

    def memory(
        self, features: torch.Tensor | None = None, inputs: dict[str, torch.Tensor] | None = None
    ) -> torch.Tensor:
        """Cached grid features ``(B, grid * D)`` (or ``(B, grid, D)``), or raw encoder
        ``inputs``, -> ``(B, grid + 1, dim)``."""
        if features is None:
            out = self.encoders[0](inputs)
            grid = out.sequence if out.sequence is not None else out.pooled[:, None]
        else:
            grid = features.view(len(features), self.config.grid, -1)
        grid = torch.cat([grid, grid.mean(1, keepdim=True)], 1)
        return self.bridge(grid.float())

    def logits(self, memory: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        if self.config.decoder == "transformer":
            return self._transformer(memory, tokens)
        return self._gru(memory, tokens)

    def start(self, memory: torch.Tensor, bos: int) -> dict[str, torch.Tensor]:
        """The decoding state before the first step: the prefix ``<bos>`` (transformer), or the
        first hidden state and the token to read next (GRU)."""
        token = torch.full((len(memory),), bos, dtype=torch.long, device=memory.device)
        if self.config.decoder == "transformer":
            return {"prefix": token[:, None]}
        return {"h": self.init_state(memory), "token": token}

    def step(
        self, memory: torch.Tensor, state: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The next token's logits ``(B, V)`` and the state that has read the last token
        (``decoding.advance`` then appends the chosen one)."""
        if self.config.decoder == "transformer":
            return self._transformer(memory, state["prefix"], padded=False)[:, -1], state
        logits, h = self.gru_step(memory, state["h"], state["token"])
        return logits, {**state, "h": h}

    def init_state(self, memory: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.init_h(memory.mean(1)))

    def gru_step(
        self, memory: torch.Tensor, h: torch.Tensor, token: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One Show-Attend-Tell step: read ``token`` with the context attended from ``h``."""
        emb = self.drop(self.embed(token))
        context, _ = self.attend(memory, h)
        h = self.cell(torch.cat([emb, context], -1), h)
        return self.out(self.drop(torch.cat([h, context, emb], -1))), h

    def _transformer(self, memory: torch.Tensor, tokens: torch.Tensor, padded: bool = True
                     ) -> torch.Tensor:  # fmt: skip
        """``padded``: mask ``<pad>`` positions (teacher forcing); a decoding prefix has none,
        and without the mask the step exports to ONNX with a dynamic length."""
        t = tokens.shape[1]
        if t > self.config.max_length:
            raise ValueError(f"{t} tokens: this model was built for at most "
                             f"{self.config.max_length}")  # fmt: skip
        pos = torch.arange(t, device=tokens.device)
        x = self.drop(self.embed(tokens) * math.sqrt(self.config.decoder_dim) + self.positions(pos))
        causal = torch.ones(t, t, dtype=torch.bool, device=tokens.device).triu(1)
        pad = tokens == 0 if padded else None
        h = self.decoder(x, memory, tgt_mask=causal, tgt_key_padding_mask=pad, tgt_is_causal=True)
        return self.out(h)

    def attend(self, memory: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Show-Attend-Tell's soft attention: the gated context ``(B, dim)`` and the weights
        ``(B, positions)``."""
        scores = self.att_v(torch.tanh(self.att_m(memory) + self.att_h(h)[:, None])).squeeze(-1)
        alpha = scores.softmax(-1)
        context = (alpha[..., None] * memory).sum(1)
        return torch.sigmoid(self.gate(h)) * context, alpha

    def _gru(self, memory: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        h = self.init_state(memory)
        steps = []
        for i in range(tokens.shape[1]):
            logits, h = self.gru_step(memory, h, tokens[:, i])
            steps.append(logits)
        return torch.stack(steps, 1)


def caption_loss(
    model: CaptionModel, memory: torch.Tensor, tokens: torch.Tensor, label_smoothing: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher forcing: cross-entropy of every next token (padding ignored), with label
    smoothing; also the share of next tokens predicted right."""
    logits = model.logits(memory, tokens[:, :-1])
    target = tokens[:, 1:]
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                           ignore_index=0, label_smoothing=label_smoothing)  # fmt: skip
    real = target != 0
    accuracy = ((logits.argmax(-1) == target) & real).sum() / real.sum().clamp(min=1)
    return loss, accuracy


def build_caption(config: CaptionConfig, encoder: Encoder | None = None) -> CaptionModel:
    spec = config.encoder
    encoder = encoder or create_encoder(spec.name, **spec.kwargs)
    apply_training_mode(encoder, spec.train or default_training_mode(spec.name))
    return CaptionModel(encoder, config)


__all__ = ["CaptionConfig", "CaptionModel", "build_caption", "caption_loss"]
