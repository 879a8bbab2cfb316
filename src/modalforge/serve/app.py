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

import contextlib
import functools
import hmac
import importlib.resources
import json
import logging
import math
import re
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from modalforge.errors import RequestError
from modalforge.index import EmbeddingIndex
from modalforge.runtime.engine import Engine
from modalforge.serve.batching import MicroBatcher
from modalforge.serve.context import Busy, Context
from modalforge.serve.limits import ClientLimits, client_id
from modalforge.serve.metrics import ServerMetrics
from modalforge.serve.routes import mount_all
from modalforge.serve.routes.embeddings import check_index, index_card

log = logging.getLogger("modalforge.serve")


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
    # fetch allowed URLs even from private/loopback/link-local addresses (off: refused)
    allow_private_urls: bool = False
    # per client (its API key when the server checks one, else its IP), on POST /v1/*:
    rate_limit: float | None = None  # requests per second; None: no rate limit
    rate_burst: int = 20  # requests a client may send at once before the rate applies
    max_client_concurrency: int | None = 64  # requests in flight per client; None: no cap
    # what one image / audio input may be, checked from its header (None: the bundle's own,
    # 40 M pixels; audio: 120 s)
    max_image_pixels: int | None = None
    max_audio_seconds: float | None = None


@dataclass
class Hooks:
    """How a host that runs several copies of the app changes it (``serve.ray_serve``: one copy
    per Ray Serve replica); the plain server has none, and each one left out changes nothing.

    ``warmup(engine, max_batch)`` runs in the inference thread instead of
    ``engine.warmup(max_batch)``; ``started()`` is awaited once the app is ready and
    ``stopping()`` when it starts draining; ``metrics(own)`` turns this app's Prometheus
    exposition into what ``/metrics`` answers, ``readiness(body)`` this app's ``/readyz`` body
    into what it answers (the status code stays this app's own).
    """

    warmup: Callable[[Engine, int], None] | None = None
    started: Callable[[], Awaitable[None]] | None = None
    stopping: Callable[[], Awaitable[None]] | None = None
    metrics: Callable[[bytes], Awaitable[bytes]] | None = None
    readiness: Callable[[dict[str, Any]], Awaitable[dict[str, Any]]] | None = None


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
    """Pure-ASGI front of the app: API key for ``/v1/*``, per-client limits on ``POST /v1/*``,
    body-size limit, request metrics.

    A body over ``limit`` bytes is answered 413 without reading further (``Content-Length``
    checked first, chunked bodies counted as they stream in); the app then gets the buffered body.
    A client over its rate or in-flight cap (``client_limits``) is answered 429 + ``Retry-After``
    before its body is read.
    """

    def __init__(
        self,
        app: FastAPI,
        limit: int,
        api_key: str | None,
        metrics: ServerMetrics,
        routes: set[str],
        client_limits: ClientLimits | None = None,
    ) -> None:
        self.app = app
        self.limit = limit
        self.api_key = api_key
        self.metrics = metrics
        self.paths = routes
        self.client_limits = client_limits

    @property
    def state(self):
        return self.app.state

    @property
    def routes(self):
        """The app's routes, for hosts that read them (Ray Serve labels its metrics by route)."""
        return self.app.routes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        path = scope["path"]
        route = path if path in self.paths else "other"
        status = [500]
        rid = request_id(dict(scope.get("headers", [])))
        scope.setdefault("state", {})["request_id"] = rid
        sent = [False, False]  # response started, response finished

        async def send_status(message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                headers = [*message.get("headers", []), (b"x-request-id", rid.encode())]
                message = {**message, "headers": headers}
                sent[0] = True
            elif message["type"] == "http.response.body" and not message.get("more_body"):
                sent[1] = True
            await send(message)

        try:
            await self._handle(scope, receive, send_status, path)
        except Exception as err:
            # Starlette re-raises a fault after its handler has answered 500 (logged there, with
            # the request id); raising on would make uvicorn drop the keep-alive connection, and
            # with it the next request on it, which may be another client's behind a proxy
            if not sent[0]:
                log.error("modalforge: server fault on %s (request id %s)", path, rid,
                          exc_info=err)  # fmt: skip
                await _send_error(send_status, f"internal error (request id {rid})", 500,
                                  "server_error")  # fmt: skip
            elif not sent[1]:
                raise  # a response cut off mid-body: the connection cannot be reused
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
        limits = self.client_limits
        if limits is None or not limits.enabled or not path.startswith("/v1/"):
            await self._body(scope, receive, send)
            return
        client = client_id(scope, self.api_key.encode() if self.api_key else None)
        refused = limits.acquire(client)
        if refused is not None:
            self.metrics.rate_limited(refused.reason)
            retry = str(max(1, math.ceil(refused.retry_after))).encode()
            extra = {b"retry-after": retry, b"connection": b"close"}  # the body is not read
            await _send_error(send, refused.message, 429, "rate_limit_error", extra)
            return
        try:
            await self._body(scope, receive, send)
        finally:
            limits.release(client)

    async def _body(self, scope, receive, send) -> None:
        headers = dict(scope.get("headers", []))
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
    engine: Engine,
    config: ServeConfig | None = None,
    index: EmbeddingIndex | None = None,
    hooks: Hooks | None = None,
) -> FastAPI:
    """The service for one loaded bundle. Start it with uvicorn (``modalforge serve``).
    ``index``: an embedding index built with this bundle (``modalforge index build``), searched
    by ``POST /v1/search``; ``hooks``: see ``Hooks`` (Ray Serve's replicas)."""
    import os

    config = config or ServeConfig()
    hooks = hooks or Hooks()
    engine.limit_media(config.max_image_pixels, config.max_audio_seconds)
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
    ctx = Context(engine, config, batcher, index)
    state = ctx.state
    columns = ctx.columns

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        await batcher.start()
        # warm up in the inference thread itself (its torch threads, its lazy initialisation)
        warmup = hooks.warmup or (lambda e, size: e.warmup(size))
        await batcher.run_in_worker(lambda: warmup(engine, config.max_batch))
        state["status"] = "ready"
        log.info("modalforge: serving %s (version %s)", engine.name, engine.version)
        if hooks.started is not None:
            await hooks.started()
        yield
        state["status"] = "draining"
        if hooks.stopping is not None:
            await hooks.stopping()
        await batcher.stop(config.drain_timeout_s)

    app = FastAPI(
        title="modalforge",
        summary=f"{engine.task} with {engine.name}: inputs {', '.join(columns)}",
        version=engine.version,
        lifespan=lifespan,
    )
    app.state.engine, app.state.batcher, app.state.metrics = engine, batcher, metrics
    app.state.config, app.state.context = config, ctx

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
        rid = getattr(request.state, "request_id", "-")
        log.error("modalforge: server fault on %s (request id %s)", request.url.path, rid,
                  exc_info=err)  # fmt: skip
        metrics.error(request.url.path, "server_error")
        return error_response(
            f"internal error: {type(err).__name__} (request id {rid}; the server log has it)", 500
        )

    mount_all(app, ctx)

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
        if hooks.readiness is not None:
            body = await hooks.readiness(body)
        return JSONResponse(body, 200 if ready else 503)

    @app.get("/metrics", tags=["ops"], summary="Prometheus metrics")
    async def prometheus():
        text = metrics.render()
        if hooks.metrics is not None:
            text = await hooks.metrics(text)
        return Response(text, media_type=metrics.content_type)

    @app.get("/", include_in_schema=False)
    async def playground():
        page = importlib.resources.files("modalforge.serve").joinpath("static/index.html")
        return HTMLResponse(page.read_text(encoding="utf-8"))

    @app.exception_handler(Busy)
    async def _busy(request: Request, err: Busy):
        metrics.error(request.url.path, "busy")
        retry = str(math.ceil(err.queue_full.retry_after))
        return error_response(
            str(err.queue_full), 429, "rate_limit_error", headers={"Retry-After": retry}
        )

    routes = {r.path for r in app.routes if "{" not in getattr(r, "path", "{")}
    limits = ClientLimits(config.rate_limit, config.rate_burst, config.max_client_concurrency)
    return Gate(app, round(config.max_body_mb * 2**20), config.api_key, metrics, routes, limits)


_REQUEST_ID = re.compile(rb"[A-Za-z0-9._:-]{1,64}")


def request_id(headers: dict[bytes, bytes]) -> str:
    """The client's ``X-Request-Id`` when it is a short token, else a fresh one: every response
    carries it back, and a server fault's log line names it."""
    given = headers.get(b"x-request-id", b"")
    return given.decode() if _REQUEST_ID.fullmatch(given) else uuid.uuid4().hex[:16]


def _authorized(headers: dict[bytes, bytes], key: str) -> bool:
    given = headers.get(b"x-api-key")
    auth = headers.get(b"authorization", b"")
    if auth[:7].lower() == b"bearer ":
        given = auth[7:].strip()
    return given is not None and hmac.compare_digest(given, key.encode())
