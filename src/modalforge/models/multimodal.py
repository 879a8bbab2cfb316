"""``MultimodalModel``: encoders per input column + one fusion + a head, assembled from parts.

Like TorchMultimodal's ``LateFusion``, the model is built from the modules passed in, never by
subclassing. Inputs are keyed by manifest column (a manifest may hold two image columns); for a
column whose encoder is frozen, the caller may pass cached pooled features instead of raw inputs.
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from modalforge.encoders import Encoder, create_encoder
from modalforge.fusion import Fusion, create_fusion

Task = Literal["classification", "regression"]


@dataclass
class EncoderSpec:
    """Which registered encoder reads a column, with its constructor arguments."""

    name: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    #: "frozen" (features may come from the cache), "top:N" (last N blocks train), "full", or
    #: None: frozen for pretrained encoders, full for from-scratch ones
    train: str | None = None


@dataclass
class ModelConfig:
    """Everything needed to rebuild the architecture; saved in every run and bundle."""

    task: Task
    inputs: dict[str, EncoderSpec]  # column -> encoder
    num_outputs: int  # classes (classification) or targets (regression)
    fusion: str = "concat"
    #: the fusion's own arguments; ``width`` is its inner width (per-modality projections)
    fusion_kwargs: dict[str, Any] = field(default_factory=dict)
    fusion_out_dim: int = 256  # the fused vector's width (ignored by fusions that produce outputs)
    head_dropout: float = 0.1
    hidden: int | None = None  # deprecated: the old name of fusion_out_dim

    def __post_init__(self) -> None:
        if self.hidden is not None:
            warnings.warn("ModelConfig(hidden=...) is now fusion_out_dim=...", DeprecationWarning,
                          stacklevel=3)  # fmt: skip
            self.fusion_out_dim, self.hidden = self.hidden, None

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        del out["hidden"]
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        """From ``to_dict``'s output; bundles written before the widths had one name each say
        ``hidden`` for ``fusion_out_dim`` and ``fusion_kwargs.hidden`` for its ``width``."""
        data = dict(data)
        data["inputs"] = {k: EncoderSpec(**v) for k, v in data["inputs"].items()}
        if data.get("hidden") is not None:  # a bundle from before the rename: no warning
            data["fusion_out_dim"] = data.pop("hidden")
        data["fusion_kwargs"] = renamed_fusion_kwargs(data.get("fusion_kwargs") or {})
        return cls(**data)


def renamed_fusion_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    """``fusion_kwargs`` with the old name of the fusion's inner width (``hidden``) read as
    ``width``."""
    kwargs = dict(kwargs)
    if "hidden" in kwargs and "width" not in kwargs:
        kwargs["width"] = kwargs.pop("hidden")
    return kwargs


@dataclass
class ModelOutput:
    outputs: torch.Tensor  # (B, num_outputs): logits or regression values
    weights: torch.Tensor | None = None  # (B, M) fusion weights over sorted columns, if any


class MultimodalModel(nn.Module):
    """``encoders[col](inputs[col]).pooled`` (or ``features[col]``) -> fusion -> head."""

    def __init__(self, encoders: dict[str, Encoder], fusion: Fusion, head: nn.Module) -> None:
        super().__init__()
        self.columns = sorted(encoders)
        if self.columns != fusion.keys:
            raise ValueError(
                f"fusion keys {fusion.keys} do not match encoder columns {self.columns}"
            )
        # a list, not a ModuleDict: column names such as "a.b" or "values" are legal in manifests
        self.encoders = nn.ModuleList(encoders[c] for c in self.columns)
        self.fusion = fusion
        self.head = head

    def encoder(self, column: str) -> Encoder:
        return self.encoders[self.columns.index(column)]  # type: ignore[return-value]

    def encode(
        self,
        inputs: dict[str, dict[str, torch.Tensor]] | None = None,
        features: dict[str, torch.Tensor] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Pooled features per column: cached ``features`` where given, else the encoder's."""
        inputs, features = inputs or {}, features or {}
        out = {}
        for column, encoder in zip(self.columns, self.encoders, strict=True):
            if column in features:
                out[column] = features[column]
            elif column in inputs:
                out[column] = encoder(inputs[column]).pooled
            else:
                raise KeyError(f"no input and no cached features for column {column!r}")
        return out

    def forward(
        self,
        inputs: dict[str, dict[str, torch.Tensor]] | None = None,
        mask: dict[str, torch.Tensor] | None = None,
        features: dict[str, torch.Tensor] | None = None,
    ) -> ModelOutput:
        fused = self.fusion(self.encode(inputs, features), mask)
        return ModelOutput(self.head(fused.fused), fused.weights)


def build_model(config: ModelConfig, encoders: dict[str, Encoder] | None = None) -> MultimodalModel:
    """The architecture ``config`` describes. ``encoders`` may pass already-built (e.g. shared,
    pretrained) encoders for some columns; the rest are created from the registry."""
    built: dict[str, Encoder] = dict(encoders or {})
    for column, spec in config.inputs.items():
        if column not in built:
            built[column] = create_encoder(spec.name, **spec.kwargs)
        apply_training_mode(built[column], spec.train or default_training_mode(spec.name))
    fusion = create_fusion(
        config.fusion,
        {c: e.output_dim for c, e in built.items()},
        config.num_outputs if _produces_outputs(config.fusion) else config.fusion_out_dim,
        **config.fusion_kwargs,
    )
    if fusion.produces_outputs:
        head: nn.Module = nn.Identity()
    else:
        head = nn.Sequential(
            nn.Dropout(config.head_dropout), nn.Linear(config.fusion_out_dim, config.num_outputs)
        )
    return MultimodalModel(built, fusion, head)


def _produces_outputs(fusion: str) -> bool:
    from modalforge.fusion import list_fusions

    return next(i.produces_outputs for i in list_fusions() if i.name == fusion)


def default_training_mode(encoder_name: str) -> str:
    """Pretrained encoders stay frozen (their features are cached); from-scratch ones train."""
    from modalforge.encoders import list_encoders

    pretrained = next((i.pretrained for i in list_encoders() if i.name == encoder_name), True)
    return "frozen" if pretrained else "full"


def apply_training_mode(encoder: Encoder, mode: str) -> None:
    """``frozen``: no gradients; ``full``: everything trains; ``top:N``: the last N blocks train
    (``Encoder.unfreeze_top``; encoders without blocks refuse)."""
    if mode == "frozen":
        encoder.freeze()
    elif mode == "full":
        for p in encoder.parameters():
            p.requires_grad_(True)
    elif mode.startswith("top:"):
        encoder.unfreeze_top(int(mode.split(":", 1)[1]))
    else:
        raise ValueError(f"unknown training mode {mode!r} (frozen, full or top:N)")
