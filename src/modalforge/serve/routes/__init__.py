"""The task routes, mounted by capability: a model that cannot do what a route does gets no
handler there, only a refusal with the same clear 4xx message every time (what model to serve
instead), and the route stays out of its OpenAPI description.

Each route module lists its ``ROUTES``: the path, whether this server can answer it (a
capability of the model's task, an index loaded), the function that mounts the handler, and the
refusal otherwise.
"""

from __future__ import annotations

from fastapi import FastAPI

from modalforge.serve.context import Context
from modalforge.serve.routes import embeddings, generate, llm, predict
from modalforge.serve.routes.base import Route, needs, refused


def mount_all(app: FastAPI, ctx: Context) -> None:
    """Every task route: its handler where the server can answer, else its refusal. Several
    routes may share a path (``/v1/chat/completions``: a captioner's / VQA model's, or an
    LLM's): the first one this server can answer is mounted, else the first one's refusal."""
    predict.mount(app, ctx)
    paths: dict[str, list[Route]] = {}
    for route in (*embeddings.ROUTES, *generate.ROUTES, *llm.ROUTES):
        paths.setdefault(route.path, []).append(route)
    for routes in paths.values():
        usable = [r for r in routes if r.available(ctx)]
        if usable:
            usable[0].mount(app, ctx)
        else:
            _mount_refusal(app, routes[0], ctx)


def _mount_refusal(app: FastAPI, route: Route, ctx: Context) -> None:
    async def refuse():
        raise route.refusal(ctx)

    app.add_api_route(route.path, refuse, methods=["POST"], include_in_schema=False)


__all__ = ["Route", "mount_all", "needs", "refused"]
