"""A route's declaration: its path, when this server can answer it, how to mount it, and the
refusal otherwise (see ``serve.routes``)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from fastapi import FastAPI

from modalforge.errors import RequestError
from modalforge.serve.context import Context


@dataclass(frozen=True)
class Route:
    path: str
    available: Callable[[Context], bool]
    mount: Callable[[FastAPI, Context], None]
    refusal: Callable[[Context], RequestError]


def needs(capability: str) -> Callable[[Context], bool]:
    return lambda ctx: ctx.engine.can(capability)


def refused(what: str) -> Callable[[Context], RequestError]:
    """``'NAME' is a TASK model: WHAT`` (422, ``param`` model)."""
    return lambda ctx: RequestError(f"{ctx.engine.name!r} is a {ctx.engine.task} model: {what}",
                                    param="model")  # fmt: skip


__all__ = ["Route", "needs", "refused"]
