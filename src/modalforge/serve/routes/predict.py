"""``POST /v1/predict`` (one sample, JSON or multipart) and ``POST /v1/predict/batch``: every
task answers them with what its serving adapter predicts."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from modalforge.errors import RequestError
from modalforge.schema import Modality
from modalforge.serve.context import Context, at
from modalforge.serve.requests import (
    JSON,
    batch_items,
    check_body,
    json_fields,
    load_json,
    multipart_fields,
)

#: capability a model needs for these routes (None: every model answers them)
CAPABILITY = None


def mount(app: FastAPI, ctx: Context) -> None:
    columns = ctx.columns

    @app.post(
        "/v1/predict",
        tags=["predict"],
        openapi_extra=predict_openapi(columns),
        summary="Predict one sample",
    )
    async def predict(request: Request):
        with ctx.admission() as ticket:
            body = await request.body()
            mime = check_body(body, request.headers.get("content-type"))
            if mime == JSON:
                obj = load_json(body)
                if isinstance(obj, dict):
                    ctx.model_param(obj)
                fields = json_fields(obj, columns)
            else:
                fields = multipart_fields(body, request.headers["content-type"], columns)
                if "model" not in columns and isinstance(fields.get("model"), bytes):
                    ctx.model_param({"model": fields.pop("model").decode("utf-8", "replace")})
            return JSONResponse(ctx.envelope(await ctx.result_of(ticket, fields)))

    @app.post("/v1/predict/batch", tags=["predict"], summary="Predict many samples in one call")
    async def predict_batch(request: Request):
        body = await request.body()
        if check_body(body, request.headers.get("content-type")) != JSON:
            raise RequestError("a batch is sent as application/json", status=415)
        obj = load_json(body)
        items = batch_items(obj, ctx.config.max_batch_items)
        ctx.model_param(obj)
        fields = []
        for i, item in enumerate(items):
            try:
                fields.append(json_fields(item, columns, where=f"inputs[{i}]"))
            except RequestError as err:
                raise at(err, i) from None

        results = await ctx.each(fields, "inputs")
        return JSONResponse({**ctx.envelope({}), "predictions": results})


def predict_openapi(columns) -> dict[str, Any]:
    """The request body of /v1/predict, described from the bundle's schema."""

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


__all__ = ["CAPABILITY", "mount", "predict_openapi"]
