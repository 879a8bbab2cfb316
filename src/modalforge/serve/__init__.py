"""Serving: a bundle as an HTTP service (``modalforge serve``); see ``app.create_app``."""

from modalforge.serve.app import ServeConfig, create_app
from modalforge.serve.engine import Engine, RequestError

__all__ = ["Engine", "RequestError", "ServeConfig", "create_app"]
