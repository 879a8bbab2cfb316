"""What every route shares: the engine, the batcher, admission, deadlines, the ``model`` field.

``create_app`` builds one ``Context`` and hands it to each route module's ``mount``.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request

from modalforge.errors import RequestError
from modalforge.serve.batching import Closed, MicroBatcher, QueueFull
from modalforge.serve.requests import JSON, check_body, load_json


class Busy(Exception):
    """The batcher's queue is full: answered 429 with ``Retry-After``."""

    def __init__(self, queue_full: QueueFull) -> None:
        super().__init__(str(queue_full))
        self.queue_full = queue_full


@dataclass
class Context:
    engine: Any  # runtime.Engine
    config: Any  # serve.app.ServeConfig
    batcher: MicroBatcher
    index: Any = None  # an EmbeddingIndex served by /v1/search
    state: dict[str, str] = field(default_factory=lambda: {"status": "starting"})
    columns: dict[str, Any] = field(init=False)  # the model's inputs by name

    def __post_init__(self) -> None:
        self.columns = {c.name: c for c in self.engine.inputs}

    @contextlib.contextmanager
    def admission(self):
        """A place in the batcher for one request, taken before its body is parsed, so a full
        server answers 429 cheaply and the batcher knows this request is on its way."""
        if self.state["status"] != "ready":
            raise RequestError(f"the server is {self.state['status']}", status=503,
                               kind="unavailable")  # fmt: skip
        try:
            with self.batcher.admit() as ticket:
                yield ticket
        except QueueFull as err:
            raise Busy(err) from None
        except Closed:
            raise RequestError(
                "the server is shutting down", status=503, kind="unavailable"
            ) from None

    async def result_of(self, ticket, fields: dict[str, Any]) -> dict[str, Any]:
        """Decode + predict in the inference thread, batched with other requests."""
        timeout = self.config.request_timeout_s
        try:
            return await asyncio.wait_for(ticket.submit(fields), timeout)
        except TimeoutError:
            raise RequestError(
                f"no result within {timeout:g} s", status=504, kind="timeout"
            ) from None

    async def each(self, fields: list[dict[str, Any]], where: str) -> list[dict[str, Any]]:
        """Every item through the batcher on its own (batched with whatever else is queued); a
        refusal names its item as ``where[i]``."""

        async def one(i: int, f: dict[str, Any]):
            try:
                with self.admission() as ticket:
                    return await self.result_of(ticket, f)
            except RequestError as err:
                raise at(err, i, where) from None

        return list(await asyncio.gather(*(one(i, f) for i, f in enumerate(fields))))

    def model_param(self, obj: dict[str, Any]) -> None:
        """Pop a request's ``model`` field (unless a column is called so) and refuse another
        model's name."""
        name = obj.pop("model", None) if "model" not in self.columns else None
        if name is not None and name != self.engine.name:
            raise RequestError(
                f"model {name!r} is not served here (this server has {self.engine.name!r})",
                status=404,
                param="model",
            )

    def envelope(self, result: dict[str, Any]) -> dict[str, Any]:
        return {"model": self.engine.name, "version": self.engine.version, **result}

    async def json_object(self, request: Request, field: str) -> dict[str, Any]:
        body = await request.body()
        if check_body(body, request.headers.get("content-type")) != JSON:
            raise RequestError(f"{request.url.path} takes application/json", status=415)
        obj = load_json(body)
        if not isinstance(obj, dict):
            raise RequestError(f"expected a JSON object with {field!r}")
        return obj


def at(err: RequestError, i: int, where: str = "inputs") -> RequestError:
    """``err`` as the refusal of item ``i`` of ``where``."""
    if err.message.startswith(f"{where}[{i}]"):  # named already
        return err
    return RequestError(
        f"{where}[{i}]: {err.message}",
        err.status,
        f"{where}[{i}].{err.param}" if err.param else f"{where}[{i}]",
        err.kind,
    )


__all__ = ["Busy", "Context", "at"]
