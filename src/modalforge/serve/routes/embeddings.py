"""``POST /v1/embeddings`` (OpenAI's format) for models that embed, and ``POST /v1/search`` over
an index served beside the bundle (``modalforge serve --index``)."""

from __future__ import annotations

import base64
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from modalforge.errors import RequestError
from modalforge.index import EmbeddingIndex
from modalforge.schema import Modality
from modalforge.serve.context import Context
from modalforge.serve.requests import decode_base64
from modalforge.serve.routes.base import Route, needs, refused
from modalforge.tasks.registry import EMBED

#: most hits one /v1/search answers
MAX_SEARCH_K = 1000


def mount_embeddings(app: FastAPI, ctx: Context) -> None:
    engine, config = ctx.engine, ctx.config

    @app.post("/v1/embeddings", tags=["embeddings"],
              summary="Embeddings of texts, images or audio (OpenAI format)")  # fmt: skip
    async def embeddings(request: Request):
        """OpenAI's request: ``{"model", "input": str | [str], "encoding_format": "float" |
        "base64"}``. A plain string goes to the text tower (``input_type``: which text column,
        when there are several); a ``data:image/...;base64,`` or ``data:audio/...`` URL to the
        image or audio tower. Other URLs are never fetched."""
        obj = await ctx.json_object(request, "input")
        ctx.model_param(obj)
        fmt = obj.pop("encoding_format", None) or "float"
        if fmt not in ("float", "base64"):
            raise RequestError("encoding_format is 'float' or 'base64'", param="encoding_format")
        dims = obj.pop("dimensions", None)
        dim = engine.adapter.embedding_dim
        if dims is not None and dims != dim:
            raise RequestError(f"dimensions: this model's embeddings have {dim}",
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
        results = await ctx.each(fields, "input")
        data = []
        for i, (f, r) in enumerate(zip(fields, results, strict=True)):
            vector = r["embeddings"][next(iter(f))]
            if fmt == "base64":  # what the openai package asks for: little-endian float32
                vector = base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode()
            data.append({"object": "embedding", "index": i, "embedding": vector})
        tokens = sum(len(v.split()) for f in fields for v in f.values() if isinstance(v, str))
        usage = {"prompt_tokens": tokens, "total_tokens": tokens}
        return JSONResponse({"object": "list", "data": data, "model": engine.name, "usage": usage})


def mount_search(app: FastAPI, ctx: Context) -> None:
    engine, index = ctx.engine, ctx.index

    @app.post("/v1/search", tags=["embeddings"],
              summary="The index's nearest entries to a text, image or audio")  # fmt: skip
    async def search(request: Request):
        """``{"query": str, "k": 10}``: the query is embedded as ``/v1/embeddings`` embeds an
        input (a string by the text tower, ``input_type`` naming the column when there are
        several; a ``data:image/...`` or ``data:audio/...`` URL by that tower), or given as
        ``"embedding": [floats]``; the answer lists the ``k`` nearest index entries with their
        cosine scores and metadata."""
        obj = await ctx.json_object(request, "query")
        ctx.model_param(obj)
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
            (result,) = await ctx.each([fields], "query")
            vector = np.asarray(result["embeddings"][next(iter(fields))], dtype=np.float32)
        hits = index.search(vector, k=min(k, len(index)))[0] if len(index) else []
        data = [{"object": "search_result", "rank": r, "id": h.id, "score": h.score,
                 "metadata": h.metadata} for r, h in enumerate(hits, 1)]  # fmt: skip
        return JSONResponse({"object": "list", "data": data, "model": engine.name,
                             "index": index_card(index)})  # fmt: skip


def embedding_fields(engine, item: Any, text_column: str | None, where: str) -> dict:
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
        return {towers[kind]: decode_base64(item, where, Modality(kind))}
    if "://" in item[:16]:
        raise RequestError(f"{where}: URLs are not fetched; send a data: URL", param=where)
    texts = [c.name for c in engine.inputs if c.modality.value == "text"]
    column = text_column or (texts[0] if texts else None)
    if column not in texts:
        raise RequestError(f"input_type {text_column!r}: the text towers are {texts}"
                           if text_column else f"{where}: this model has no text tower",
                           param="input_type" if text_column else where)  # fmt: skip
    return {column: item}


def embedding_vector(value: Any, dim: int) -> np.ndarray:
    """A query vector given in a search request."""
    ok = isinstance(value, list) and len(value) == dim
    if ok and all(isinstance(v, int | float) and not isinstance(v, bool) for v in value):
        vector = np.asarray(value, dtype=np.float32)
        if np.isfinite(vector).all() and np.abs(vector).max() > 0:
            return vector
    raise RequestError(f"embedding: expected {dim} finite numbers, not all zero", param="embedding")


def check_index(engine, index: EmbeddingIndex) -> None:
    """An index is searched only with the embeddings of the model that built it."""
    if not engine.can(EMBED):
        raise ValueError(f"an index is searched with a contrastive bundle; {engine.name!r} is a "
                         f"{engine.task} model")  # fmt: skip
    dim = engine.adapter.embedding_dim
    if index.dim != dim:
        raise ValueError(f"the index holds {index.dim}-d vectors; this model embeds into {dim}")
    built_by = index.info.get("model_version")
    if built_by and built_by != engine.version:
        raise ValueError(f"the index was built by weights {built_by}, this model's are "
                         f"{engine.version} (variant {engine.variant}): rebuild it with "
                         "`modalforge index build`")  # fmt: skip


def index_card(index: EmbeddingIndex) -> dict[str, Any]:
    return {"size": len(index), "dim": index.dim, "backend": index.backend,
            "column": index.info.get("column")}  # fmt: skip


ROUTES = (
    Route("/v1/embeddings", needs(EMBED), mount_embeddings,
          refused("embeddings come from a contrastive bundle (train --task contrastive)")),
    Route("/v1/search", lambda ctx: ctx.index is not None, mount_search,
          lambda ctx: RequestError("this server has no index: start it with `modalforge serve "
                                   "BUNDLE --index INDEX`", status=404)),
)  # fmt: skip

__all__ = ["ROUTES", "check_index", "embedding_fields", "embedding_vector", "index_card"]
