"""Serving: a bundle as an HTTP service (``modalforge serve``); see ``app.create_app``. The
engine that runs the model is ``modalforge.runtime.Engine``."""

from modalforge.errors import RequestError
from modalforge.runtime.engine import Engine
from modalforge.serve.app import ServeConfig, create_app

__all__ = ["Engine", "RequestError", "ServeConfig", "create_app"]
