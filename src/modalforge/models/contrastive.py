"""CLIP-style alignment: one tower per column -- a registered encoder and a projection head --
into one embedding space, trained with a symmetric InfoNCE loss over pairs of columns.

No package ships a joint image-text-audio model, so, as LiT and open_clip do with unimodal
backbones, the towers start from the packaged encoders: frozen (their pooled features come from
the cache, only the projections train), locked on one side (LiT: the image tower frozen, the
text tower tuned) or partly unfrozen (``top:N``: the last N blocks train).

    config = ContrastiveConfig(inputs={"image": EncoderSpec("efficientnet_lite0"),
                                       "text": EncoderSpec("minilm", train="top:2")},
                               pairs=[("image", "text")])
    model = build_contrastive(config)
    out = model(inputs, mask)            # out.embeddings[column]: (B, D), unit length
    loss = contrastive_loss(out, pairs)  # mean over pairs of the symmetric InfoNCE

The temperature is learned as ``logit_scale = log(1 / T)``, starts at T = 0.07 and is clamped to
``[0, log(max_logit_scale)]`` (CLIP: 100) after every step, so the logits never blow up.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from modalforge.encoders import Encoder, create_encoder
from modalforge.models.multimodal import (
    EncoderSpec,
    apply_training_mode,
    default_training_mode,
)


@dataclass
class ContrastiveConfig:
    """Everything needed to rebuild the towers; saved in every run and bundle."""

    inputs: dict[str, EncoderSpec]  # column -> encoder
    pairs: list[tuple[str, str]]  # which columns are aligned with which
    embed_dim: int = 256
    projection: str = "mlp"  # mlp (Linear-GELU-Linear, as in SimCLR / LiT heads) | linear
    dropout: float = 0.0  # in the mlp projection: small data overfits the heads fast
    init_temperature: float = 0.07
    max_logit_scale: float = 100.0
    task: str = "contrastive"

    def __post_init__(self) -> None:
        self.pairs = [tuple(p) for p in self.pairs]  # type: ignore[misc]
        for a, b in self.pairs:
            if a == b or a not in self.inputs or b not in self.inputs:
                raise ValueError(
                    f"pair {a}:{b}: needs two different input columns (inputs: "
                    f"{sorted(self.inputs)})"
                )
        if self.projection not in ("mlp", "linear"):
            raise ValueError(f"projection must be mlp or linear, not {self.projection!r}")

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["pairs"] = [list(p) for p in self.pairs]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ContrastiveConfig:
        data = dict(data)
        data["inputs"] = {k: EncoderSpec(**v) for k, v in data["inputs"].items()}
        return cls(**data)


@dataclass
class ContrastiveOutput:
    embeddings: dict[str, torch.Tensor]  # column -> (B, D), L2-normalized
    scale: torch.Tensor  # exp(logit_scale), clamped: multiplies the cosine similarities


def _projection(in_dim: int, out_dim: int, kind: str, dropout: float) -> nn.Module:
    if kind == "linear":
        return nn.Linear(in_dim, out_dim)
    return nn.Sequential(nn.Dropout(dropout), nn.Linear(in_dim, in_dim), nn.GELU(),
                         nn.Dropout(dropout), nn.Linear(in_dim, out_dim))  # fmt: skip


class ContrastiveModel(nn.Module):
    """Towers ``encoders[c] -> projections[c] -> normalize`` per column, sorted by column."""

    def __init__(self, encoders: dict[str, Encoder], config: ContrastiveConfig) -> None:
        super().__init__()
        self.config = config
        self.columns = sorted(encoders)
        # lists, not ModuleDicts: column names such as "a.b" are legal in manifests
        self.encoders = nn.ModuleList(encoders[c] for c in self.columns)
        self.projections = nn.ModuleList(
            _projection(encoders[c].output_dim, config.embed_dim, config.projection, config.dropout)
            for c in self.columns
        )
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / config.init_temperature)))

    def encoder(self, column: str) -> Encoder:
        return self.encoders[self.columns.index(column)]  # type: ignore[return-value]

    @property
    def scale(self) -> torch.Tensor:
        return self.logit_scale.clamp(0, math.log(self.config.max_logit_scale)).exp()

    def clamp_(self) -> None:
        """Keep the learned temperature in range (call after each optimizer step)."""
        with torch.no_grad():
            self.logit_scale.clamp_(0, math.log(self.config.max_logit_scale))

    def project(self, column: str, pooled: torch.Tensor) -> torch.Tensor:
        """Pooled encoder features of ``column`` -> unit-length embeddings."""
        projection = self.projections[self.columns.index(column)]
        return F.normalize(projection(pooled), dim=-1)

    def forward(
        self,
        inputs: dict[str, dict[str, torch.Tensor]] | None = None,
        mask: dict[str, torch.Tensor] | None = None,  # unused: the loss reads the batch's mask
        features: dict[str, torch.Tensor] | None = None,
    ) -> ContrastiveOutput:
        """Embeddings of every column given as raw ``inputs`` or cached pooled ``features``."""
        inputs, features = inputs or {}, features or {}
        out = {}
        for column, encoder in zip(self.columns, self.encoders, strict=True):
            if column in features:
                pooled = features[column]
            elif column in inputs:
                pooled = encoder(inputs[column]).pooled
            else:
                continue
            out[column] = self.project(column, pooled)
        return ContrastiveOutput(out, self.scale)


def clip_loss(a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE of unit-length ``a`` (B, D) and ``b`` (B, D) whose row i belong
    together: cross-entropy of ``scale * a @ b.T`` over rows and over columns, averaged."""
    logits = scale * a @ b.T
    target = torch.arange(len(a), device=a.device)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


def contrastive_loss(
    out: ContrastiveOutput, pairs: list[tuple[str, str]], mask: dict[str, torch.Tensor]
) -> torch.Tensor:
    """Mean of ``clip_loss`` over ``pairs``, each on the rows that have both columns (a pair
    with fewer than two such rows in the batch has no negatives and is skipped)."""
    losses = []
    for a, b in pairs:
        both = mask[a].bool() & mask[b].bool()
        if int(both.sum()) >= 2:
            losses.append(clip_loss(out.embeddings[a][both], out.embeddings[b][both], out.scale))
    if not losses:  # keeps the graph connected, so DDP and the optimizer see a loss
        return out.scale * 0.0
    return torch.stack(losses).mean()


def build_contrastive(
    config: ContrastiveConfig, encoders: dict[str, Encoder] | None = None
) -> ContrastiveModel:
    """The towers ``config`` describes (``encoders``: already-built ones for some columns)."""
    built: dict[str, Encoder] = dict(encoders or {})
    for column, spec in config.inputs.items():
        if column not in built:
            built[column] = create_encoder(spec.name, **spec.kwargs)
        apply_training_mode(built[column], spec.train or default_training_mode(spec.name))
    return ContrastiveModel(built, config)


__all__ = [
    "ContrastiveConfig",
    "ContrastiveModel",
    "ContrastiveOutput",
    "build_contrastive",
    "clip_loss",
    "contrastive_loss",
]
