"""Hostile inputs for the served routes: what a careless or malicious client sends.

Two faces over the same builders:

* hypothesis strategies (``images()``, ``audio()``, ``base64_values()``, ``json_tokens()``,
  ``multipart_bodies()`` and, per bundle kind, ``requests(kind)``), drawn by
  ``benchmarks/fuzz.py`` and ``tests/test_fuzz.py``;
* ``corpus(kind)``: a fixed list of named hostile requests per bundle kind, the hostile share of
  ``benchmarks/soak.py`` and a short deterministic check.

A request is a ``Hostile(name, request, refuse)``: ``request`` holds ``httpx.Client.request``
keyword arguments (``method``, ``url`` relative to the server, then ``content`` + ``headers``,
``json``, or ``files`` + ``data``); ``refuse`` says the request is certainly a client mistake, so
the answer must be a 4xx -- where a draw may happen to be a valid input (a bit flip in a pixel, a
JPEG sent as ``image/png``) it is False, and only "not a 5xx" holds.

What is built: truncated, garbage and wrong-format PNG / JPEG / WebP / WAV / FLAC; image headers
that declare huge dimensions (decompression bombs); WAV headers with 64 channels, 3-bit samples,
0 Hz or 4 GHz rates, data sizes that lie; bad base64; ``data:`` URLs whose MIME lies (HTML
declared as a PNG, a PNG declared as HTML); JSON nested thousands deep, numbers of 5000 digits, lone
UTF-16 surrogates, NaN and Infinity, non-UTF-8 bytes; multipart with missing, extra and duplicated
parts, broken boundaries and lying content types.
"""

from __future__ import annotations

import base64
import io
import json
import struct
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root: tests.*
from tests.conftest import png_bytes, png_claiming, sine, wav_bytes

KINDS = ("classifier", "contrastive", "caption", "vqa", "transcription", "chat")
HOLE = "\x00HOLE\x00"  # where a raw JSON token goes in a request template


class Hostile(NamedTuple):
    """A named request (``httpx`` kwargs); ``refuse``: it must get a 4xx, not only "no 5xx"."""

    name: str
    request: dict[str, Any]
    refuse: bool = True


# -- media builders -------------------------------------------------------------------------------
def image_bytes(fmt: str = "PNG", size: tuple[int, int] = (30, 30), color=(200, 40, 40)) -> bytes:
    """A real, small image in ``fmt`` (PNG, JPEG, WEBP, GIF, BMP)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format=fmt)
    return buf.getvalue()


def jpeg_claiming(width: int, height: int) -> bytes:
    """SOI + a baseline SOF0 declaring width x height (3 channels) + EOI: no scan data."""
    sof = struct.pack(">BHHB", 8, height, width, 3) + b"\x01\x11\x00\x02\x11\x00\x03\x11\x00"
    return b"\xff\xd8" + b"\xff\xc0" + struct.pack(">H", len(sof) + 2) + sof + b"\xff\xd9"


def webp_claiming(width: int, height: int) -> bytes:
    """A RIFF/WEBP with a VP8X chunk declaring a width x height canvas (each up to 2**24)."""
    vp8x = (
        b"\x00\x00\x00\x00" + (width - 1).to_bytes(3, "little") + (height - 1).to_bytes(3, "little")
    )
    chunk = b"VP8X" + struct.pack("<I", len(vp8x)) + vp8x
    return b"RIFF" + struct.pack("<I", 4 + len(chunk)) + b"WEBP" + chunk


def wav_header(
    channels: int = 1,
    bits: int = 16,
    rate: int = 16_000,
    frames: int = 1600,
    data_len: int | None = None,
    fmt_tag: int = 1,
) -> bytes:
    """A hand-made RIFF/WAVE: a fmt chunk with these fields as given (however absurd) and
    ``frames`` frames of a tone; ``data_len`` overrides the size the data chunk declares."""
    width = max(1, (bits + 7) // 8)
    block = channels * width
    peak = 2 ** (8 * width - 1) - 1
    wave = (0.3 * peak * np.sin(np.arange(min(4096, frames * channels)) * 0.05)).astype(np.int64)
    if width == 1:  # 8-bit WAV is unsigned
        wave += 128
    pcm = b"".join(int(v).to_bytes(width, "little", signed=width > 1) for v in wave)
    pcm += b"\0" * max(0, frames * block - len(pcm))
    fmt = struct.pack(
        "<HHIIHH",
        fmt_tag,
        channels & 0xFFFF,
        rate & 0xFFFFFFFF,
        (rate * block) & 0xFFFFFFFF,
        block & 0xFFFF,
        bits & 0xFFFF,
    )
    size = len(pcm) if data_len is None else data_len
    body = b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt + b"data"
    body += struct.pack("<I", size & 0xFFFFFFFF) + pcm
    return b"RIFF" + struct.pack("<I", len(body)) + body


def flac_bytes(seconds: float = 0.25) -> bytes:
    return wav_bytes(sine(440, seconds), fmt="FLAC")


def html() -> bytes:
    return b"<!doctype html><html><body><script>alert(1)</script></body></html>"


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def data_url(mime: str, data: bytes) -> str:
    return f"data:{mime};base64,{b64(data)}"


def multipart(
    parts: list[tuple[str | None, str | None, str | None, bytes]], boundary: str = "mfz"
) -> tuple[bytes, dict[str, str]]:
    """A raw multipart/form-data body from ``(name, filename, content_type, data)`` parts (a
    None name leaves ``name=`` out) -> (body, headers)."""
    out = b""
    for name, filename, ctype, data in parts:
        disposition = "form-data" + (f'; name="{name}"' if name is not None else "")
        disposition += f'; filename="{filename}"' if filename else ""
        out += f"--{boundary}\r\nContent-Disposition: {disposition}\r\n".encode()
        out += f"Content-Type: {ctype}\r\n".encode() if ctype else b""
        out += b"\r\n" + data + b"\r\n"
    out += f"--{boundary}--\r\n".encode()
    return out, {"content-type": f"multipart/form-data; boundary={boundary}"}


def raw_json(template: Any, token: str) -> bytes:
    """``template`` as JSON with the string ``HOLE`` replaced by ``token`` verbatim (which need
    not be valid JSON, or may be JSON Python would never write: NaN, 5000 digits, "\\ud800")."""
    text = json.dumps(template)
    return text.replace(json.dumps(HOLE), token).encode("utf-8", "surrogatepass")


# -- fixed hostile payloads -----------------------------------------------------------------------
def bad_images() -> list[tuple[str, bytes, bool]]:
    """(name, bytes, certainly refused) for an image input."""
    png, jpg, webp = image_bytes("PNG"), image_bytes("JPEG"), image_bytes("WEBP")
    return [
        ("png truncated", png[: len(png) // 2], True),
        ("png signature only", png[:8], True),
        ("jpeg truncated", jpg[:40], True),
        ("webp truncated", webp[:20], True),
        ("garbage", bytes(range(256)) * 4, True),
        ("empty", b"", True),
        ("png 1 x 1,000,000 header", png_claiming(1, 1_000_000), True),
        ("png 50k x 50k header", png_claiming(50_000, 50_000), True),
        ("png 0 x 0 header", png_claiming(0, 0), True),
        ("jpeg 65535 x 65535 header", jpeg_claiming(65535, 65535), True),
        ("webp 16M x 16M canvas", webp_claiming(2**24, 2**24), True),
        ("wav as image", wav_bytes(sine(440, 0.1)), True),
        ("flac as image", flac_bytes(0.1), True),
        ("html as image", html(), True),
        ("gif header only", b"GIF89a" + b"\0" * 20, True),
    ]


def bad_audio() -> list[tuple[str, bytes, bool]]:
    """(name, bytes, certainly refused) for an audio input."""
    wav, flac = wav_bytes(sine(440, 0.25)), flac_bytes(0.25)
    return [
        ("wav truncated header", wav[:30], True),
        ("flac truncated", flac[:50], True),
        ("wav 64 channels", wav_header(channels=64, frames=400), True),
        ("wav 0 channels", wav_header(channels=0), True),
        ("wav 3-bit", wav_header(bits=3), True),
        ("wav 0 Hz", wav_header(rate=0), True),
        ("wav 4 GHz", wav_header(rate=4_000_000_000), True),
        ("wav data size lies", wav_header(data_len=10**9), True),
        ("wav unknown format tag", wav_header(fmt_tag=0x1234), True),
        ("png as audio", png_bytes(), True),
        ("text as audio", b"hello, I am not audio", True),
        ("garbage audio", bytes(range(256)) * 8, True),
        ("empty audio", b"", True),
    ]


def bad_base64() -> list[tuple[str, str]]:
    """(name, string) where a base64 value or data: URL is expected; none is a valid input."""
    png = image_bytes("PNG")
    return [
        ("invalid base64 characters", "@@@not base64@@@"),
        ("base64 bad padding", b64(png)[:-3] + "="),
        ("base64 of nothing", ""),
        ("data: URL, html declared as png", data_url("image/png", html())),
        ("data: URL, png declared as html", data_url("text/html", png)),
        ("data: URL, wav declared as png", data_url("image/png", wav_bytes(sine(440, 0.1)))),
        ("data: URL without base64", "data:image/png," + png[:20].decode("latin-1")),
        ("data: URL without a MIME", "data:;base64," + b64(png)),
        ("data: URL, bad base64", "data:image/png;base64,%%%%"),
    ]


def bad_json_tokens() -> list[tuple[str, str]]:
    """(name, raw JSON token) to put in place of a value; each makes the body a client mistake."""
    return [
        ("5000-digit number", "9" * 5000),
        ("5000-digit negative exponent", "1e-" + "9" * 5000),
        ("NaN", "NaN"),
        ("Infinity", "-Infinity"),
        ("lone surrogate", '"\\ud800"'),
        ("lone low surrogate", '"abc\\udfff"'),
        ("nested 5000 deep", "[" * 5000 + "]" * 5000),
        ("nested 100000 deep, unclosed", '{"a":' * 100_000),
        ("truncated", '{"a": [1, 2'),
    ]


# -- where a payload goes, per kind ---------------------------------------------------------------
def _json_request(url: str, template: Any, token: str) -> dict[str, Any]:
    return {
        "method": "POST",
        "url": url,
        "content": raw_json(template, token),
        "headers": {"content-type": "application/json"},
    }


def _file_request(url: str, field: str, data: bytes, ctype: str, extra=None) -> dict[str, Any]:
    body, headers = multipart(
        [(field, f"upload.{ctype.split('/')[-1]}", ctype, data), *(extra or [])]
    )
    return {"method": "POST", "url": url, "content": body, "headers": headers}


def _chat(question: str, part: dict[str, Any]) -> dict[str, Any]:
    content = [{"type": "text", "text": question}, part]
    return {"messages": [{"role": "user", "content": content}], "max_tokens": 4}


def _chat_image(url: str) -> dict[str, Any]:
    return _chat("what colour is this?", {"type": "image_url", "image_url": {"url": url}})


def _chat_audio(data: str) -> dict[str, Any]:
    return _chat("what is said?", {"type": "input_audio",
                                   "input_audio": {"data": data, "format": "wav"}})  # fmt: skip


Slot = Callable[[Any], dict[str, Any]]


def as_data_url(slot: Slot, mime: str) -> Slot:
    """Where a plain string is a text input (``/v1/embeddings``, ``/v1/search``), a bad base64
    string goes inside a ``data:`` URL (a data: URL stays as it is)."""
    return lambda s: slot(s if s.startswith("data:") else f"data:{mime};base64,{s}")


def image_slots(kind: str) -> list[tuple[str, Slot, Slot]]:
    """(where, bytes -> request as a file or base64, str -> request with that base64 / URL
    string) for each place ``kind``'s routes take an image."""
    js = lambda url, t: lambda s: _json_request(url, t(HOLE), json.dumps(s))  # noqa: E731
    if kind in ("classifier", "vqa"):
        field = "image"
        extra = [("question", None, None, b"what colour is this?")] if kind == "vqa" else []
        out = [
            (
                "predict",
                lambda b: _file_request("/v1/predict", field, b, "image/png", extra),
                js("/v1/predict", lambda h: {"image": h}),
            )
        ]
        if kind == "classifier":
            out.append(
                (
                    "predict batch",
                    lambda b: _json_request(
                        "/v1/predict/batch",
                        {"inputs": [{"text": "a red apple"}, {"image": HOLE}]},
                        json.dumps(b64(b)),
                    ),
                    js("/v1/predict/batch", lambda h: {"inputs": [{"image": h}]}),
                )
            )
        else:
            out.append(
                (
                    "chat",
                    lambda b: _json_request(
                        "/v1/chat/completions",
                        _chat_image(HOLE),
                        json.dumps(data_url("image/png", b)),
                    ),
                    js("/v1/chat/completions", _chat_image),
                )
            )
        return out
    if kind == "contrastive":
        return [
            (
                "embeddings",
                lambda b: _json_request(
                    "/v1/embeddings", {"input": ["red", HOLE]}, json.dumps(data_url("image/png", b))
                ),
                as_data_url(js("/v1/embeddings", lambda h: {"input": [h]}), "image/png"),
            ),
            (
                "search",
                lambda b: _json_request(
                    "/v1/search", {"query": HOLE, "k": 3}, json.dumps(data_url("image/png", b))
                ),
                as_data_url(js("/v1/search", lambda h: {"query": h, "k": 3}), "image/png"),
            ),
        ]
    if kind == "caption":
        return [
            (
                "caption",
                lambda b: _file_request("/v1/caption", "image", b, "image/png"),
                js("/v1/caption", lambda h: {"image": h}),
            ),
            (
                "chat",
                lambda b: _json_request(
                    "/v1/chat/completions", _chat_image(HOLE), json.dumps(data_url("image/png", b))
                ),
                js("/v1/chat/completions", _chat_image),
            ),
        ]
    if kind == "chat":
        return [
            (
                "chat",
                lambda b: _json_request(
                    "/v1/chat/completions", _chat_image(HOLE), json.dumps(data_url("image/png", b))
                ),
                js("/v1/chat/completions", _chat_image),
            )
        ]
    return []


def audio_slots(kind: str) -> list[tuple[str, Slot, Slot]]:
    """As ``image_slots``, for audio."""
    js = lambda url, t: lambda s: _json_request(url, t(HOLE), json.dumps(s))  # noqa: E731
    if kind == "classifier":
        return [
            (
                "predict audio",
                lambda b: _file_request("/v1/predict", "audio", b, "audio/wav"),
                js("/v1/predict", lambda h: {"audio": h}),
            )
        ]
    if kind == "contrastive":
        return [
            (
                "embeddings audio",
                lambda b: _json_request(
                    "/v1/embeddings", {"input": [HOLE]}, json.dumps(data_url("audio/wav", b))
                ),
                as_data_url(js("/v1/embeddings", lambda h: {"input": h}), "audio/wav"),
            )
        ]
    if kind == "transcription":
        model = [("model", None, None, b"asr")]
        return [
            (
                "transcriptions",
                lambda b: _file_request("/v1/audio/transcriptions", "file", b, "audio/wav", model),
                lambda s: _file_request(
                    "/v1/audio/transcriptions", "file", s.encode(), "audio/wav", model
                ),
            )
        ]
    if kind == "chat":
        return [
            (
                "chat audio",
                lambda b: _json_request(
                    "/v1/chat/completions", _chat_audio(HOLE), json.dumps(b64(b))
                ),
                js("/v1/chat/completions", _chat_audio),
            )
        ]
    return []


def json_templates(kind: str) -> list[tuple[str, Any]]:
    """(url, a request body with ``HOLE`` where a value goes) per route of ``kind``: each
    hostile JSON token is tried in each place."""
    msgs = [{"role": "user", "content": HOLE}]
    by_kind: dict[str, list[tuple[str, Any]]] = {
        "classifier": [
            ("/v1/predict", {"text": HOLE}),
            ("/v1/predict/batch", {"inputs": HOLE}),
            ("/v1/predict", HOLE),
        ],
        "contrastive": [
            ("/v1/embeddings", {"input": HOLE}),
            ("/v1/search", {"query": "red", "k": HOLE}),
            ("/v1/search", {"embedding": [HOLE] * 32}),
        ],
        "caption": [
            ("/v1/caption", {"image": b64(png_bytes()), "temperature": HOLE}),
            ("/v1/chat/completions", {"messages": HOLE}),
        ],
        "vqa": [("/v1/predict", {"question": HOLE}), ("/v1/chat/completions", {"messages": msgs})],
        "transcription": [("/v1/audio/transcriptions", HOLE)],
        "chat": [
            ("/v1/chat/completions", {"messages": msgs, "max_tokens": 4}),
            (
                "/v1/chat/completions",
                {
                    "messages": [{"role": "user", "content": "hi"}],
                    "temperature": HOLE,
                    "max_tokens": 4,
                },
            ),
            ("/v1/completions", {"prompt": HOLE, "max_tokens": 4}),
        ],
    }
    return by_kind[kind]


def shape(template: Any) -> str:
    """A JSON template in short, its hole as ``…``: ``{"text": …}``."""

    def short(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: short(v) for k, v in value.items()}
        if isinstance(value, list):
            return [short(v) for v in value[:3]] + (["..."] if len(value) > 3 else [])
        return f"<{len(value)} chars>" if isinstance(value, str) and len(value) > 24 else value

    text = json.dumps(short(template)).replace(json.dumps(HOLE), "…")
    return text if len(text) <= 60 else text[:57] + "..."


def multipart_url(kind: str) -> tuple[str, str, list[str]]:
    """(url, the file field, the other allowed fields) of ``kind``'s multipart route."""
    return {
        "classifier": ("/v1/predict", "image", ["text", "audio"]),
        "vqa": ("/v1/predict", "image", ["question"]),
        "caption": ("/v1/caption", "image", []),
        "transcription": ("/v1/audio/transcriptions", "file", ["model"]),
        "contrastive": ("/v1/embeddings", "input", []),
        "chat": ("/v1/chat/completions", "messages", []),
    }[kind]


def bad_multiparts(kind: str) -> list[Hostile]:
    url, field, others = multipart_url(kind)
    png, wav = image_bytes("PNG"), wav_bytes(sine(440, 0.2))
    good = wav if kind == "transcription" else png
    ctype = "audio/wav" if kind == "transcription" else "image/png"
    text_field = others[0] if others else "text"
    out = []

    def add(name: str, parts, boundary="mfz", refuse=True, headers=None):
        body, h = multipart(parts, boundary)
        out.append(
            Hostile(
                f"multipart {name}",
                {"method": "POST", "url": url, "content": body, "headers": headers or h},
                refuse,
            )
        )

    add("no parts", [])
    add("duplicated file part", [(field, "a", ctype, good), (field, "b", ctype, good)])
    add(
        "duplicated text part",
        [(text_field, None, None, b"a"), (text_field, None, None, b"b"), (field, "a", ctype, good)],
    )
    add("extra unknown part", [(field, "a", ctype, good), ("colour", None, None, b"red")])
    add("part without a name", [(None, "a", ctype, good)])
    add(
        "wrong boundary",
        [(field, "a", ctype, good)],
        headers={"content-type": "multipart/form-data; boundary=other"},
    )
    add("no boundary", [(field, "a", ctype, good)], headers={"content-type": "multipart/form-data"})
    if kind != "transcription":  # the image part: a lying declared type, the wrong bytes
        add("image part holding a wav", [(field, "a.png", "image/png", wav)])
        add("image part holding html", [(field, "a.png", "image/png", html())])
        # a real PNG declared as audio: may be taken (the bytes are sniffed) or refused
        add("image part declared as audio", [(field, "a.wav", "audio/wav", png)], refuse=False)
    else:
        add("audio part holding a png", [(field, "a.wav", "audio/wav", png)])
        add("audio part holding html", [(field, "a.wav", "audio/wav", html())])
    body, headers = multipart([(field, "a", ctype, good)])
    out.append(
        Hostile(
            "multipart truncated",
            {"method": "POST", "url": url, "content": body[: len(body) // 2], "headers": headers},
        )
    )
    out.append(
        Hostile(
            "multipart declared, JSON sent",
            {"method": "POST", "url": url, "content": b'{"a": 1}', "headers": headers},
        )
    )
    return out


def corpus(kind: str) -> list[Hostile]:
    """Every fixed hostile payload in every place ``kind``'s routes take one: images, audio,
    base64 strings and data: URLs, raw JSON tokens, multipart bodies, bodies of the wrong type."""
    if kind not in KINDS:
        raise ValueError(f"kind {kind!r}: expected one of {list(KINDS)}")
    out: list[Hostile] = []
    for where, as_file, as_string in image_slots(kind):
        for name, data, refuse in bad_images():
            out.append(Hostile(f"{where}: {name}", as_file(data), refuse))
        for name, s in bad_base64():
            out.append(Hostile(f"{where} string: {name}", as_string(s)))
    for where, as_file, as_string in audio_slots(kind):
        for name, data, refuse in bad_audio():
            out.append(Hostile(f"{where}: {name}", as_file(data), refuse))
        if kind != "transcription":
            for name, s in bad_base64():
                out.append(Hostile(f"{where} string: {name}", as_string(s)))
    for url, template in json_templates(kind):
        for name, token in bad_json_tokens():
            out.append(
                Hostile(f"{url} {shape(template)}: {name}", _json_request(url, template, token))
            )
    out += bad_multiparts(kind)
    for url in {u for u, _ in json_templates(kind)}:
        out += [
            Hostile(
                f"{url}: non-UTF-8 JSON",
                {
                    "method": "POST",
                    "url": url,
                    "content": b'{"text": "caf\xe9"}',
                    "headers": {"content-type": "application/json"},
                },
            ),
            Hostile(
                f"{url}: empty body",
                {
                    "method": "POST",
                    "url": url,
                    "content": b"",
                    "headers": {"content-type": "application/json"},
                },
            ),
            Hostile(
                f"{url}: text/csv body",
                {
                    "method": "POST",
                    "url": url,
                    "content": b"a,b",
                    "headers": {"content-type": "text/csv"},
                },
            ),
            Hostile(f"{url}: JSON array", {"method": "POST", "url": url, "json": [1, 2, 3]}),
        ]
    return out


# -- hypothesis strategies ------------------------------------------------------------------------
FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")


@st.composite
def _mutated(draw, data: bytes) -> bytes:
    """``data`` cut, with bytes flipped, or with garbage spliced in."""
    how = draw(st.sampled_from(["cut", "flip", "splice"]))
    if how == "cut":
        return data[: draw(st.integers(0, max(0, len(data) - 1)))]
    out = bytearray(data)
    if how == "flip":
        for _ in range(draw(st.integers(1, 8))):
            i = draw(st.integers(0, len(out) - 1))
            out[i] ^= draw(st.integers(1, 255))
        return bytes(out)
    i = draw(st.integers(0, len(out)))
    return bytes(out[:i]) + draw(st.binary(max_size=64)) + bytes(out[i:])


@st.composite
def images(draw) -> tuple[str, bytes, bool]:
    """(what, image bytes, certainly refused): truncated / garbage / mutated real images of every
    format, headers declaring huge sizes, other media sent as an image."""
    how = draw(st.sampled_from(["mutated", "garbage", "huge", "wrong format", "fixed"]))
    if how == "mutated":
        fmt = draw(st.sampled_from(FORMATS))
        size = (draw(st.integers(1, 40)), draw(st.integers(1, 40)))
        data = image_bytes(fmt, size, (draw(st.integers(0, 255)), 0, 0))
        return f"{fmt} mutated", draw(_mutated(data)), False
    if how == "garbage":
        return "garbage", draw(st.binary(max_size=512)), False
    if how == "huge":
        w, h = draw(
            st.sampled_from(
                [(1, 10**6), (10**6, 1), (50_000, 50_000), (65535, 65535), (2**31 - 1, 2**31 - 1)]
            )
        )
        fmt = draw(st.sampled_from(["PNG", "JPEG", "WEBP"]))
        if fmt == "PNG":
            return f"PNG header {w} x {h}", png_claiming(w, h), True
        if fmt == "JPEG":
            return f"JPEG header {w} x {h}", jpeg_claiming(min(w, 65535), min(h, 65535)), True
        return f"WebP canvas {w} x {h}", webp_claiming(min(w, 2**24), min(h, 2**24)), True
    if how == "wrong format":
        name, data = draw(
            st.sampled_from(
                [("wav", wav_bytes(sine(440, 0.1))), ("flac", flac_bytes(0.1)), ("html", html())]
            )
        )
        return f"{name} as image", data, True
    return draw(st.sampled_from(bad_images()))


@st.composite
def audio(draw) -> tuple[str, bytes, bool]:
    """(what, audio bytes, certainly refused): WAV headers with drawn channels / bits / rates /
    sizes, truncated or mutated WAV and FLAC, other media sent as audio."""
    how = draw(st.sampled_from(["header", "mutated", "wrong format", "fixed"]))
    if how == "header":
        channels = draw(st.sampled_from([0, 1, 2, 3, 8, 64, 255, 65535]))
        bits = draw(st.sampled_from([0, 1, 3, 8, 12, 16, 24, 32, 64]))
        rate = draw(st.sampled_from([0, 1, 100, 8000, 16_000, 44_100, 10**6, 4_000_000_000]))
        block = max(1, channels * max(1, (bits + 7) // 8))
        frames = draw(st.integers(0, max(1, 2**16 // block)))  # at most 64 kB of samples
        lie = draw(st.sampled_from([None, 0, 10**9, 2**32 - 1]))
        data = wav_header(channels, bits, rate, frames, lie)
        # what no server should take; 3 or 8 channels, 100 Hz or 1 MHz may be mixed down /
        # resampled or refused; a data size of 2**32 - 1 is how streamed WAV says "unknown", 12
        # bits in 16-bit words is valid PCM
        refuse = (
            channels in (0, 64, 255, 65535)
            or bits in (0, 1, 3, 64)
            or rate in (0, 1, 4_000_000_000)
            or lie == 10**9
        )
        return f"wav {channels} ch {bits} bit {rate} Hz {frames} frames {lie}", data, refuse
    if how == "mutated":
        fmt = draw(st.sampled_from(["WAV", "FLAC"]))
        data = wav_bytes(sine(draw(st.integers(100, 2000)), 0.2), fmt=fmt)
        return f"{fmt} mutated", draw(_mutated(data)), False
    if how == "wrong format":
        name, data = draw(
            st.sampled_from([("png", png_bytes()), ("html", html()), ("text", b"not audio at all")])
        )
        return f"{name} as audio", data, True
    return draw(st.sampled_from(bad_audio()))


def base64_values() -> st.SearchStrategy[tuple[str, str]]:
    """(what, a string sent where base64 or a data: URL is expected), never a valid one."""
    junk = st.text(st.characters(codec="utf-8"), min_size=1, max_size=40).map(lambda s: "!" + s)
    lying = st.tuples(
        st.sampled_from(
            [
                "text/html",
                "image/png",
                "image/jpeg",
                "audio/wav",
                "application/octet-stream",
                "image/svg+xml",
            ]
        ),
        st.sampled_from([html(), b"%PDF-1.4", b"\0" * 32, b"MZ\x90\0"]),
    )
    return st.one_of(
        st.sampled_from(bad_base64()),
        junk.map(lambda s: ("junk base64", s)),
        lying.map(lambda m: (f"data: URL {m[0]} of non-media", data_url(*m))),
    )


def json_tokens() -> st.SearchStrategy[tuple[str, str]]:
    """(what, a raw JSON token): deep nesting, long numbers, lone surrogates, NaN, ..."""
    depth = st.integers(600, 20_000)
    digits = st.integers(1000, 20_000)
    return st.one_of(
        st.sampled_from(bad_json_tokens()),
        depth.map(lambda n: (f"nested {n} deep", "[" * n + "]" * n)),
        depth.map(lambda n: (f"objects nested {n} deep", '{"a":' * n + "1" + "}" * n)),
        digits.map(lambda n: (f"{n}-digit number", "1" * n)),
        digits.map(lambda n: (f"{n}-digit float", "0." + "3" * n)),
        st.integers(0xD800, 0xDFFF).map(lambda c: ("lone surrogate", f'"x\\u{c:04x}y"')),
        st.sampled_from(["NaN", "Infinity", "-Infinity", "1e999", "-1e999"]).map(lambda t: (t, t)),
    )


def requests(kind: str) -> st.SearchStrategy[Hostile]:
    """Hostile requests for ``kind``'s routes: each drawn payload in each place it can go, and
    the fixed corpus."""
    parts: list[st.SearchStrategy[Hostile]] = [st.sampled_from(corpus(kind))]
    for where, as_file, as_string in image_slots(kind):
        parts.append(
            images().map(lambda x, f=as_file, w=where: Hostile(f"{w}: {x[0]}", f(x[1]), x[2]))
        )
        parts.append(
            base64_values().map(
                lambda x, f=as_string, w=where: Hostile(f"{w} string: {x[0]}", f(x[1]))
            )
        )
    for where, as_file, _ in audio_slots(kind):
        parts.append(
            audio().map(lambda x, f=as_file, w=where: Hostile(f"{w}: {x[0]}", f(x[1]), x[2]))
        )
    templates = json_templates(kind)
    parts.append(
        st.tuples(st.sampled_from(templates), json_tokens()).map(
            lambda x: Hostile(
                f"{x[0][0]} {shape(x[0][1])}: {x[1][0]}", _json_request(x[0][0], x[0][1], x[1][1])
            )
        )
    )
    return st.one_of(parts)


__all__ = [
    "KINDS",
    "Hostile",
    "audio",
    "base64_values",
    "corpus",
    "images",
    "json_tokens",
    "multipart",
    "requests",
    "wav_header",
]
