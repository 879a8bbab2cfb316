"""Errors that cross layers: a request the server refuses (raised by task adapters while decoding
or validating, turned into a 4xx by ``serve``)."""

from __future__ import annotations

from modalforge.data.errors import DecodeError


class RequestError(Exception):
    """A request the server refuses: ``status`` (4xx), a message naming the field and problem."""

    def __init__(
        self,
        message: str,
        status: int = 422,
        param: str | None = None,
        kind: str = "invalid_request_error",
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.param = param
        self.kind = kind


__all__ = ["DecodeError", "RequestError"]
