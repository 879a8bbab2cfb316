"""Rows of a manifest -> model inputs, through each encoder's preprocessing.

A ``Featurizer`` turns one column's raw values (paths, texts, numbers) into the batch dict its
encoder reads, with the same pure functions the server will call. ``MultimodalDataset`` yields
per-row raw items and presence flags; ``collate`` builds a batch: ``{"inputs": {column: batch
dict}, "mask": {column: (B,) bool}, "y": (B,)}``. Missing values become placeholders (a blank
image, a short silence, an empty text) whose features the fusion masks out.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageEnhance

from modalforge.data.audio import AudioConfig, fit_length, load_audio
from modalforge.data.graph import collate_graphs, load_graph, parse_graph
from modalforge.data.image import ImageConfig, decode_image, resize_image, to_tensor
from modalforge.data.manifest import Manifest, is_missing
from modalforge.data.tabular import to_float
from modalforge.data.text import TextConfig, WordVocab, load_tokenizer, normalize_text, tokenize
from modalforge.schema import Modality


@dataclass(frozen=True)
class Augment:
    """Training-time augmentation, per modality; all off by default and never used in eval."""

    image_flip: bool = False
    image_crop: float = 0.0  # random-resized-crop: up to this share of each side cut away
    image_jitter: float = 0.0  # brightness / contrast / saturation factors in 1 +- jitter
    audio_noise: float = 0.0  # white noise RMS relative to the clip's RMS
    audio_gain_db: float = 0.0  # random gain in +- dB
    audio_shift: float = 0.0  # random circular time shift, share of the clip
    text_token_dropout: float = 0.0  # share of words dropped

    @property
    def any(self) -> bool:
        return any(v for v in self.__dict__.values())


class Featurizer:
    """One input column: ``load(value, root, train)`` -> item, ``collate(items)`` -> batch dict."""

    modality: Modality

    def __init__(
        self,
        modality: Modality,
        preprocessing: dict[str, Any],
        vocab: WordVocab | None = None,
        augment: Augment = Augment(),
    ) -> None:
        self.modality = modality
        self.preprocessing = dict(preprocessing)
        self.augment = augment
        if modality is Modality.IMAGE:
            fields = ImageConfig.__dataclass_fields__
            self.image_cfg = ImageConfig(**{k: v for k, v in preprocessing.items() if k in fields})
        elif modality is Modality.TEXT:
            self.text_cfg = TextConfig(
                max_length=int(preprocessing.get("max_length", 64)),
                padding=preprocessing.get("padding", "max_length"),
            )
            name = preprocessing.get("tokenizer", "minilm")
            if name == "word_vocab":
                if vocab is None:
                    raise ValueError(
                        "a word-level text encoder needs the WordVocab of its training data"
                    )
                self.tokenizer = vocab
            else:
                self.tokenizer = load_tokenizer(name)
        elif modality is Modality.AUDIO:
            self.audio_cfg = AudioConfig(
                sample_rate=int(preprocessing.get("sample_rate", 16_000)),
                clip_seconds=None,
                max_decode_seconds=float(preprocessing.get("max_decode_seconds", 600.0)),
            )
            self.max_samples = round(
                float(preprocessing.get("max_seconds", 30.0)) * self.audio_cfg.sample_rate
            )

    # -- one value ----------------------------------------------------------------------------
    def load(
        self, value: Any, root: Path | None, train: bool = False, rng: random.Random | None = None
    ):
        """Decode + preprocess one present value (raises DecodeError on bad data)."""
        rng = rng or random.Random()
        m = self.modality
        if m is Modality.IMAGE:
            img = decode_image(
                _source(value, root), self.image_cfg.max_pixels, self.image_cfg.background
            )
            if train and self.augment.any:
                img = _augment_image(img, self.augment, rng)
            return to_tensor(resize_image(img, self.image_cfg), self.image_cfg.normalization)
        if m is Modality.TEXT:
            text = normalize_text(value)
            if train and self.augment.text_token_dropout > 0:
                words = text.split()
                kept = [w for w in words if rng.random() >= self.augment.text_token_dropout]
                text = " ".join(kept or words[:1])
            return text
        if m is Modality.AUDIO:
            wave = fit_length(load_audio(_source(value, root), self.audio_cfg), None)[
                : self.max_samples
            ]
            if train and self.augment.any:
                wave = _augment_audio(wave, self.augment, rng)
            return wave
        if m is Modality.TABULAR:
            return to_float(value)
        if m is Modality.GRAPH:
            return (
                load_graph(_source(value, root))
                if not isinstance(value, dict)
                else parse_graph(value)
            )
        raise ValueError(f"no featurizer for {m}")

    def placeholder(self):
        """What a missing value turns into (masked out by the fusion, never read as data)."""
        m = self.modality
        if m is Modality.IMAGE:
            return torch.zeros(3, self.image_cfg.size, self.image_cfg.size)
        if m is Modality.TEXT:
            return "-"
        if m is Modality.AUDIO:
            return np.zeros(self.audio_cfg.sample_rate // 10, dtype=np.float32)
        if m is Modality.TABULAR:
            return 0.0
        if m is Modality.GRAPH:
            return parse_graph({"num_nodes": 1, "edges": []})
        raise ValueError(f"no placeholder for {m}")

    # -- a batch ------------------------------------------------------------------------------
    def collate(self, items: Sequence[Any]) -> dict[str, torch.Tensor]:
        m = self.modality
        if m is Modality.IMAGE:
            return {"pixels": torch.stack(list(items))}
        if m is Modality.TEXT:
            return tokenize(list(items), self.tokenizer, self.text_cfg)
        if m is Modality.AUDIO:
            lengths = torch.tensor([len(w) for w in items], dtype=torch.long)
            waves = torch.zeros(len(items), int(lengths.max()))
            for i, w in enumerate(items):
                waves[i, : len(w)] = torch.from_numpy(np.asarray(w, dtype=np.float32))
            return {"waves": waves, "wave_lengths": lengths}
        if m is Modality.TABULAR:
            return {"values": torch.tensor(items, dtype=torch.float32).reshape(len(items), -1)}
        if m is Modality.GRAPH:
            return collate_graphs(list(items))
        raise ValueError(f"no collate for {m}")


def _source(value: Any, root: Path | None) -> bytes | Path:
    """Bytes pass through (requests); a manifest path is resolved under its root."""
    if isinstance(value, bytes | bytearray):
        return bytes(value)
    if root is None:
        raise ValueError("a file path needs the manifest root to resolve against")
    from modalforge.data.manifest import resolve_path

    return resolve_path(root, value)


def _augment_image(img: Image.Image, aug: Augment, rng: random.Random) -> Image.Image:
    if aug.image_crop > 0:
        w, h = img.size
        cw = max(1, round(w * (1 - rng.uniform(0, aug.image_crop))))
        ch = max(1, round(h * (1 - rng.uniform(0, aug.image_crop))))
        left, top = rng.randint(0, w - cw), rng.randint(0, h - ch)
        img = img.crop((left, top, left + cw, top + ch))
    if aug.image_flip and rng.random() < 0.5:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    if aug.image_jitter > 0:
        for enhancer in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
            img = enhancer(img).enhance(1 + rng.uniform(-aug.image_jitter, aug.image_jitter))
    return img


def _augment_audio(wave: np.ndarray, aug: Augment, rng: random.Random) -> np.ndarray:
    wave = wave.copy()
    if aug.audio_shift > 0:
        wave = np.roll(wave, int(rng.uniform(-aug.audio_shift, aug.audio_shift) * len(wave)))
    if aug.audio_gain_db > 0:
        wave *= 10 ** (rng.uniform(-aug.audio_gain_db, aug.audio_gain_db) / 20)
    if aug.audio_noise > 0:
        rms = float(np.sqrt(np.mean(wave**2))) or 1e-3
        noise = np.random.default_rng(rng.getrandbits(32)).standard_normal(len(wave))
        wave += (aug.audio_noise * rms * noise).astype(np.float32)
    return np.clip(wave, -1.0, 1.0).astype(np.float32)


class MultimodalDataset(torch.utils.data.Dataset):
    """Rows of a (validated) manifest. ``columns`` maps input column -> Featurizer; ``targets``
    holds one label id (classification) or value (regression) per row, or None (prediction)."""

    def __init__(
        self,
        manifest: Manifest,
        featurizers: dict[str, Featurizer],
        targets: Sequence[float] | None = None,
        train: bool = False,
        seed: int = 0,
        skip: Sequence[str] = (),
    ) -> None:
        self.manifest = manifest
        self.featurizers = featurizers
        self.records = manifest.frame.to_dict("records")
        self.targets = None if targets is None else list(targets)
        self.train = train
        self.seed = seed
        self.skip = set(skip)  # columns served from the feature cache: not loaded here
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict[str, Any]:
        rng = random.Random(f"{self.seed}:{self.epoch}:{i}")  # str seeds are hashed stably
        record = self.records[i]
        items, present = {}, {}
        for column, feat in self.featurizers.items():
            if column in self.skip:
                continue
            value = record.get(column)
            if is_missing(value):
                items[column], present[column] = feat.placeholder(), False
            else:
                items[column], present[column] = (
                    feat.load(value, self.manifest.root, self.train, rng),
                    True,
                )
        present_all = {c: not is_missing(record.get(c)) for c in self.featurizers}
        out = {"index": i, "items": items, "present": {**present_all, **present}}
        if self.targets is not None:
            out["y"] = self.targets[i]
        return out


def collate(batch: list[dict[str, Any]], featurizers: dict[str, Featurizer]) -> dict[str, Any]:
    """-> {"index": (B,), "inputs": {col: batch dict}, "mask": {col: (B,) bool}, "y": (B,)}."""
    columns = list(batch[0]["present"])
    out: dict[str, Any] = {
        "index": torch.tensor([b["index"] for b in batch], dtype=torch.long),
        "inputs": {
            c: featurizers[c].collate([b["items"][c] for b in batch]) for c in batch[0]["items"]
        },
        "mask": {
            c: torch.tensor([b["present"][c] for b in batch], dtype=torch.bool) for c in columns
        },
    }
    if "y" in batch[0]:
        y = [b["y"] for b in batch]
        out["y"] = torch.tensor(y, dtype=torch.long if isinstance(y[0], int) else torch.float32)
    return out
