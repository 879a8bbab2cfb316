"""The generating routes, in OpenAI's shapes: ``/v1/chat/completions`` (an image in a user
message -> its caption, or a VQA model's answer), ``/v1/caption`` and
``/v1/audio/transcriptions``, each mounted for the models whose task can answer it.

Decoding follows what a chat client asks for: ``temperature: 0`` is greedy search, another
``temperature`` or a ``top_p`` is nucleus sampling, neither is the model's default (beam search,
width 3, GNMT length penalty 0.6); ``beam_width`` / ``length_penalty`` (an extension, sent in the
body, e.g. the ``openai`` package's ``extra_body``) ask for a beam. Image URLs are ``data:`` URLs;
any other URL is refused unless it starts with a prefix of the server's allow-list
(``--allow-url``), and then it is fetched by ``serve.fetch``: from public addresses only (unless
``--allow-private-urls``), the resolved address pinned, at most 3 redirects each checked again,
within the size and time limits.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse

from modalforge.errors import RequestError
from modalforge.models.decoding import DecodeOptions
from modalforge.schema import Modality
from modalforge.serve.context import Context
from modalforge.serve.fetch import allowed, fetch_url
from modalforge.serve.requests import (
    JSON,
    MULTIPART,
    check_body,
    decode_base64,
    json_fields,
    load_json,
    media_type,
    multipart_fields,
)
from modalforge.serve.routes.base import Route, needs, refused
from modalforge.tasks.registry import CAPTION, CHAT, TRANSCRIBE
from modalforge.tasks.serving import OPTIONS

#: the decoding fields a /v1/caption body may carry, and their types
CAPTION_OPTIONS = {
    "method": str, "beam_width": int, "length_penalty": float, "temperature": float,
    "top_p": float, "max_tokens": int, "seed": int,
}  # fmt: skip


def _typed(obj: dict[str, Any], key: str, kind: type) -> Any:
    value = obj.pop(key)
    ok = isinstance(value, kind) or (kind is float and isinstance(value, int))
    if not ok or isinstance(value, bool):
        raise RequestError(f"{key}: expected {'a number' if kind is float else kind.__name__}",
                           param=key)  # fmt: skip
    return value


def decoding_options(obj: dict[str, Any], max_length: int, chat: bool = False) -> dict[str, Any]:
    """Pop the decoding fields of ``obj``; the options for ``DecodeOptions`` (checked)."""
    given = {k: _typed(obj, k, kind) for k, kind in CAPTION_OPTIONS.items() if k in obj}
    for key in ("max_completion_tokens",) if chat else ():
        if key in obj:
            given["max_tokens"] = _typed(obj, key, int)
    options: dict[str, Any] = {}
    if "max_tokens" in given:
        if given["max_tokens"] < 1:
            raise RequestError("max_tokens must be at least 1", param="max_tokens")
        options["max_length"] = min(max_length, given.pop("max_tokens") + 1)  # + <bos>
    if "method" in given:
        options["method"] = given.pop("method")
    elif "temperature" in given and given["temperature"] == 0:
        options["method"] = "greedy"
    elif "temperature" in given or "top_p" in given:
        options["method"] = "sample"
    elif "beam_width" in given or "length_penalty" in given:
        options["method"] = "beam"
    if options.get("method") != "sample" or given.get("temperature") == 0:
        given.pop("temperature", None)
    options.update(given)
    try:
        DecodeOptions(**options)
    except (TypeError, ValueError) as err:
        raise RequestError(str(err), param=next(iter(given), "method")) from None
    return options


async def image_bytes(
    url: Any, where: str, allow: tuple[str, ...], max_bytes: int, allow_private: bool = False
) -> bytes:
    """A ``data:`` URL's bytes, or an allowed URL fetched (``serve.fetch``: public addresses
    only unless ``allow_private``, the resolved address pinned, redirects checked hop by hop)."""
    if not isinstance(url, str) or not url.strip():
        raise RequestError(f"{where}: expected a URL string", param=where)
    if url.startswith("data:"):
        return decode_base64(url, where, Modality.IMAGE)
    if not any(allowed(url, prefix) for prefix in allow):
        raise RequestError(f"{where}: URLs are not fetched (this server takes data: URLs"
                           + (f", or URLs under {list(allow)})" if allow else
                              "; start it with --allow-url PREFIX to fetch some)"),
                           param=where)  # fmt: skip
    return await fetch_url(url, where, allow, max_bytes, allow_private=allow_private)


def chat_parts(obj: dict[str, Any]) -> tuple[list[str], list[tuple[str, Any]]]:
    """The last user message of a chat request -> its text parts and image URLs (with where
    each was found)."""
    messages = obj.pop("messages", None)
    if not isinstance(messages, list) or not messages:
        raise RequestError("'messages' is a non-empty list", param="messages")
    users = [(i, m) for i, m in enumerate(messages) if isinstance(m, dict)
             and m.get("role") == "user"]  # fmt: skip
    if not users:
        raise RequestError("no message with role 'user'", param="messages")
    i, message = users[-1]
    content = message.get("content")
    texts: list[str] = []
    images: list[tuple[str, Any]] = []
    if isinstance(content, str):
        texts.append(content)
    elif isinstance(content, list):
        for j, part in enumerate(content):
            where = f"messages[{i}].content[{j}]"
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text" and isinstance(part.get("text"), str):
                texts.append(part["text"])
            elif kind == "image_url":
                image = part.get("image_url")
                url = image.get("url") if isinstance(image, dict) else image
                images.append((f"{where}.image_url.url", url))
            else:
                raise RequestError(f"{where}: a part is {{'type': 'text', 'text': ...}} or "
                                   "{'type': 'image_url', 'image_url': {'url': ...}}",
                                   param=where)  # fmt: skip
    else:
        raise RequestError(f"messages[{i}].content: a string or a list of parts",
                           param=f"messages[{i}].content")  # fmt: skip
    return texts, images


def chat_response(model: str, text: str, prompt_tokens: int) -> dict[str, Any]:
    completion = len(text.split())
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex[:24]}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                     "finish_reason": "stop", "logprobs": None}],
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
                  "total_tokens": prompt_tokens + completion},
    }  # fmt: skip


def mount_caption(app: FastAPI, ctx: Context) -> None:
    columns, adapter = ctx.columns, ctx.engine.adapter

    @app.post("/v1/caption", tags=["generate"], summary="A caption for an image")
    async def caption(request: Request):
        """JSON: the image column as base64 (or a data: URL) and optional decoding fields
        (``method`` greedy | beam | sample, ``beam_width``, ``length_penalty``,
        ``temperature``, ``top_p``, ``max_tokens``, ``seed``); or multipart with the image."""
        with ctx.admission() as ticket:
            body = await request.body()
            mime = check_body(body, request.headers.get("content-type"))
            options: dict[str, Any] = {}
            if mime == JSON:
                obj = load_json(body)
                if not isinstance(obj, dict):
                    raise RequestError("expected a JSON object with the image")
                ctx.model_param(obj)
                options = decoding_options(obj, adapter.max_length)
                fields = json_fields(obj, columns)
            else:
                fields = multipart_fields(body, request.headers["content-type"], columns)
            result = await ctx.result_of(ticket, {**fields, OPTIONS: options})
            return JSONResponse(ctx.envelope(result))


def mount_chat(app: FastAPI, ctx: Context) -> None:
    engine, config, adapter = ctx.engine, ctx.config, ctx.engine.adapter

    @app.post("/v1/chat/completions", tags=["generate"],
              summary="OpenAI chat completions: an image in a message -> its caption")  # fmt: skip
    async def chat(request: Request):
        """A captioning bundle captions the last user message's ``image_url`` part (a ``data:``
        URL); its text is the prompt (counted, not conditioned on: the captioner reads the image
        only). ``temperature`` 0 -> greedy, other ``temperature`` / ``top_p`` -> sampling,
        neither -> beam search. A classifier of one image and one text column (VQA) answers
        the message's text about the image with its label. ``n`` is 1, no streaming."""
        obj = await ctx.json_object(request, "messages")
        ctx.model_param(obj)
        if obj.pop("stream", False):
            raise RequestError("streaming is not offered: send stream false", param="stream")
        if obj.pop("n", 1) != 1:
            raise RequestError("n: one completion per request", param="n")
        for ignored in ("user", "metadata", "store"):
            obj.pop(ignored, None)
        texts, images = chat_parts(obj)
        options = decoding_options(obj, adapter.max_length, chat=True)
        if obj:
            raise RequestError(f"unsupported field(s) {sorted(obj)}", param=sorted(obj)[0])
        if len(images) != 1:
            raise RequestError(f"the user message has {len(images)} images; this model reads "
                               "one image_url part", param="messages")  # fmt: skip
        where, url = images[0]
        limit, private = round(config.max_body_mb * 2**20), config.allow_private_urls
        image = await image_bytes(url, where, config.allow_urls, limit, private)
        question = " ".join(t.strip() for t in texts).strip()
        fields = adapter.chat_fields(question, image, options)
        with ctx.admission() as ticket:
            result = await ctx.result_of(ticket, fields)
        prompt = len(question.split()) + 1  # the image counts as one
        return JSONResponse(chat_response(engine.name, adapter.chat_text(result), prompt))


def mount_transcriptions(app: FastAPI, ctx: Context) -> None:
    engine = ctx.engine

    @app.post("/v1/audio/transcriptions", tags=["generate"],
              summary="OpenAI audio transcriptions: speech -> text")  # fmt: skip
    async def transcriptions(request: Request):
        """multipart/form-data with ``file`` (WAV, FLAC, OGG, MP3) and ``model``;
        ``response_format`` json (default) or text. ``language``, ``prompt`` and
        ``temperature`` are accepted and not used (greedy decoding of the bundle's model)."""
        with ctx.admission() as ticket:
            body = await request.body()
            content_type = request.headers.get("content-type")
            if check_body(body, content_type) != MULTIPART:
                raise RequestError(f"send multipart/form-data with a 'file' part, not "
                                   f"{media_type(content_type)}", status=415)  # fmt: skip
            form = multipart_fields(body, content_type, {})
            if "model" in form:
                ctx.model_param({"model": form.pop("model").decode("utf-8", "replace")})
            fmt = form.pop("response_format", b"json").decode("utf-8", "replace") or "json"
            if fmt not in ("json", "text"):
                raise RequestError("response_format: json or text", param="response_format")
            for ignored in ("language", "prompt", "temperature"):
                form.pop(ignored, None)
            if "file" not in form:
                raise RequestError("'file' (the audio) is required", param="file")
            audio = form.pop("file")
            if form:
                raise RequestError(f"unknown field(s) {sorted(form)}", param=sorted(form)[0])
            result = await ctx.result_of(ticket, {engine.inputs[0].name: audio})
        if fmt == "text":
            return PlainTextResponse(result["text"])
        return JSONResponse({"text": result["text"]})


ROUTES = (
    Route("/v1/caption", needs(CAPTION), mount_caption,
          refused("captions come from a captioning bundle (train --task caption)")),
    Route("/v1/chat/completions", needs(CHAT), mount_chat,
          refused("chat completions come from a captioning bundle (train --task caption) or a "
                  "classifier of one image and one text (VQA)")),
    Route("/v1/audio/transcriptions", needs(TRANSCRIBE), mount_transcriptions,
          refused("transcripts come from a speech-to-text bundle (modalforge transcribe "
                  "--save-bundle)")),
)  # fmt: skip

__all__ = ["ROUTES", "allowed", "chat_parts", "chat_response", "decoding_options", "image_bytes"]
