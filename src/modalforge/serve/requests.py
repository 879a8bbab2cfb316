"""HTTP bodies -> request fields (column -> bytes / str / number / dict), strictly.

Two formats, chosen by ``Content-Type`` and nothing else:

* ``application/json``: ``{"image": "<base64 or data: URL>", "text": "...", "audio": "..."}``
  (batch: ``{"inputs": [{...}, {...}]}``);
* ``multipart/form-data``: one part per column; files for images and audio, plain parts for text.

Multipart is parsed here with ``python_multipart`` (the parser Starlette uses) because Starlette
decodes a text part that is not UTF-8 as Latin-1 without a word; a model must not read mojibake,
so the raw bytes go to the same strict text decoder training used.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
from typing import Any

from modalforge.data.sniff import modality_from_bytes
from modalforge.errors import RequestError
from modalforge.schema import Column, Modality

JSON = "application/json"
MULTIPART = "multipart/form-data"
BINARY = (Modality.IMAGE, Modality.AUDIO)


def media_type(content_type: str | None) -> str:
    return (content_type or "").split(";", 1)[0].strip().lower()


def check_body(body: bytes, content_type: str | None) -> str:
    """The body's media type, or RequestError (400 empty, 415 anything but JSON / multipart)."""
    mime = media_type(content_type)
    if mime not in (JSON, MULTIPART):
        raise RequestError(
            f"unsupported content type {mime or '(none)'!r}: send {JSON} or {MULTIPART}",
            status=415,
        )
    if not body:
        raise RequestError(
            "empty body: send the model's inputs as JSON or multipart/form-data", status=400
        )
    return mime


MAX_JSON_DEPTH = 32  # nesting of objects and arrays in a request body
MAX_NUMBER_CHARS = 64  # characters of one JSON number literal
_TOO_DEEP = f"invalid JSON: nested too deeply (the limit is {MAX_JSON_DEPTH} levels)"


class _JsonRefused(ValueError):
    """Raised from inside the JSON parser's hooks; becomes a 400."""


def _number_hook(kind: type):
    def parse(literal: str) -> int | float:
        if len(literal) > MAX_NUMBER_CHARS:
            raise _JsonRefused(
                f"a JSON number has {len(literal):,} characters, over the limit of "
                f"{MAX_NUMBER_CHARS}"
            )
        value = kind(literal)
        if not math.isfinite(value):
            raise _JsonRefused(f"the JSON number {literal[:20]} is out of range")
        return value

    return parse


def _no_constant(name: str) -> None:
    raise _JsonRefused(f"{name} is not a JSON number (JSON has no NaN or Infinity)")


def load_json(body: bytes) -> Any:
    """Strict JSON: UTF-8, no NaN / Infinity, numbers of at most ``MAX_NUMBER_CHARS``
    characters, at most ``MAX_JSON_DEPTH`` levels of nesting, strings of valid Unicode (no lone
    surrogates from ``\\ud800`` escapes). Anything else is a 400 that says which limit."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as err:
        raise RequestError(f"body is not valid UTF-8 (byte {err.start})", status=400) from None
    try:
        obj = json.loads(
            text,
            parse_int=_number_hook(int),
            parse_float=_number_hook(float),
            parse_constant=_no_constant,
        )
    except _JsonRefused as err:
        raise RequestError(f"invalid JSON: {err}", status=400) from None
    except RecursionError:  # the C parser's own stack limit, far deeper than ours
        raise RequestError(_TOO_DEEP, status=400) from None
    except json.JSONDecodeError as err:
        raise RequestError(
            f"invalid JSON: {err.msg} at line {err.lineno} column {err.colno}", status=400
        ) from None
    _check_tree(obj)
    return obj


def _check_tree(obj: Any) -> None:
    """Depth and Unicode of a parsed JSON value, without recursion."""
    stack = [(obj, 1, "")]
    while stack:
        value, depth, where = stack.pop()
        if isinstance(value, str):
            _check_unicode(value, where)
            continue
        if not isinstance(value, dict | list):
            continue
        if depth > MAX_JSON_DEPTH:
            raise RequestError(_TOO_DEEP, status=400)
        if isinstance(value, dict):
            for key, item in value.items():
                at = f"{where}.{key}" if where else key
                _check_unicode(key, at)
                stack.append((item, depth + 1, at))
        else:
            stack.extend((item, depth + 1, f"{where}[{i}]") for i, item in enumerate(value))


def _check_unicode(text: str, where: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        at = f" in {where!r}" if where else ""
        raise RequestError(
            f"invalid JSON: a string{at} holds a lone UTF-16 surrogate "
            f"({text[err.start]!r} at character {err.start}); strings must be valid Unicode",
            status=400,
            param=where.split(".")[0].split("[")[0] or None,
        ) from None


def json_fields(obj: Any, columns: dict[str, Column], where: str = "body") -> dict[str, Any]:
    """One JSON object -> fields. Binary columns arrive as base64 (a ``data:`` URL is fine)."""
    if not isinstance(obj, dict):
        raise RequestError(
            f"{where} must be a JSON object of input fields, got {type(obj).__name__}"
        )
    fields: dict[str, Any] = {}
    for name, value in obj.items():
        column = columns.get(name)
        kind = None if column is None or value is None else column.modality
        if kind in BINARY:
            if not isinstance(value, str):
                got = type(value).__name__
                raise RequestError(
                    f"{name!r}: expected a base64 string (or a data: URL), got {got}", param=name
                )
            value = decode_base64(value, name, kind)
        elif kind is Modality.TEXT and not isinstance(value, str):
            raise RequestError(
                f"{name!r}: expected a string, got {type(value).__name__}", param=name
            )
        fields[name] = value
    return fields


def decode_base64(value: str, name: str, expect: Modality | None = None) -> bytes:
    """Strict base64 (standard or URL-safe alphabet), optionally inside a ``data:`` URL.

    A ``data:`` URL must declare its type, and the type must say what the bytes are: ``image/*``
    bytes that sniff as an image, ``audio/*`` bytes that sniff as audio
    (``application/octet-stream``, like plain base64: the bytes decide). ``expect``: the
    modality the field takes, checked against the type and the sniffed bytes."""
    text = value.strip()
    declared = None
    if text.startswith("data:"):
        header, sep, text = text.partition(",")
        if not sep or not header.endswith(";base64"):
            raise RequestError(
                f"{name!r}: a data: URL must be base64 ('data:<type>;base64,...')", param=name
            )
        declared = header[5:].split(";", 1)[0].strip().lower()
        if not declared:  # RFC 2397's default is text/plain: no way to send an image
            raise RequestError(
                f"{name!r}: a data: URL must declare its type ('data:image/png;base64,...')",
                param=name,
            )
    elif "://" in text[:16]:
        raise RequestError(
            f"{name!r}: URLs are not fetched; send the file's bytes as base64", param=name
        )
    try:
        compact = "".join(text.split())
        if "-" in compact or "_" in compact:
            data = base64.urlsafe_b64decode(_pad(compact))
        else:
            data = base64.b64decode(compact, validate=True)
    except (binascii.Error, ValueError) as err:
        raise RequestError(f"{name!r}: invalid base64 ({err})", param=name) from None
    _check_declared(data, declared, name, expect)
    return data


def _check_declared(data: bytes, declared: str | None, name: str, expect: Modality | None):
    if declared in (None, "application/octet-stream"):
        if expect is not None and data:
            sniffed = modality_from_bytes(data[:64])
            if sniffed is not None and sniffed is not expect:
                raise RequestError(
                    f"{name!r}: expected {expect.value}, but the bytes are {sniffed.value}",
                    param=name,
                )
        return
    kind = declared.split("/", 1)[0]
    if kind not in ("image", "audio"):
        raise RequestError(
            f"{name!r}: the data: URL declares {declared!r}; send image/* or audio/* bytes",
            status=415,
            param=name,
        )
    if expect is not None and kind != expect.value:
        raise RequestError(
            f"{name!r}: the data: URL declares {declared!r}, but this field takes {expect.value}",
            param=name,
        )
    sniffed = modality_from_bytes(data[:64])
    if sniffed is None or sniffed.value != kind:
        looks = f"{sniffed.value} bytes" if sniffed else "no image or audio format we read"
        raise RequestError(
            f"{name!r}: the data: URL declares {declared!r}, but its bytes are {looks}",
            param=name,
        )


def _pad(text: str) -> str:
    return text + "=" * (-len(text) % 4)


def multipart_fields(
    body: bytes, content_type: str, columns: dict[str, Column], max_parts: int = 32
) -> dict[str, Any]:
    """A multipart/form-data body -> fields (raw bytes per part; tabular parts as numbers)."""
    from python_multipart.multipart import MultipartParser, parse_options_header

    _, params = parse_options_header(content_type)
    boundary = params.get(b"boundary")
    if not boundary:
        raise RequestError("multipart/form-data without a boundary parameter", status=400)
    parts: list[dict[str, Any]] = []
    current: dict[str, Any] = {}
    header: list[bytes] = [b"", b""]

    def on_part_begin() -> None:
        current.clear()
        current.update(headers={}, data=bytearray())

    def on_header_field(data: bytes, start: int, end: int) -> None:
        header[0] += data[start:end]

    def on_header_value(data: bytes, start: int, end: int) -> None:
        header[1] += data[start:end]

    def on_header_end() -> None:
        current["headers"][header[0].decode("latin-1").lower()] = header[1]
        header[0], header[1] = b"", b""

    def on_part_data(data: bytes, start: int, end: int) -> None:
        current["data"] += data[start:end]

    def on_part_end() -> None:
        if len(parts) >= max_parts:
            raise RequestError(f"too many parts (over {max_parts})", status=400)
        parts.append(dict(current))

    callbacks = {
        "on_part_begin": on_part_begin,
        "on_header_field": on_header_field,
        "on_header_value": on_header_value,
        "on_header_end": on_header_end,
        "on_part_data": on_part_data,
        "on_part_end": on_part_end,
    }
    try:
        parser = MultipartParser(boundary, callbacks)  # type: ignore[arg-type]
        parser.write(body)
        parser.finalize()
    except RequestError:
        raise
    except Exception as err:
        raise RequestError(f"malformed multipart body: {err}", status=400) from None
    if not parts:
        raise RequestError("multipart body has no parts", status=400)

    fields: dict[str, Any] = {}
    for part in parts:
        disposition = part["headers"].get("content-disposition")
        if disposition is None:
            raise RequestError("a multipart part has no Content-Disposition header", status=400)
        _, options = parse_options_header(disposition)
        raw_name = options.get(b"name")
        if raw_name is None:
            raise RequestError("a multipart part has no name", status=400)
        name = raw_name.decode("utf-8", "replace")
        if name in fields:
            raise RequestError(f"field {name!r} given twice", param=name)
        data = bytes(part["data"])
        column = columns.get(name)
        if column is not None and column.modality is Modality.TABULAR:
            fields[name] = _number(data, name)
        elif column is not None and column.modality is Modality.GRAPH:
            fields[name] = load_json(data) if data else None
        else:
            fields[name] = data  # images / audio as bytes; text decoded strictly later
    return fields


def _number(data: bytes, name: str) -> float | None:
    if not data.strip():
        return None
    try:
        return float(data.decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        raise RequestError(f"{name!r}: expected a number", param=name) from None


def batch_items(obj: Any, max_items: int) -> list[Any]:
    """``{"inputs": [...]}`` -> the list, with its size checked."""
    if not isinstance(obj, dict) or not isinstance(obj.get("inputs"), list):
        raise RequestError('a batch is a JSON object {"inputs": [{...}, ...]}', param="inputs")
    unknown = sorted(set(obj) - {"inputs", "model"})
    if unknown:
        raise RequestError(
            f"unknown field(s) {unknown}; a batch has 'inputs' (and 'model')", param=unknown[0]
        )
    items = obj["inputs"]
    if not items:
        raise RequestError("'inputs' is empty", param="inputs")
    if len(items) > max_items:
        raise RequestError(
            f"'inputs' has {len(items)} items, over the limit of {max_items}",
            status=413,
            param="inputs",
        )
    return items
