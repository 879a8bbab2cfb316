"""A stand-in chat-LLM server for the playground tests: the real playground page at ``GET /``,
``GET /v1/models`` and a streaming ``POST /v1/chat/completions`` in OpenAI's shape (server-sent
``chat.completion.chunk`` events, an optional ``usage`` chunk, ``data: [DONE]``; errors as
``{"error": {"message", "type", "param", "code"}}`` with a 4xx).

It records what it is sent and what it streams back (``requests``, ``streams``), so a test can
check what a client sent and whether it hung up. With ``upstream`` (the URL of a real
``modalforge serve`` of a chat bundle) it relays both routes there instead of answering itself,
recording the same, so the same assertions hold against the real route.

The stub's own answers: ``"You said: <last user text>"`` (``+ [image]`` / ``+ [audio wav]`` per
attachment), one word per chunk, ``delay`` seconds apart; a last user text starting with
``"count"`` counts ``1 2 3 ...`` up to ``max_tokens`` (a long answer to stop). ``max_tokens < 1``
or no messages are refused with a 400, as the real route does.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.resources
import json
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import httpx
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse

LLM_CARD = {"id": "tiny-chat", "object": "model", "created": 0, "owned_by": "modalforge",
            "task": "chat", "version": "0.1", "variant": None,
            "inputs": [{"name": "image", "type": "image", "required": False},
                       {"name": "audio", "type": "audio", "required": False},
                       {"name": "text", "type": "text", "required": False}]}  # fmt: skip
CLASSIFIER_CARD = {"id": "toy", "object": "model", "created": 0, "owned_by": "modalforge",
                   "task": "classification", "version": "0.1", "variant": None,
                   "inputs": [{"name": "image", "type": "image", "required": False},
                              {"name": "text", "type": "text", "required": False}],
                   "labels": ["r", "g", "b"], "metrics": {}, "fusion": "attention"}  # fmt: skip


@dataclass
class Stream:
    """One streamed answer as the stub sent (or relayed) it."""

    deltas: list[str] = field(default_factory=list)
    finish_reason: str | None = None
    usage: dict[str, Any] | None = None
    done: bool = False  # `data: [DONE]` went out
    disconnected: bool = False  # the client hung up before the end

    @property
    def text(self) -> str:
        return "".join(self.deltas)

    def see(self, payload: str) -> None:
        if payload == "[DONE]":
            self.done = True
            return
        chunk = json.loads(payload)
        for choice in chunk.get("choices", []):
            if choice.get("delta", {}).get("content"):
                self.deltas.append(choice["delta"]["content"])
            self.finish_reason = choice.get("finish_reason") or self.finish_reason
        self.usage = chunk.get("usage") or self.usage


def error(message: str, status: int = 400, param: str | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": "invalid_request_error", "param": param,
                      "code": status}}  # fmt: skip
    return JSONResponse(body, status)


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    return " ".join(p["text"] for p in content if p.get("type") == "text")


class ChatStub:
    def __init__(self, upstream: str | None = None, api_key: str | None = None, delay=0.04):
        self.upstream, self.api_key, self.delay = upstream, api_key, delay
        self.card: dict[str, Any] | None = None  # None: LLM_CARD (or the upstream's card)
        self.requests: list[dict[str, Any]] = []  # bodies of /v1/chat/completions
        self.headers: list[dict[str, str]] = []  # their headers
        self.streams: list[Stream] = []
        self.errors: list[dict[str, Any]] = []  # error bodies answered
        self.app = self._build()

    # -- the app --------------------------------------------------------------------------------
    def _build(self) -> FastAPI:
        app = FastAPI()

        @app.get("/")
        async def playground():
            page = importlib.resources.files("modalforge.serve").joinpath("static/index.html")
            return HTMLResponse(page.read_text(encoding="utf-8"))

        @app.get("/v1/models")
        async def models(request: Request):
            if refused := self._refuse(request):
                return refused
            if self.card is None and self.upstream:
                async with httpx.AsyncClient(base_url=self.upstream) as client:
                    r = await client.get("/v1/models", headers=self._auth(request))
                return JSONResponse(r.json(), r.status_code)
            return {"object": "list", "data": [self.card or LLM_CARD]}

        @app.post("/v1/chat/completions")
        async def completions(request: Request):
            if refused := self._refuse(request):
                return refused
            body = await request.json()
            self.requests.append(body)
            self.headers.append(dict(request.headers))
            stream = Stream()
            self.streams.append(stream)
            events = self._relay(request, body) if self.upstream else self._answer(body)
            first = await anext(events)  # an error answer, or the first event
            if isinstance(first, JSONResponse):
                self.errors.append(json.loads(first.body))
                return first

            async def sse():
                try:
                    stream.see(first)
                    yield f"data: {first}\n\n"
                    async for payload in events:
                        stream.see(payload)
                        yield f"data: {payload}\n\n"
                finally:
                    stream.disconnected = not stream.done
                    await events.aclose()

            return StreamingResponse(sse(), media_type="text/event-stream")

        return app

    def _refuse(self, request: Request) -> JSONResponse | None:
        given = request.headers.get("authorization", "")
        if self.api_key and given != f"Bearer {self.api_key}":
            return error("missing or wrong API key: send 'Authorization: Bearer <key>'", 401)
        return None

    def _auth(self, request: Request) -> dict[str, str]:
        auth = request.headers.get("authorization")
        return {"Authorization": auth} if auth else {}

    async def _answer(self, body: dict[str, Any]):
        """The stub's own stream: the SSE payloads, or first a JSONResponse to refuse."""
        messages = body.get("messages") or []
        max_tokens = body.get("max_tokens", 64)
        if not messages:
            yield error("'messages' must be a non-empty list", param="messages")
            return
        if not isinstance(max_tokens, int) or max_tokens < 1:
            yield error(f"max_tokens must be an integer of at least 1, got {max_tokens!r}",
                        param="max_tokens")  # fmt: skip
            return
        last = messages[-1]["content"]
        text = _text(last)
        if text.startswith("count"):
            words = [f"{i} " for i in range(1, max_tokens + 1)]
        else:
            words = ["You", " said:", *(f" {w}" for w in text.split())]
            for part in [] if isinstance(last, str) else last:
                if part["type"] == "image_url":
                    words.append(" + [image]")
                if part["type"] == "input_audio":
                    words.append(f" + [audio {part['input_audio']['format']}]")
        finish = "length" if len(words) > max_tokens else "stop"
        words = words[:max_tokens]
        head = {"id": f"chatcmpl-{len(self.requests)}", "object": "chat.completion.chunk",
                "created": int(time.time()), "model": body.get("model")}  # fmt: skip

        def chunk(delta: dict, finish_reason: str | None = None) -> str:
            choice = {"index": 0, "delta": delta, "finish_reason": finish_reason}
            return json.dumps({**head, "choices": [choice]})

        yield chunk({"role": "assistant"})
        for word in words:
            await asyncio.sleep(self.delay)
            yield chunk({"content": word})
        yield chunk({}, finish)
        if (body.get("stream_options") or {}).get("include_usage"):
            prompt = sum(len(_text(m["content"]).split()) + 4 for m in messages)
            # as a prefix cache would: everything but the newest user turn was seen before
            cached = prompt - len(text.split()) - 4 if len(messages) > 1 else 0
            usage = {"prompt_tokens": prompt, "completion_tokens": len(words),
                     "total_tokens": prompt + len(words),
                     "prompt_tokens_details": {"cached_tokens": cached}}  # fmt: skip
            yield json.dumps({**head, "choices": [], "usage": usage})
        yield "[DONE]"

    async def _relay(self, request: Request, body: dict[str, Any]):
        """The upstream's stream, event by event; closing it hangs up on the upstream too."""
        async with httpx.AsyncClient(base_url=self.upstream, timeout=None) as client:
            req = client.build_request("POST", "/v1/chat/completions", json=body,
                                       headers=self._auth(request))  # fmt: skip
            r = await client.send(req, stream=True)
            try:
                if r.status_code != 200:
                    yield JSONResponse(json.loads(await r.aread()), r.status_code)
                    return
                async for line in r.aiter_lines():
                    if line.startswith("data:"):
                        yield line[5:].strip()
            finally:
                await r.aclose()

    # -- running it -----------------------------------------------------------------------------
    @contextlib.contextmanager
    def serve(self):
        """Run on a free 127.0.0.1 port in a thread; yields the URL."""
        config = uvicorn.Config(self.app, host="127.0.0.1", port=0, log_level="warning")
        server = uvicorn.Server(config)
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        deadline = time.monotonic() + 20
        while not server.started:
            if time.monotonic() > deadline or not thread.is_alive():
                raise RuntimeError("the chat stub did not start")
            time.sleep(0.05)
        port = server.servers[0].sockets[0].getsockname()[1]
        try:
            yield f"http://127.0.0.1:{port}"
        finally:
            server.should_exit = True
            thread.join(10)
