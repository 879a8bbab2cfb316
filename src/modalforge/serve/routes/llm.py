"""The LLM routes, in OpenAI's shapes: ``/v1/chat/completions`` (system / user / assistant
messages with text, image and audio parts) and ``/v1/completions`` (raw text), each streamed as
server-sent events on ``stream: true``. Mounted for bundles whose task has the ``llm``
capability; a captioning / VQA bundle keeps its own ``/v1/chat/completions`` (``generate``).

The LLM engine batches continuously on its own thread, so requests go to it directly, not
through the micro-batcher; a server with ``max_queue`` LLM requests in flight answers 429. The
towers and the tokenizer run in the inference thread (never on the event loop). A client that
goes away -- mid-stream or while waiting for a whole answer -- cancels its generations, so their
engine slots are freed at the next step. A non-streamed request past ``request_timeout_s`` is
cancelled and answered 504; a stream has no deadline (the client sees it progress).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from modalforge.errors import RequestError
from modalforge.llm.types import Completion, SamplingParams
from modalforge.serve import llm_requests as parse
from modalforge.serve.batching import QueueFull
from modalforge.serve.context import Busy, Context
from modalforge.serve.routes.base import Route, needs, refused
from modalforge.serve.routes.generate import image_bytes
from modalforge.tasks.registry import LLM

log = logging.getLogger("modalforge.serve")

#: how often a waiting non-streamed request checks whether its client is still there
DISCONNECT_POLL_S = 0.25


class Llm:
    """What both routes share: admission, prompts built off the event loop, submitting, the
    usage numbers, streaming."""

    def __init__(self, app: FastAPI, ctx: Context) -> None:
        self.ctx = ctx
        self.adapter = ctx.engine.adapter
        self.in_flight = 0
        self._track(app)

    def _track(self, app: FastAPI) -> None:
        """LLM gauges on ``/metrics``: slots free / busy, requests waiting, cached tokens."""
        from prometheus_client import Counter, Gauge

        registry = app.state.metrics.registry
        for key, text in (("active", "Sequences decoding"), ("waiting", "Sequences queued"),
                          ("free_slots", "Free decoding slots"),
                          ("prefix_cache_tokens", "Tokens held by the prefix cache")):  # fmt: skip
            gauge = Gauge(f"modalforge_llm_{key}", text, registry=registry)
            gauge.set_function(lambda k=key: self.adapter.llm.stats()[k])
        self.cancelled = Counter("modalforge_llm_cancelled", "Generations cancelled before they "
                                 "finished (client gone, deadline)", registry=registry)  # fmt: skip

    def cancel(self, gens: list) -> None:
        """Cancel what is still running of ``gens`` (its slots are freed at the next step)."""
        for gen in gens:
            if not gen.done and not gen.cancel_requested:
                gen.cancel()
                self.cancelled.inc()

    @contextlib.contextmanager
    def admission(self):
        ctx = self.ctx
        if ctx.state["status"] != "ready":
            raise RequestError(f"the server is {ctx.state['status']}", status=503,
                               kind="unavailable")  # fmt: skip
        limit = ctx.config.max_queue
        if self.in_flight >= limit:
            raise Busy(QueueFull(self.in_flight, 1.0))
        self.in_flight += 1
        try:
            yield
        finally:
            self.in_flight -= 1

    async def off_loop(self, fn, *args):
        """``fn(*args)`` in the inference thread (the towers, the tokenizer, a grammar's
        compile): the event loop never runs torch."""
        return await self.ctx.batcher.run_in_worker(lambda: fn(*args))

    async def params(self, opts: parse.Options, prompt_tokens: int) -> list[SamplingParams]:
        """One ``SamplingParams`` per choice (with a seed, choice i samples with seed + i)."""
        room = self.adapter.max_context - prompt_tokens
        constraint = None
        if opts.json:
            from modalforge.llm.grammar import json_constraint

            where = "response_format.json_schema.schema" if opts.schema else "response_format"
            llm = self.adapter.llm
            try:
                constraint = await self.off_loop(json_constraint, self.adapter.predictor.tokenizer,
                                                 llm.decoder.vocab_size, opts.schema)  # fmt: skip
            except ValueError as err:
                raise RequestError(f"{where}: {err}", 400, where) from None
        base = SamplingParams(
            max_tokens=min(opts.max_tokens or room, room), temperature=opts.temperature,
            top_p=opts.top_p, top_k=opts.top_k, seed=opts.seed, stop=opts.stop,
            constraint=constraint,
        )  # fmt: skip
        return [replace(base, seed=None if opts.seed is None else opts.seed + i)
                for i in range(opts.n)]  # fmt: skip

    def submit(self, prompt, params: list[SamplingParams]) -> list:
        llm = self.adapter.llm
        gens = []
        try:
            for p in params:
                gens.append(llm.submit(prompt, p))
        except ValueError as err:  # what the engine refuses that we did not check first
            self.cancel(gens)
            raise RequestError(str(err), 400) from None
        return gens

    async def wait(self, request: Request, gens: list) -> list[Completion]:
        """Every generation's completion; cancelled if the client leaves or the deadline
        passes (504)."""

        async def finish(gen) -> None:
            async for _ in gen.aiter():
                pass

        waiters = [asyncio.ensure_future(finish(g)) for g in gens]
        deadline = time.monotonic() + self.ctx.config.request_timeout_s
        try:
            while True:
                done, _ = await asyncio.wait(waiters, timeout=DISCONNECT_POLL_S)
                if len(done) == len(waiters):
                    break
                if await request.is_disconnected():
                    raise RequestError("the client went away", 499)
                if time.monotonic() > deadline:
                    raise RequestError(f"no result within {self.ctx.config.request_timeout_s:g}"
                                       " s", status=504, kind="timeout")  # fmt: skip
            for waiter in waiters:
                waiter.result()  # a failed generation raises here
            return [g.result() for g in gens]
        finally:
            self.cancel(gens)
            for waiter in waiters:
                waiter.cancel()

    async def stream(self, request: Request, gens: list, chunk, final) -> AsyncIterator[str]:
        """Server-sent events: ``chunk(index, delta)`` for every delta of every generation as it
        comes, ``final(completions)`` (or None) last, then ``[DONE]``. The generations are
        cancelled however this ends (a disconnect cancels whatever iterates this)."""
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(i: int, gen) -> None:
            try:
                async for delta in gen.aiter():
                    await queue.put((i, delta))
            except Exception as err:  # the engine failed this request
                await queue.put((i, err))
            await queue.put((i, None))

        waiters = [asyncio.ensure_future(pump(i, g)) for i, g in enumerate(gens)]
        try:
            left = len(gens)
            while left:
                i, delta = await queue.get()
                if delta is None:
                    left -= 1
                    continue
                if isinstance(delta, Exception):  # headers are sent: the fault goes in-band
                    log.error("modalforge: generation failed mid-stream on %s (request id %s)",
                              request.url.path, getattr(request.state, "request_id", "-"),
                              exc_info=delta)  # fmt: skip
                    request.app.state.metrics.error(request.url.path, "server_error")
                    body = {
                        "error": {
                            "message": f"generation failed: {type(delta).__name__}",
                            "type": "server_error",
                            "param": None,
                            "code": 500,
                        }
                    }
                    yield _event(body)
                    return
                body = chunk(i, delta)
                if body is not None:
                    yield _event(body)
            last = final([g.result() for g in gens])
            if last is not None:
                yield _event(last)
            yield "data: [DONE]\n\n"
        finally:
            self.cancel(gens)
            for waiter in waiters:
                waiter.cancel()


def _event(body: dict[str, Any]) -> str:
    return f"data: {json.dumps(body, separators=(',', ':'))}\n\n"


def usage(completions: list[Completion]) -> dict[str, Any]:
    """OpenAI's usage: the prompt counted once (as OpenAI bills ``n`` choices), every choice's
    tokens; cached: the prompt tokens of the first choice whose KV came from the prefix cache."""
    prompt = completions[0].prompt_tokens
    answer = sum(c.completion_tokens for c in completions)
    return {"prompt_tokens": prompt, "completion_tokens": answer, "total_tokens": prompt + answer,
            "prompt_tokens_details": {"cached_tokens": completions[0].cached_tokens}}  # fmt: skip


def mount_llm_chat(app: FastAPI, ctx: Context) -> None:
    llm = _shared(app, ctx)
    config = ctx.config

    @app.post("/v1/chat/completions", tags=["generate"],
              summary="OpenAI chat completions: text, image and audio -> the LLM")  # fmt: skip
    async def chat(request: Request):
        """Messages (system / developer, user, assistant) whose content is a string or parts:
        ``text``, ``image_url`` (a ``data:`` URL, or an allowed URL), ``input_audio``
        (base64 WAV / MP3); one image and one clip per conversation. ``stream``,
        ``stream_options.include_usage``, ``max_tokens`` / ``max_completion_tokens``,
        ``temperature``, ``top_p``, ``top_k`` (extension), ``stop``, ``seed``, ``n`` and
        ``response_format`` (text, json_object, json_schema: decoding follows the grammar)."""
        with llm.admission():
            obj = await ctx.json_object(request, "messages")
            ctx.model_param(obj)
            raw = parse.messages(obj)
            opts = parse.options(obj, chat=True)
            max_bytes = round(config.max_body_mb * 2**20)
            messages = []
            for role, parts, where in raw:
                message = llm.adapter.message(role, where)
                for part in parts:
                    value, at = part.value, part.where
                    if part.kind == "image":
                        at = f"{part.where}.image_url.url"
                        try:
                            value = await image_bytes(
                                value, at, config.allow_urls, max_bytes, config.allow_private_urls
                            )
                        except RequestError as err:  # 422 there; a bad body is a 400 here
                            status = 400 if err.status == 422 else err.status
                            raise RequestError(err.message, status, at) from None
                    elif part.kind == "audio":
                        at = f"{part.where}.input_audio.data"
                    message.parts.append(llm.adapter.part(part.kind, value, at))
                messages.append(message)
            prompt = await llm.off_loop(llm.adapter.chat_prompt, messages)
            params = await llm.params(opts, len(prompt.token_ids))
            gens = llm.submit(prompt, params)
            rid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
            head = {"id": rid, "created": created, "model": ctx.engine.name,
                    "system_fingerprint": ctx.engine.version}  # fmt: skip
            if not opts.stream:
                done = await llm.wait(request, gens)
                return JSONResponse({
                    **head, "object": "chat.completion",
                    "choices": [{"index": i, "message": {"role": "assistant", "content": c.text,
                                                         "refusal": None},
                                 "logprobs": None, "finish_reason": c.finish_reason}
                                for i, c in enumerate(done)],
                    "usage": usage(done),
                })  # fmt: skip
        return _sse(llm.stream(request, gens, *_chat_chunks(head, opts)), llm)


def _chat_chunks(head: dict[str, Any], opts: parse.Options):
    started: set[int] = set()
    extra = {"usage": None} if opts.include_usage else {}

    def chunk(i: int, delta) -> dict[str, Any] | None:
        out = {"role": "assistant", "content": ""} if i not in started else {}
        started.add(i)
        if delta.text:
            out["content"] = delta.text
        if not out and delta.finish_reason is None:
            return None
        return {**head, "object": "chat.completion.chunk", **extra,
                "choices": [{"index": i, "delta": out, "logprobs": None,
                             "finish_reason": delta.finish_reason}]}  # fmt: skip

    def final(done: list[Completion]) -> dict[str, Any] | None:
        if not opts.include_usage:
            return None
        return {**head, "object": "chat.completion.chunk", "choices": [], "usage": usage(done)}

    return chunk, final


def _sse(events: AsyncIterator[str], llm: Llm) -> StreamingResponse:
    """The stream, counted in ``llm.in_flight`` until it ends (admission covers streams too)."""
    llm.in_flight += 1

    async def counted():
        try:
            async for event in events:
                yield event
        finally:
            llm.in_flight -= 1

    return StreamingResponse(
        counted(),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


def mount_completions(app: FastAPI, ctx: Context) -> None:
    llm = _shared(app, ctx)

    @app.post("/v1/completions", tags=["generate"],
              summary="OpenAI (legacy) completions: raw text in, its continuation out")  # fmt: skip
    async def completions(request: Request):
        """``prompt``: a string or a list of strings (each continued ``n`` times; choice
        ``index`` = prompt * n + j), no chat format. The sampling fields and ``stream`` as in
        chat completions; ``echo``, ``suffix``, ``best_of`` > 1 and ``logprobs`` are refused."""
        with llm.admission():
            obj = await ctx.json_object(request, "prompt")
            ctx.model_param(obj)
            texts = parse.prompts(obj)
            opts = parse.options(obj, chat=False)
            gens = []
            try:
                for k, text in enumerate(texts):
                    where = "prompt" if len(texts) == 1 else f"prompt[{k}]"
                    prompt = await llm.off_loop(llm.adapter.text_prompt, text, where)
                    gens += llm.submit(prompt, await llm.params(opts, len(prompt.token_ids)))
            except BaseException:
                llm.cancel(gens)
                raise
            rid, created = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time())
            head = {"id": rid, "object": "text_completion", "created": created,
                    "model": ctx.engine.name, "system_fingerprint": ctx.engine.version}  # fmt: skip
            if not opts.stream:
                done = await llm.wait(request, gens)
                return JSONResponse({**head, "choices": [
                    {"index": i, "text": c.text, "logprobs": None, "finish_reason": c.finish_reason}
                    for i, c in enumerate(done)], "usage": _all_usage(done, opts.n)})  # fmt: skip

        def chunk(i: int, delta) -> dict[str, Any] | None:
            if not delta.text and delta.finish_reason is None:
                return None
            return {**head, "choices": [{"index": i, "text": delta.text, "logprobs": None,
                                         "finish_reason": delta.finish_reason}]}  # fmt: skip

        def final(done: list[Completion]) -> dict[str, Any] | None:
            if not opts.include_usage:
                return None
            return {**head, "choices": [], "usage": _all_usage(done, opts.n)}

        return _sse(llm.stream(request, gens, chunk, final), llm)


def _all_usage(done: list[Completion], n: int) -> dict[str, Any]:
    """Usage over several prompts: each prompt once, every choice's tokens."""
    parts = [usage(done[k : k + n]) for k in range(0, len(done), n)]
    out = {key: sum(p[key] for p in parts) for key in ("prompt_tokens", "completion_tokens",
                                                       "total_tokens")}  # fmt: skip
    out["prompt_tokens_details"] = {
        "cached_tokens": sum(p["prompt_tokens_details"]["cached_tokens"] for p in parts)
    }
    return out


def _shared(app: FastAPI, ctx: Context) -> Llm:
    """One ``Llm`` per app, whichever route mounts first (admission counts both routes)."""
    if getattr(app.state, "llm_routes", None) is None:
        app.state.llm_routes = Llm(app, ctx)
    return app.state.llm_routes


ROUTES = (
    Route("/v1/chat/completions", needs(LLM), mount_llm_chat,
          refused("chat completions come from a chat LLM bundle (train --task chat)")),
    Route("/v1/completions", needs(LLM), mount_completions,
          refused("completions come from a chat LLM bundle (train --task chat)")),
)  # fmt: skip

__all__ = ["ROUTES", "Llm", "usage"]
