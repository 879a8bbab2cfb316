"""Serving the chat LLM: what ``runtime.Engine`` asks of the task, and the one ``LlmEngine``.

The chat model is not a batch-in, batch-out model: the LLM engine batches continuously on its
own thread, so ``/v1/chat/completions`` and ``/v1/completions`` (``serve.routes.llm``) submit to
it directly. This adapter owns that engine (built once, on first use), turns OpenAI messages --
already decoded by the route into roles, text and media bytes -- into the engine's ``Prompt``,
and answers ``/v1/predict`` (an image and / or a clip -> the model's reply to them) so the
server's warm-up runs one tiny prompt through the whole path: towers, projectors, LLM.

Weights are quantized to int8 on the CPU by default (dynamic int8 Linear layers: about 2x faster
decoding and a quarter of the memory for Gemma-3-270M); ``MODALFORGE_LLM_QUANTIZE=none`` turns
that off (``int8`` forces it). On a GPU the default is none: int8 kernels are CPU-only.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field
from typing import Any

import torch

from modalforge.data.errors import DecodeError
from modalforge.errors import RequestError
from modalforge.llm.types import Prompt, SamplingParams
from modalforge.schema import Column, Modality
from modalforge.tasks.chat.data import Turn
from modalforge.tasks.chat.format import AUDIO_MARK, IMAGE_MARK
from modalforge.tasks.serving import ServingAdapter

#: the env var that picks the serving engine's weights: int8 | none (default: int8 on the CPU)
QUANTIZE_ENV = "MODALFORGE_LLM_QUANTIZE"
#: /v1/predict's (and the warm-up's) reply length: a glimpse, not an essay
PREDICT_TOKENS = 16
#: roles a message may have; OpenAI's ``developer`` is the newer name of ``system``
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


@dataclass
class Part:
    """One piece of a message: ``kind`` text / image / audio, its ``value`` (str or bytes) and
    ``where`` it was in the request (``messages[1].content[0]``) for error messages."""

    kind: str
    value: Any
    where: str


@dataclass
class Message:
    role: str
    parts: list[Part] = field(default_factory=list)
    where: str = "messages"


def quantize_setting(device: torch.device) -> str | None:
    """``int8`` or None, from ``MODALFORGE_LLM_QUANTIZE`` (default: int8 on the CPU)."""
    value = os.environ.get(QUANTIZE_ENV, "").strip().lower()
    if value in ("none", "0", "off", "false", "no"):
        return None
    if value in ("int8", "1", "on", "true", "yes"):
        return "int8"
    if value:
        raise ValueError(f"{QUANTIZE_ENV}={value!r}: use int8 or none")
    return "int8" if device.type == "cpu" else None


def max_context(predictor) -> int:
    """Prompt + answer positions a sequence may use: the LLM's own limit, at most 2048."""
    positions = getattr(predictor.model.llm.config, "max_position_embeddings", 2048)
    return int(min(2048, positions or 2048))


def engine_options(predictor, device: torch.device) -> dict[str, Any]:
    """``LlmEngine`` options for serving / the ``chat`` command: the context, int8 or not."""
    quantize = quantize_setting(device)
    return {"max_len": max_context(predictor), **({"quantize": quantize} if quantize else {})}


class ChatServing(ServingAdapter):
    """The chat task's serving half: optional image and audio inputs, no labels, one LLM
    engine shared by every request."""

    tunable = False  # the towers run one item per request; nothing to measure

    def __init__(self, engine, capabilities: frozenset[str]) -> None:
        super().__init__(engine, capabilities)
        self._llm = None
        self._lock = threading.Lock()
        self.quantize = quantize_setting(engine.device)

    # -- what the engine asks once ------------------------------------------------------------
    def inputs(self) -> list[Column]:
        return [Column("image", Modality.IMAGE, required=False),
                Column("audio", Modality.AUDIO, required=False)]  # fmt: skip

    def featurizer(self, column: Column):
        """The tower's own featurizer: serving decodes exactly as training encoded."""
        return self.predictor.tower(column.name).featurizer

    def labels(self) -> list[str]:
        return []

    def encoders(self) -> dict[str, Any]:
        config = self.predictor.config
        return {"image": config.image_encoder, "audio": config.audio_encoder}

    def card(self, base: dict[str, Any], serving: dict[str, Any]) -> dict[str, Any]:
        bundle = self.engine.bundle
        return {
            **base, "labels": [], "label_column": None,
            "schema": bundle.schema.to_dict() if bundle is not None else None,
            "metrics": bundle.metrics if bundle is not None else {},
            "encoders": self.encoders(), "serving": serving, **self.card_extra(),
        }  # fmt: skip

    def card_extra(self) -> dict[str, Any]:
        config = self.predictor.config
        llm = dict(config.llm)
        return {
            "llm": {"source": llm.get("source"), "sha256": (llm.get("sha256") or "")[:12],
                    "quantize": self.quantize},
            "image_tokens": config.image_tokens, "audio_tokens": config.audio_tokens,
            "max_context": self.max_context,
        }  # fmt: skip

    # -- the LLM engine -----------------------------------------------------------------------
    @property
    def max_context(self) -> int:
        return max_context(self.predictor)

    @property
    def llm(self):
        """The ``LlmEngine`` (built on first use, once; the LoRA adapters merged in)."""
        if self._llm is None:
            with self._lock:
                if self._llm is None:
                    self._llm = self.predictor.engine(
                        inplace=True, **engine_options(self.predictor, self.engine.device)
                    )
        return self._llm

    def close(self) -> None:
        if self._llm is not None:
            self._llm.close()

    # -- requests -> prompts (any thread but the event loop: the towers run here) -------------
    @staticmethod
    def message(role: str, where: str) -> Message:
        """An empty message for a route to fill (the route never imports this module)."""
        return Message(role, [], where)

    @staticmethod
    def part(kind: str, value: Any, where: str) -> Part:
        return Part(kind, value, where)

    def chat_prompt(self, messages: list[Message]) -> Prompt:
        """OpenAI messages -> the engine's prompt. Leading system / developer messages become
        the system turn; media go where their part was (one image and one audio clip per
        conversation: the model was trained so). RequestError (400) names the part at fault."""
        turns: list[Turn] = []
        media: dict[str, torch.Tensor] = {}
        first: dict[str, str] = {}
        system: list[str] = []
        for message in messages:
            role = ROLES[message.role]
            if role == "system":
                if turns:
                    raise RequestError(f"{message.where}: system messages come before the "
                                       "others in this model", 400, message.where)  # fmt: skip
                system += [p.value for p in message.parts if p.kind == "text"]
                if any(p.kind != "text" for p in message.parts):
                    raise RequestError(f"{message.where}: a system message is text only", 400,
                                       message.where)  # fmt: skip
                continue
            pieces = []
            for part in message.parts:
                if part.kind == "text":
                    for mark in (IMAGE_MARK, AUDIO_MARK):
                        if mark in part.value:
                            raise RequestError(
                                f"{part.where}.text: {mark!r} is reserved; send the media as "
                                f"an {'image_url' if mark == IMAGE_MARK else 'input_audio'} "
                                "part", 400, f"{part.where}.text")  # fmt: skip
                    pieces.append(part.value)
                    continue
                if role != "user":
                    raise RequestError(f"{part.where}: only user messages carry media", 400,
                                       part.where)  # fmt: skip
                if part.kind in first:
                    raise RequestError(
                        f"{part.where}: this model reads one {part.kind} per conversation "
                        f"(the first is {first[part.kind]})", 400, part.where)  # fmt: skip
                first[part.kind] = part.where
                media[part.kind] = self.media_tokens(part)
                pieces.append(IMAGE_MARK if part.kind == "image" else AUDIO_MARK)
            turns.append(Turn(role, "\n".join(pieces)))
        if system:
            turns.insert(0, Turn("system", "\n\n".join(system)))
        if not any(t.role == "user" for t in turns):
            raise RequestError("messages: a conversation needs a user message", 400, "messages")
        return self._checked(self.predictor.prompt(turns, media_tokens=media))

    def media_tokens(self, part: Part) -> torch.Tensor:
        """One image / clip's bytes -> its tower tokens (tokens, dim)."""
        try:
            return self.predictor.tower_tokens(part.kind, part.value)
        except DecodeError as err:
            raise RequestError(f"{part.where}: {err}", 400, part.where) from None

    def text_prompt(self, text: str, where: str = "prompt") -> Prompt:
        """A raw completion prompt: the text's tokens after ``<bos>``, no chat format."""
        tokenizer = self.predictor.tokenizer
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if tokenizer.bos_token_id is not None:
            ids = [tokenizer.bos_token_id, *ids]
        return self._checked(Prompt(ids), where)

    def _checked(self, prompt: Prompt, where: str = "messages") -> Prompt:
        n, limit = len(prompt.token_ids), self.max_context
        if n >= limit:
            raise RequestError(f"{where}: the prompt is {n} tokens; this model's context is "
                               f"{limit} (prompt and answer)", 400, where)  # fmt: skip
        return prompt

    # -- /v1/predict and the warm-up -----------------------------------------------------------
    def predict(self, samples: list) -> list[dict[str, Any]]:
        """Each sample's image and / or clip -> the model's short reply to them (greedy,
        ``PREDICT_TOKENS`` tokens)."""
        prompts, present = [], []
        for sample in samples:
            kinds = sorted(k for k in ("image", "audio") if k in sample.values)
            media = {k: self.predictor.tower(k).encode([sample.values[k]])[0] for k in kinds}
            prompts.append(self.predictor.prompt([Turn("user", "")], media_tokens=media))
            present.append(kinds)
        params = SamplingParams(max_tokens=PREDICT_TOKENS, temperature=0.0)
        done = self.llm.generate(prompts, params)
        return [{"text": c.text.strip(), "modalities": kinds, "finish_reason": c.finish_reason}
                for c, kinds in zip(done, present, strict=True)]  # fmt: skip


__all__ = ["QUANTIZE_ENV", "ChatServing", "Message", "Part", "engine_options", "max_context",
           "quantize_setting"]  # fmt: skip
