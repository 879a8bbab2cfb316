"""Visual question answering data from a manifest's own metadata, and only where it supports the
answer.

``vqa_manifest(frame)`` turns each image row into questions of three types:

* ``category`` -- "what category is this emoji in?" -> the row's category;
* ``subcategory`` -- "what subcategory is this emoji in?" -> the row's subcategory;
* ``yes/no`` -- "is this a {word}?" for the things names are about (``yes_no_words``: the last
  word of at least ``min_count`` names, across subcategories), answered by the name: yes when
  the word is in it. An image whose name has such a word gets one question with a word from its
  name and one with another word (drawn with a seeded generator), so yes and no are as common.
  The answer is what the name says: "is this a person?" for "woman running" is no.

Every question of an image keeps the image's ``group`` and ``split``, so an image is never on
both sides of the split. The answers are one vocabulary: a VQA model is a classifier over
(image, question) through the same trainer as any fusion (``--label answer``), scored per
question type against answering each type's most common answer (``train --evaluate-by qtype``).

Its bundles therefore say ``classification``; the registry's ``vqa`` entry claims those that read
exactly one image and one text column (``answers_questions``), and ``VqaServing`` answers
``/v1/chat/completions`` with the label for the message's text about its image.
"""

from __future__ import annotations

import collections
import random
from typing import Any

import pandas as pd

from modalforge.data.manifest import is_missing
from modalforge.data.text import WordVocab
from modalforge.errors import RequestError
from modalforge.schema import Modality, Schema
from modalforge.tasks.classification import ClassifierServing

QUESTIONS = {
    "category": "what category is this emoji in?",
    "subcategory": "what subcategory is this emoji in?",
}
STOP_WORDS = frozenset(
    ["a", "an", "and", "at", "of", "on", "in", "with", "the", "to", "for", "by", "up", "down",
     "left", "right", "without", "above", "below"]
)  # fmt: skip


def yes_no_question(word: str) -> str:
    """ "is this a face?", "is this an arrow?", "are these eyes?"."""
    if word.endswith("s") and not word.endswith("ss"):
        return f"are these {word}?"
    return f"is this {'an' if word[0] in 'aeiou' else 'a'} {word}?"


def yes_no_words(names: list[str], groups: list[str] | None = None, min_count: int = 8
                 ) -> list[str]:  # fmt: skip
    """The things names are about: words that end at least ``min_count`` names (the head of an
    English noun phrase comes last: "grinning *face*", "red *heart*"), in at least two of
    ``groups`` (subcategories: "oclock" only names clocks), stop words left out; most frequent
    first."""
    counts: collections.Counter[str] = collections.Counter()
    seen: dict[str, set[str]] = collections.defaultdict(set)
    for i, name in enumerate(names):
        words = _words(name)
        if words:
            counts[words[-1]] += 1
            seen[words[-1]].add(groups[i] if groups is not None else "")
    need = 2 if groups is not None else 1
    words = [w for w, c in counts.items()
             if c >= min_count and len(seen[w]) >= need and w not in STOP_WORDS]  # fmt: skip
    return sorted(words, key=lambda w: (-counts[w], w))


def _words(name: str) -> list[str]:
    return [w for w in WordVocab.split(str(name).lower()) if w.isalpha() and len(w) > 1]


def vqa_manifest(
    frame: pd.DataFrame,
    image: str = "image",
    name: str = "text",
    category: str = "category",
    subcategory: str = "subcategory",
    min_count: int = 8,
    seed: int = 0,
) -> pd.DataFrame:
    """Question rows (``image, question, answer, qtype`` + the source's ``id``, ``group`` and
    ``split`` when present) for every row that has an image."""
    for column in (image, name):
        if column not in frame:
            raise ValueError(f"column {column!r} not in the manifest (columns: {list(frame)})")
    rows = frame[[not is_missing(v) for v in frame[image]]]
    named = rows[[not is_missing(v) for v in rows[name]]]
    groups = [str(v) for v in named[subcategory]] if subcategory in frame else None
    words = yes_no_words([str(v) for v in named[name]], groups, min_count)
    rng = random.Random(seed)
    keep = [c for c in ("id", "group", "split") if c in frame]
    out = []
    for _, row in rows.iterrows():
        base = {"image": row[image], **{c: row[c] for c in keep}}
        for qtype, column in (("category", category), ("subcategory", subcategory)):
            if column in frame and not is_missing(row[column]):
                out.append({**base, "question": QUESTIONS[qtype], "answer": str(row[column]),
                            "qtype": qtype})  # fmt: skip
        own = set(_words(row[name])) if not is_missing(row[name]) else set()
        present = [w for w in words if w in own]
        absent = [w for w in words if w not in own]
        if present and absent:  # a yes and a no for the same image: the answers stay balanced
            for word, answer in ((rng.choice(present), "yes"), (rng.choice(absent), "no")):
                out.append({**base, "question": yes_no_question(word),
                            "answer": answer, "qtype": "yes/no"})  # fmt: skip
    return pd.DataFrame(out)


def question_columns(schema: Schema) -> tuple[str, str] | None:
    """(image, question) columns of a schema whose inputs are exactly one image and one text."""
    inputs = list(schema.inputs)
    if sorted(c.modality.value for c in inputs) != ["image", "text"]:
        return None
    by_kind = {c.modality: c.name for c in inputs}
    return by_kind[Modality.IMAGE], by_kind[Modality.TEXT]


def answers_questions(schema: Schema) -> bool:
    """Whether a classifier of this schema is a VQA model (the registry's claim)."""
    return question_columns(schema) is not None


class VqaServing(ClassifierServing):
    """A classifier of (image, question): ``/v1/predict`` as any classifier, and
    ``/v1/chat/completions`` answers the message's text about its image with the label."""

    #: chat requests' decoding fields are checked against this budget, then unused
    max_length = 24

    def chat_fields(self, question: str, image: bytes, options: dict[str, Any]) -> dict[str, Any]:
        if not question:
            raise RequestError("a VQA model needs the question as a text part", param="messages")
        image_column, text_column = question_columns(self.predictor.schema)  # type: ignore[misc]
        return {image_column: image, text_column: question}

    def chat_text(self, result: dict[str, Any]) -> str:
        return result["label"]


__all__ = ["QUESTIONS", "VqaServing", "answers_questions", "vqa_manifest", "yes_no_words"]
