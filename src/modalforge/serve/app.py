"""The HTTP service: ``create_app(engine, ServeConfig())`` -> a FastAPI app.

Routes: ``POST /v1/predict`` (JSON or multipart), ``POST /v1/predict/batch``, ``GET /v1/models``
(OpenAI's list format plus the bundle's schema, labels and metrics), ``GET /healthz``,
``GET /readyz``, ``GET /metrics`` (Prometheus), ``/docs`` + ``/openapi.json`` and the playground at
``GET /``; for contrastive bundles ``POST /v1/embeddings`` and, with an index loaded beside the
bundle, ``POST /v1/search``. Every refusal is a 4xx with OpenAI's error shape ``{"error":
{"message", "type", "param", "code"}}``; the model runs in the batcher's inference thread, never
on the event loop.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import hmac
import importlib.resources
import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from modalforge.index import EmbeddingIndex
from modalforge.serve.batching import Closed, MicroBatcher, QueueFull
from modalforge.serve.engine import OPTIONS, Engine, RequestError
from modalforge.serve.generation import chat_parts, chat_response, decoding_options, image_bytes
from modalforge.serve.metrics import ServerMetrics
from modalforge.serve.requests import (
    JSON,
    MULTIPART,
    batch_items,
    check_body,
    decode_base64,
    json_fields,
    load_json,
    media_type,
    multipart_fields,
)

log = logging.getLogger("modalforge.serve")

#: most hits one /v1/search answers
MAX_SEARCH_K = 1000


@dataclass
class ServeConfig:
    max_batch: int = 32  # samples per model call
    batch_timeout_ms: float = 5.0  # longest a batch waits for requests still being decoded
    max_queue: int = 256  # requests admitted at once; more get 429 + Retry-After
    workers: int = 1  # inference threads (torch threads are split between them)
    max_body_mb: float = 20.0
    request_timeout_s: float = 30.0
    api_key: str | None = None  # required as "Authorization: Bearer KEY" or "X-API-Key: KEY"
    max_batch_items: int = 256  # samples in one /v1/predict/batch call
    drain_timeout_s: float = 30.0
    torch_threads: int | None = None  # per inference thread; None: cores // workers
    # URL prefixes whose images /v1/chat/completions may fetch (none: data: URLs only)
    allow_urls: tuple[str, ...] = ()


def error_body(
    message: str, status: int, kind: str = "invalid_request_error", param: str | None = None
) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": param, "code": status}}


def error_response(
    message: str,
    status: int,
    kind: str | None = None,
    param: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    kind = kind or ("server_error" if status >= 500 else "invalid_request_error")
    return JSONResponse(error_body(message, status, kind, param), status, headers=headers)


def _thread_init(threads: int) -> Callable[[], None]:
    def init() -> None:
        import torch

        torch.set_num_threads(threads)

    return init


class Gate:
    """Pure-ASGI front of the app: API key for ``/v1/*``, body-size limit, request metrics.

    A body over ``limit`` bytes is answered 413 without reading further (``Content-Length``
    checked first, chunked bodies counted as they stream in); the app then gets the buffered body.
    """

    def __init__(
        self,
        app: FastAPI,
        limit: int,
        api_key: str | None,
        metrics: ServerMetrics,
        routes: set[str],
    ) -> None:
        self.app = app
        self.limit = limit
        self.api_key = api_key
        self.metrics = metrics
        self.routes = routes

    @property
    def state(self):
        return self.app.state

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        path = scope["path"]
        route = path if path in self.routes else "other"
        status = [500]

        async def send_status(message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self._handle(scope, receive, send_status, path)
        finally:
            self.metrics.observe_request(route, status[0], time.perf_counter() - started)

    async def _handle(self, scope, receive, send, path: str) -> None:
        headers = dict(scope.get("headers", []))
        if self.api_key and path.startswith("/v1/") and not _authorized(headers, self.api_key):
            await _send_error(
                send,
                "missing or wrong API key: send 'Authorization: Bearer <key>'",
                401,
                "authentication_error",
                {b"www-authenticate": b"Bearer"},
            )
            return
        if scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        mb = f"{self.limit / 2**20:g} MiB"
        declared = headers.get(b"content-length")
        if declared is not None:
            try:
                size = int(declared)
            except ValueError:
                await _send_error(send, "invalid Content-Length header", 400)
                return
            if size > self.limit:
                await _send_error(send, f"body of {size:,} bytes is over the limit of {mb}", 413)
                return
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.limit:
                await _send_error(send, f"body is over the limit of {mb}", 413)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        sent = False

        async def replay():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


async def _send_error(
    send,
    message: str,
    status: int,
    kind: str = "invalid_request_error",
    extra: dict[bytes, bytes] | None = None,
) -> None:
    payload = json.dumps(error_body(message, status, kind)).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(payload)).encode()),
        *(extra or {}).items(),
    ]
    if status == 413:  # the rest of the body is not read: the connection cannot be reused
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": payload})


def create_app(
    engine: Engine, config: ServeConfig | None = None, index: EmbeddingIndex | None = None
) -> FastAPI:
    """The service for one loaded bundle. Start it with uvicorn (``modalforge serve``).
    ``index``: an embedding index built with this bundle (``modalforge index build``), searched
    by ``POST /v1/search``."""
    import os

    config = config or ServeConfig()
    if index is not None:
        check_index(engine, index)
    metrics = ServerMetrics()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    threads = config.torch_threads or max(1, (cores or 1) // config.workers)
    batcher = MicroBatcher(
        functools.partial(engine.handle, on_decode=metrics.decode_seconds.observe),
        max_batch=config.max_batch,
        max_wait_s=config.batch_timeout_ms / 1000,
        max_queue=config.max_queue,
        workers=config.workers,
        on_batch=metrics.observe_batch,
        thread_init=_thread_init(threads),
    )
    metrics.track_queue(lambda: batcher.depth)
    state = {"status": "starting"}
    columns = {c.name: c for c in engine.inputs}

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        await batcher.start()
        # warm up in the inference thread itself (its torch threads, its lazy initialisation)
        await batcher.run_in_worker(lambda: engine.warmup(config.max_batch))
        state["status"] = "ready"
        log.info("modalforge: serving %s (version %s)", engine.name, engine.version)
        yield
        state["status"] = "draining"
        await batcher.stop(config.drain_timeout_s)

    app = FastAPI(
        title="modalforge",
        summary=f"{engine.task} with {engine.name}: inputs {', '.join(columns)}",
        version=engine.version,
        lifespan=lifespan,
    )
    app.state.engine, app.state.batcher, app.state.metrics = engine, batcher, metrics
    app.state.config = config

    # -- errors: one shape everywhere -----------------------------------------------------------
    @app.exception_handler(RequestError)
    async def _request_error(request: Request, err: RequestError):
        metrics.error(request.url.path, err.kind)
        return error_response(err.message, err.status, err.kind, err.param)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, err: StarletteHTTPException):
        return error_response(
            str(err.detail), err.status_code, headers=getattr(err, "headers", None)
        )

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, err: RequestValidationError):
        return error_response(f"invalid request: {err.errors()}", 422)

    @app.exception_handler(Exception)
    async def _server_error(request: Request, err: Exception):
        log.exception("modalforge: unexpected error on %s", request.url.path)
        metrics.error(request.url.path, "server_error")
        return error_response(f"internal error: {type(err).__name__}", 500)

    # -- predict ----------------------------------------------------------------------------------
    @contextlib.contextmanager
    def admission():
        """A place in the batcher for one request, taken before its body is parsed, so a full
        server answers 429 cheaply and the batcher knows this request is on its way."""
        if state["status"] != "ready":
            raise RequestError(f"the server is {state['status']}", status=503, kind="unavailable")
        try:
            with batcher.admit() as ticket:
                yield ticket
        except QueueFull as err:
            raise _Busy(err) from None
        except Closed:
            raise RequestError(
                "the server is shutting down", status=503, kind="unavailable"
            ) from None

    async def result_of(ticket, fields: dict[str, Any]) -> dict[str, Any]:
        """Decode + predict in the inference thread, batched with other requests."""
        try:
            return await asyncio.wait_for(ticket.submit(fields), config.request_timeout_s)
        except TimeoutError:
            raise RequestError(
                f"no result within {config.request_timeout_s:g} s", status=504, kind="timeout"
            ) from None

    def model_param(obj: dict[str, Any]) -> None:
        name = obj.pop("model", None) if "model" not in columns else None
        if name is not None and name != engine.name:
            raise RequestError(
                f"model {name!r} is not served here (this server has {engine.name!r})",
                status=404,
                param="model",
            )

    def envelope(result: dict[str, Any]) -> dict[str, Any]:
        return {"model": engine.name, "version": engine.version, **result}

    @app.post(
        "/v1/predict",
        tags=["predict"],
        openapi_extra=_predict_openapi(columns),
        summary="Predict one sample",
    )
    async def predict(request: Request):
        with admission() as ticket:
            body = await request.body()
            mime = check_body(body, request.headers.get("content-type"))
            if mime == JSON:
                obj = load_json(body)
                if isinstance(obj, dict):
                    model_param(obj)
                fields = json_fields(obj, columns)
            else:
                fields = multipart_fields(body, request.headers["content-type"], columns)
                if "model" not in columns and isinstance(fields.get("model"), bytes):
                    model_param({"model": fields.pop("model").decode("utf-8", "replace")})
            return JSONResponse(envelope(await result_of(ticket, fields)))

    @app.post("/v1/predict/batch", tags=["predict"], summary="Predict many samples in one call")
    async def predict_batch(request: Request):
        body = await request.body()
        if check_body(body, request.headers.get("content-type")) != JSON:
            raise RequestError("a batch is sent as application/json", status=415)
        obj = load_json(body)
        items = batch_items(obj, config.max_batch_items)
        model_param(obj)
        fields = []
        for i, item in enumerate(items):
            try:
                fields.append(json_fields(item, columns, where=f"inputs[{i}]"))
            except RequestError as err:
                raise _at(err, i) from None

        results = await each(fields, "inputs")
        return JSONResponse({**envelope({}), "predictions": results})

    async def json_object(request: Request, field: str) -> dict[str, Any]:
        body = await request.body()
        if check_body(body, request.headers.get("content-type")) != JSON:
            raise RequestError(f"{request.url.path} takes application/json", status=415)
        obj = load_json(body)
        if not isinstance(obj, dict):
            raise RequestError(f"expected a JSON object with {field!r}")
        return obj

    async def each(fields: list[dict[str, Any]], where: str) -> list[dict[str, Any]]:
        """Every item through the batcher on its own (batched with whatever else is queued); a
        refusal names its item as ``where[i]``."""

        async def one(i: int, f: dict[str, Any]):
            try:
                with admission() as ticket:
                    return await result_of(ticket, f)
            except RequestError as err:
                raise _at(err, i, where) from None

        return list(await asyncio.gather(*(one(i, f) for i, f in enumerate(fields))))

    @app.post("/v1/embeddings", tags=["embeddings"],
              summary="Embeddings of texts, images or audio (OpenAI format)")  # fmt: skip
    async def embeddings(request: Request):
        """OpenAI's request: ``{"model", "input": str | [str], "encoding_format": "float" |
        "base64"}``. A plain string goes to the text tower (``input_type``: which text column,
        when there are several); a ``data:image/...;base64,`` or ``data:audio/...`` URL to the
        image or audio tower. Other URLs are never fetched."""
        if engine.task != "contrastive":
            raise RequestError(
                f"{engine.name!r} is a {engine.task} model: embeddings come from a contrastive "
                "bundle (train --task contrastive)",
                param="model",
            )
        obj = await json_object(request, "input")
        model_param(obj)
        fmt = obj.pop("encoding_format", None) or "float"
        if fmt not in ("float", "base64"):
            raise RequestError("encoding_format is 'float' or 'base64'", param="encoding_format")
        dims = obj.pop("dimensions", None)
        if dims is not None and dims != engine.embedding_dim:
            raise RequestError(f"dimensions: this model's embeddings have {engine.embedding_dim}",
                               param="dimensions")  # fmt: skip
        text_column = obj.pop("input_type", None)
        obj.pop("user", None)
        if "input" not in obj:
            raise RequestError("'input' is required (a string or a list of strings)", param="input")
        items = obj.pop("input")
        if obj:
            raise RequestError(f"unknown field(s) {sorted(obj)}", param=sorted(obj)[0])
        items = [items] if isinstance(items, str) else items
        if not isinstance(items, list) or not items or len(items) > config.max_batch_items:
            raise RequestError(f"'input' is a string or a list of 1 to {config.max_batch_items} "
                               "strings", param="input")  # fmt: skip
        fields = [embedding_fields(engine, item, text_column, f"input[{i}]")
                  for i, item in enumerate(items)]  # fmt: skip
        results = await each(fields, "input")
        data = []
        for i, (f, r) in enumerate(zip(fields, results, strict=True)):
            vector = r["embeddings"][next(iter(f))]
            if fmt == "base64":  # what the openai package asks for: little-endian float32
                vector = base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode()
            data.append({"object": "embedding", "index": i, "embedding": vector})
        tokens = sum(len(v.split()) for f in fields for v in f.values() if isinstance(v, str))
        usage = {"prompt_tokens": tokens, "total_tokens": tokens}
        return JSONResponse({"object": "list", "data": data, "model": engine.name, "usage": usage})

    @app.post("/v1/search", tags=["embeddings"],
              summary="The index's nearest entries to a text, image or audio")  # fmt: skip
    async def search(request: Request):
        """``{"query": str, "k": 10}``: the query is embedded as ``/v1/embeddings`` embeds an
        input (a string by the text tower, ``input_type`` naming the column when there are
        several; a ``data:image/...`` or ``data:audio/...`` URL by that tower), or given as
        ``"embedding": [floats]``; the answer lists the ``k`` nearest index entries with their
        cosine scores and metadata."""
        if index is None:
            raise RequestError("this server has no index: start it with `modalforge serve "
                               "BUNDLE --index INDEX`", status=404)  # fmt: skip
        obj = await json_object(request, "query")
        model_param(obj)
        k = obj.pop("k", 10)
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= MAX_SEARCH_K:
            raise RequestError(f"k is an integer from 1 to {MAX_SEARCH_K}", param="k")
        text_column = obj.pop("input_type", None)
        given = [key for key in ("query", "embedding") if key in obj]
        if len(given) != 1:
            raise RequestError("give exactly one of 'query' (a string or data: URL) or "
                               "'embedding' (a list of floats)", param="query")  # fmt: skip
        value = obj.pop(given[0])
        if obj:
            raise RequestError(f"unknown field(s) {sorted(obj)}", param=sorted(obj)[0])
        if given == ["embedding"]:
            vector = embedding_vector(value, index.dim)
        else:
            fields = embedding_fields(engine, value, text_column, "query")
            (result,) = await each([fields], "query")
            vector = np.asarray(result["embeddings"][next(iter(fields))], dtype=np.float32)
        hits = index.search(vector, k=min(k, len(index)))[0] if len(index) else []
        data = [{"object": "search_result", "rank": r, "id": h.id, "score": h.score,
                 "metadata": h.metadata} for r, h in enumerate(hits, 1)]  # fmt: skip
        return JSONResponse({"object": "list", "data": data, "model": engine.name,
                             "index": index_card(index)})  # fmt: skip

    # -- generate -------------------------------------------------------------------------------
    def require(task: str, what: str) -> None:
        if engine.task != task:
            raise RequestError(f"{engine.name!r} is a {engine.task} model: {what}", param="model")

    def max_length() -> int:
        return int(getattr(engine.predictor.config, "max_length", 24))

    @app.post("/v1/caption", tags=["generate"], summary="A caption for an image")
    async def caption(request: Request):
        """JSON: the image column as base64 (or a data: URL) and optional decoding fields
        (``method`` greedy | beam | sample, ``beam_width``, ``length_penalty``,
        ``temperature``, ``top_p``, ``max_tokens``, ``seed``); or multipart with the image."""
        require("caption", "captions come from a captioning bundle (train --task caption)")
        with admission() as ticket:
            body = await request.body()
            mime = check_body(body, request.headers.get("content-type"))
            options: dict[str, Any] = {}
            if mime == JSON:
                obj = load_json(body)
                if not isinstance(obj, dict):
                    raise RequestError("expected a JSON object with the image")
                model_param(obj)
                options = decoding_options(obj, max_length())
                fields = json_fields(obj, columns)
            else:
                fields = multipart_fields(body, request.headers["content-type"], columns)
            return JSONResponse(envelope(await result_of(ticket, {**fields, OPTIONS: options})))

    @app.post("/v1/chat/completions", tags=["generate"],
              summary="OpenAI chat completions: an image in a message -> its caption")  # fmt: skip
    async def chat(request: Request):
        """A captioning bundle captions the last user message's ``image_url`` part (a ``data:``
        URL); its text is the prompt (counted, not conditioned on: the captioner reads the image
        only). ``temperature`` 0 -> greedy, other ``temperature`` / ``top_p`` -> sampling,
        neither -> beam search. A classifier of one image and one text column (VQA) answers
        the message's text about the image with its label. ``n`` is 1, no streaming."""
        vqa = vqa_columns(engine)
        if engine.task != "caption" and vqa is None:
            raise RequestError(f"{engine.name!r} is a {engine.task} model: chat completions come "
                               "from a captioning bundle (train --task caption) or a classifier "
                               "of one image and one text (VQA)", param="model")  # fmt: skip
        obj = await json_object(request, "messages")
        model_param(obj)
        if obj.pop("stream", False):
            raise RequestError("streaming is not offered: send stream false", param="stream")
        if obj.pop("n", 1) != 1:
            raise RequestError("n: one completion per request", param="n")
        for ignored in ("user", "metadata", "store"):
            obj.pop(ignored, None)
        texts, images = chat_parts(obj)
        options = decoding_options(obj, max_length(), chat=True)
        if obj:
            raise RequestError(f"unsupported field(s) {sorted(obj)}", param=sorted(obj)[0])
        if len(images) != 1:
            raise RequestError(f"the user message has {len(images)} images; this model reads "
                               "one image_url part", param="messages")  # fmt: skip
        where, url = images[0]
        image = await image_bytes(url, where, config.allow_urls, round(config.max_body_mb * 2**20))
        question = " ".join(t.strip() for t in texts).strip()
        if vqa is not None:  # the answer to the question about the image (decoding unused)
            if not question:
                raise RequestError("a VQA model needs the question as a text part",
                                   param="messages")  # fmt: skip
            fields: dict[str, Any] = {vqa[0]: image, vqa[1]: question}
        else:  # a caption of the image; the text is the prompt, not conditioned on
            fields = {engine.inputs[0].name: image, OPTIONS: options}
        with admission() as ticket:
            result = await result_of(ticket, fields)
        prompt = len(question.split()) + 1  # the image counts as one
        text = result["label"] if vqa is not None else result["caption"]
        return JSONResponse(chat_response(engine.name, text, prompt))

    @app.post("/v1/audio/transcriptions", tags=["generate"],
              summary="OpenAI audio transcriptions: speech -> text")  # fmt: skip
    async def transcriptions(request: Request):
        """multipart/form-data with ``file`` (WAV, FLAC, OGG, MP3) and ``model``;
        ``response_format`` json (default) or text. ``language``, ``prompt`` and
        ``temperature`` are accepted and not used (greedy decoding of the bundle's model)."""
        require("transcribe", "transcripts come from a speech-to-text bundle (modalforge "
                "transcribe --save-bundle)")  # fmt: skip
        with admission() as ticket:
            body = await request.body()
            content_type = request.headers.get("content-type")
            if check_body(body, content_type) != MULTIPART:
                raise RequestError(f"send multipart/form-data with a 'file' part, not "
                                   f"{media_type(content_type)}", status=415)  # fmt: skip
            form = multipart_fields(body, content_type, {})
            if "model" in form:
                model_param({"model": form.pop("model").decode("utf-8", "replace")})
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
            result = await result_of(ticket, {engine.inputs[0].name: audio})
        if fmt == "text":
            return PlainTextResponse(result["text"])
        return JSONResponse({"text": result["text"]})

    # -- describe -------------------------------------------------------------------------------
    def card() -> dict[str, Any]:
        return {**engine.card(), **({"index": index_card(index)} if index is not None else {})}

    @app.get("/v1/models", tags=["models"], summary="The served model (OpenAI list format)")
    async def models():
        return {"object": "list", "data": [card()]}

    @app.get("/v1/models/{model_id}", tags=["models"], summary="One model")
    async def model(model_id: str):
        if model_id != engine.name:
            raise RequestError(f"model {model_id!r} is not served here", status=404, param="model")
        return card()

    @app.get("/healthz", tags=["ops"], summary="The process is up")
    async def healthz():
        return {"status": "ok"}

    @app.get("/readyz", tags=["ops"], summary="The model is loaded and taking requests")
    async def readyz():
        ready = state["status"] == "ready"
        body = {"status": state["status"], "queue_depth": batcher.depth}
        return JSONResponse(body, 200 if ready else 503)

    @app.get("/metrics", tags=["ops"], summary="Prometheus metrics")
    async def prometheus():
        return Response(metrics.render(), media_type=metrics.content_type)

    @app.get("/", include_in_schema=False)
    async def playground():
        page = importlib.resources.files("modalforge.serve").joinpath("static/index.html")
        return HTMLResponse(page.read_text(encoding="utf-8"))

    @app.exception_handler(_Busy)
    async def _busy(request: Request, err: _Busy):
        metrics.error(request.url.path, "busy")
        retry = str(math.ceil(err.queue_full.retry_after))
        return error_response(
            str(err.queue_full), 429, "rate_limit_error", headers={"Retry-After": retry}
        )

    routes = {r.path for r in app.routes if "{" not in getattr(r, "path", "{")}
    return Gate(app, round(config.max_body_mb * 2**20), config.api_key, metrics, routes)


class _Busy(Exception):
    def __init__(self, queue_full: QueueFull) -> None:
        super().__init__(str(queue_full))
        self.queue_full = queue_full


def _at(err: RequestError, i: int, where: str = "inputs") -> RequestError:
    if err.message.startswith(f"{where}[{i}]"):  # named already
        return err
    return RequestError(
        f"{where}[{i}]: {err.message}",
        err.status,
        f"{where}[{i}].{err.param}" if err.param else f"{where}[{i}]",
        err.kind,
    )


def embedding_fields(engine: Engine, item: Any, text_column: str | None, where: str) -> dict:
    """One ``/v1/embeddings`` input -> the request fields of the tower that reads it."""
    if not isinstance(item, str) or not item.strip():
        raise RequestError(f"{where}: expected a non-empty string", param=where)
    towers = {c.modality.value: c.name for c in reversed(engine.inputs)}  # first of each kind
    if item.startswith("data:"):
        kind = item[5:].split("/", 1)[0].lower()
        if kind not in ("image", "audio") or kind not in towers:
            have = sorted(k for k in towers if k in ("image", "audio"))
            raise RequestError(f"{where}: a data: URL of {kind!r}; this model embeds data: URLs "
                               f"of {have or 'no kind'}", param=where)  # fmt: skip
        return {towers[kind]: decode_base64(item, where)}
    if "://" in item[:16]:
        raise RequestError(f"{where}: URLs are not fetched; send a data: URL", param=where)
    texts = [c.name for c in engine.inputs if c.modality.value == "text"]
    column = text_column or (texts[0] if texts else None)
    if column not in texts:
        raise RequestError(f"input_type {text_column!r}: the text towers are {texts}"
                           if text_column else f"{where}: this model has no text tower",
                           param="input_type" if text_column else where)  # fmt: skip
    return {column: item}


def vqa_columns(engine: Engine) -> tuple[str, str] | None:
    """(image, question) columns of a classifier that reads exactly one of each (a VQA model)."""
    if engine.task != "classification":
        return None
    kinds = [c.modality.value for c in engine.inputs]
    if sorted(kinds) != ["image", "text"]:
        return None
    by_kind = {c.modality.value: c.name for c in engine.inputs}
    return by_kind["image"], by_kind["text"]


def embedding_vector(value: Any, dim: int) -> np.ndarray:
    """A query vector given in a search request."""
    ok = isinstance(value, list) and len(value) == dim
    if ok and all(isinstance(v, int | float) and not isinstance(v, bool) for v in value):
        vector = np.asarray(value, dtype=np.float32)
        if np.isfinite(vector).all() and np.abs(vector).max() > 0:
            return vector
    raise RequestError(f"embedding: expected {dim} finite numbers, not all zero", param="embedding")


def check_index(engine: Engine, index: EmbeddingIndex) -> None:
    """An index is searched only with the embeddings of the model that built it."""
    if engine.task != "contrastive":
        raise ValueError(f"an index is searched with a contrastive bundle; {engine.name!r} is a "
                         f"{engine.task} model")  # fmt: skip
    if index.dim != engine.embedding_dim:
        raise ValueError(f"the index holds {index.dim}-d vectors; this model embeds into "
                         f"{engine.embedding_dim}")  # fmt: skip
    built_by = index.info.get("model_version")
    if built_by and built_by != engine.version:
        raise ValueError(f"the index was built by weights {built_by}, this model's are "
                         f"{engine.version} (variant {engine.variant}): rebuild it with "
                         "`modalforge index build`")  # fmt: skip


def index_card(index: EmbeddingIndex) -> dict[str, Any]:
    return {"size": len(index), "dim": index.dim, "backend": index.backend,
            "column": index.info.get("column")}  # fmt: skip


def _authorized(headers: dict[bytes, bytes], key: str) -> bool:
    given = headers.get(b"x-api-key")
    auth = headers.get(b"authorization", b"")
    if auth[:7].lower() == b"bearer ":
        given = auth[7:].strip()
    return given is not None and hmac.compare_digest(given, key.encode())


def _predict_openapi(columns) -> dict[str, Any]:
    """The request body of /v1/predict, described from the bundle's schema."""
    from modalforge.schema import Modality

    def prop(c, binary: bool) -> dict[str, Any]:
        if c.modality in (Modality.IMAGE, Modality.AUDIO):
            return {
                "type": "string",
                "format": "binary" if binary else "byte",
                "description": f"{c.modality.value} file"
                + ("" if binary else ", base64 or data: URL"),
            }
        if c.modality is Modality.TABULAR:
            return {"type": "number"}
        if c.modality is Modality.GRAPH:
            return {"type": "object", "description": "{num_nodes, edges, x?}"}
        return {"type": "string"}

    def schema(binary: bool) -> dict[str, Any]:
        return {
            "type": "object",
            "properties": {n: prop(c, binary) for n, c in columns.items()},
            "required": [n for n, c in columns.items() if c.required],
            "additionalProperties": False,
        }

    return {
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {"schema": schema(False)},
                "multipart/form-data": {"schema": schema(True)},
            },
        }
    }
