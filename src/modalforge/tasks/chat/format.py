"""The chat format: conversations <-> token ids, with the answer tokens marked for the loss.

The packaged Gemma-3-270M is a base model with no chat template, so modalforge defines one on
Gemma's own turn tokens, which the tokenizer has, and teaches it in training::

    <bos><start_of_turn>user
    {system}\n\n{image tokens}{audio tokens}{question}<end_of_turn>
    <start_of_turn>model
    {answer}<end_of_turn>

A ``<image>`` / ``<audio>`` mark in a user turn (LLaVA's convention) becomes a run of
placeholder tokens (``<unused0>`` / ``<unused1>``, one per visual / audio token) whose input
embeddings the model replaces with the projected tower outputs. Text from users and from the
data is tokenized with special tokens split, so a typed ``<start_of_turn>`` or ``<unused0>`` is
plain text, never a control token or a fake image slot.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

IMAGE_MARK = "<image>"
AUDIO_MARK = "<audio>"
IMAGE_PAD = "<unused0>"
AUDIO_PAD = "<unused1>"
START, END = "<start_of_turn>", "<end_of_turn>"
ROLES = {"user": "user", "assistant": "model"}
IGNORE = -100  # label of a position the loss skips
_MARKS = re.compile(f"({re.escape(IMAGE_MARK)}|{re.escape(AUDIO_MARK)})")


@dataclass
class Encoded:
    """``ids`` with ``labels`` (the id where the loss applies, ``IGNORE`` elsewhere) and where
    the media go: ``spans`` as ``(kind, start)`` with kind ``"image"`` or ``"audio"``."""

    ids: list[int]
    labels: list[int]
    spans: list[tuple[str, int]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.ids)


class ChatFormat:
    def __init__(self, tokenizer, image_tokens: int, audio_tokens: int) -> None:
        self.tokenizer = tokenizer
        self.image_tokens, self.audio_tokens = image_tokens, audio_tokens
        ids = {t: tokenizer.convert_tokens_to_ids(t) for t in (START, END, IMAGE_PAD, AUDIO_PAD)}
        unk = tokenizer.unk_token_id
        missing = [t for t, i in ids.items() if i is None or i == unk]
        if missing:
            raise ValueError(f"the tokenizer lacks the chat format's tokens {missing}")
        self.start_id, self.end_id = ids[START], ids[END]
        self.image_id, self.audio_id = ids[IMAGE_PAD], ids[AUDIO_PAD]
        self.bos_id = tokenizer.bos_token_id
        self._newline = self._text("\n")

    def _text(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False, split_special_tokens=True)[
            "input_ids"
        ]

    def _content(self, text: str, spans: list[tuple[str, int]], offset: int) -> list[int]:
        """A user turn's text with its media marks expanded to placeholder runs."""
        out: list[int] = []
        for piece in _MARKS.split(text):
            if piece == IMAGE_MARK:
                spans.append(("image", offset + len(out)))
                out += [self.image_id] * self.image_tokens
            elif piece == AUDIO_MARK:
                spans.append(("audio", offset + len(out)))
                out += [self.audio_id] * self.audio_tokens
            elif piece:
                out += self._text(piece)
        return out

    def encode(self, turns, add_generation_prompt: bool = False) -> Encoded:
        """Token ids of ``turns`` (objects with ``role`` and ``text``; a leading ``system`` turn
        goes before the first user turn, as Gemma's own template does). Assistant turns'
        tokens and their ``<end_of_turn>`` are the labels."""
        turns = list(turns)
        system = None
        if turns and turns[0].role == "system":
            system, turns = turns[0].text, turns[1:]
        ids, labels = [self.bos_id], [IGNORE]
        spans: list[tuple[str, int]] = []
        for i, turn in enumerate(turns):
            if turn.role not in ROLES:
                raise ValueError(f"turn {i}: role must be user or assistant, not {turn.role!r}")
            text = turn.text
            if system and i == 0 and turn.role == "user":
                text = f"{system}\n\n{text}"
            head = [self.start_id, *self._text(ROLES[turn.role]), *self._newline]
            ids += head
            labels += [IGNORE] * len(head)
            if turn.role == "user":
                body = self._content(text, spans, len(ids))
                ids += [*body, self.end_id, *self._newline]
                labels += [IGNORE] * (len(body) + 1 + len(self._newline))
            else:
                body = [*self._text(text), self.end_id]
                ids += [*body, *self._newline]
                labels += [*body, *[IGNORE] * len(self._newline)]
        if add_generation_prompt:
            head = [self.start_id, *self._text(ROLES["assistant"]), *self._newline]
            ids += head
            labels += [IGNORE] * len(head)
        return Encoded(ids, labels, spans)


__all__ = ["AUDIO_MARK", "IGNORE", "IMAGE_MARK", "ChatFormat", "Encoded"]
