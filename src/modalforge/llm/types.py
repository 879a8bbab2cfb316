"""What goes into the LLM engine and what comes out of it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch


@dataclass(frozen=True)
class SamplingParams:
    """OpenAI's sampling options. ``temperature == 0`` is greedy (deterministic)."""

    max_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: no top-k
    seed: int | None = None
    stop: tuple[str, ...] = ()  # stop strings (not part of the returned text)
    stop_token_ids: tuple[int, ...] = ()  # besides the engine's end-of-turn / eos ids
    constraint: ConstraintFactory | None = None  # grammar: a fresh Constraint per sequence


@dataclass
class EmbedSpan:
    """Positions ``start .. start + len(embeds) - 1`` of a prompt take these input embeddings
    instead of their tokens' (projected image / audio tokens). ``key`` names the content (a
    hash of the media and of the projector), so the prefix cache can tell two images apart."""

    start: int
    embeds: torch.Tensor  # (n, hidden)
    key: str


@dataclass
class Prompt:
    token_ids: list[int]
    spans: list[EmbedSpan] = field(default_factory=list)


@dataclass
class Delta:
    """One step of a streamed generation: new text (may be "" while a multi-byte character or
    a possible stop string is held back), the token ids, and at the end a finish reason."""

    text: str
    token_ids: list[int]
    finish_reason: str | None = None  # "stop" | "length" | "cancelled" | None


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    finish_reason: str
    prompt_tokens: int
    cached_tokens: int  # prompt tokens whose KV came from the prefix cache
    completion_tokens: int


class Constraint(Protocol):
    """Grammar state of one sequence being decoded."""

    def mask(self) -> torch.Tensor | None:
        """Allowed next tokens as a bool tensor over the vocabulary, or None (anything)."""

    def accept(self, token_id: int) -> None:
        """Advance past ``token_id`` (one the mask allowed)."""

    def is_finished(self) -> bool:
        """True when the grammar is complete: the sequence stops ("stop")."""


class ConstraintFactory(Protocol):
    def __call__(self) -> Constraint: ...
