"""OpenAI chat / completions bodies -> what the LLM routes need, strictly.

Every refusal is a ``RequestError`` (400) whose message and ``param`` name the field as OpenAI
would (``messages[1].content[0].image_url.url``). Fields OpenAI's clients send that change
nothing here (``user``, ``metadata``, ``store``, ``logprobs: false``, a zero
``frequency_penalty``, ...) are accepted and ignored; any other field is refused rather than
silently not honoured.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from modalforge.errors import RequestError
from modalforge.schema import Modality
from modalforge.serve.requests import decode_base64

#: most choices one request may ask for (each is its own generation in the engine)
MAX_N = 8
#: most stop strings, as OpenAI allows
MAX_STOP = 4
#: fields accepted with any value and not used
IGNORED = frozenset({"user", "metadata", "store", "service_tier", "parallel_tool_calls",
                     "safety_identifier", "prompt_cache_key"})  # fmt: skip
#: fields accepted only with the value that means "off" (what they would ask for is not offered)
OFF = {
    "logprobs": (None, False), "top_logprobs": (None, 0), "frequency_penalty": (None, 0),
    "presence_penalty": (None, 0), "logit_bias": (None, {}), "tools": (None, []),
    "tool_choice": (None, "none", "auto"), "modalities": (None, ["text"]), "audio": (None,),
    "functions": (None, []), "function_call": (None, "none", "auto"), "best_of": (None, 1),
    "suffix": (None, ""), "echo": (None, False), "reasoning_effort": (None,),
    "prediction": (None,), "web_search_options": (None,),
}  # fmt: skip
AUDIO_FORMATS = ("wav", "mp3")
_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def fail(message: str, param: str) -> RequestError:
    return RequestError(f"{param}: {message}", 400, param)


@dataclass
class Options:
    """A request's generation options (``max_tokens`` None: up to the context's end)."""

    n: int = 1
    stream: bool = False
    include_usage: bool = False
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    schema: dict | None = None  # the JSON schema to follow (json_object: any object)
    json: bool = False  # response_format json_object / json_schema


def _number(obj: dict, key: str, lo: float, hi: float) -> float | None:
    value = obj.pop(key, None)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise fail(f"expected a number, got {type(value).__name__}", key)
    if not lo <= value <= hi:
        raise fail(f"must be between {lo:g} and {hi:g}, got {value}", key)
    return float(value)


def _integer(obj: dict, key: str, lo: int, hi: int | None = None) -> int | None:
    value = obj.pop(key, None)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise fail(f"expected an integer, got {type(value).__name__}", key)
    if value < lo or (hi is not None and value > hi):
        raise fail(f"must be {lo} or more" + (f" and at most {hi}" if hi else "")
                   + f", got {value}", key)  # fmt: skip
    return value


def options(obj: dict[str, Any], chat: bool) -> Options:
    """Pop the generation fields of ``obj`` (a chat or completions body) into ``Options``;
    refuse what is left but the ignorable fields."""
    out = Options()
    stream = obj.pop("stream", None)
    if stream not in (None, True, False):
        raise fail("expected true or false", "stream")
    out.stream = bool(stream)
    stream_options = obj.pop("stream_options", None)
    if stream_options is not None:
        if not isinstance(stream_options, dict) or set(stream_options) - {"include_usage"}:
            raise fail("expected {'include_usage': true | false}", "stream_options")
        if not out.stream:
            raise fail("only with stream: true", "stream_options")
        out.include_usage = bool(stream_options.get("include_usage"))
    out.n = _integer(obj, "n", 1, MAX_N) or 1
    tokens = [(k, _integer(obj, k, 1)) for k in ("max_tokens", "max_completion_tokens")]
    given = [(k, v) for k, v in tokens if v is not None]
    if len(given) == 2 and given[0][1] != given[1][1]:
        raise fail("differs from max_tokens; send one of them", "max_completion_tokens")
    out.max_tokens = given[0][1] if given else None
    temperature = _number(obj, "temperature", 0.0, 2.0)
    out.temperature = 1.0 if temperature is None else temperature
    top_p = _number(obj, "top_p", 0.0, 1.0)
    if top_p == 0:
        raise fail("must be above 0", "top_p")
    out.top_p = 1.0 if top_p is None else top_p
    out.top_k = _integer(obj, "top_k", 0) or 0
    out.seed = _integer(obj, "seed", -(2**63))
    out.stop = _stop(obj.pop("stop", None))
    if chat:
        _response_format(obj.pop("response_format", None), out)
    for key in IGNORED & set(obj):
        obj.pop(key)
    for key, off in OFF.items():
        if key in obj:
            value = obj.pop(key)
            if value not in off:
                raise fail(f"not offered by this server (send {off[-1]!r} or leave it out)",
                           key)  # fmt: skip
    if obj:
        key = sorted(obj)[0]
        raise fail(f"unknown field (unknown: {sorted(obj)})", key)
    return out


def _stop(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(s, str) and s for s in value):
        raise fail("expected a non-empty string or a list of them", "stop")
    if len(value) > MAX_STOP:
        raise fail(f"at most {MAX_STOP} stop strings, got {len(value)}", "stop")
    return tuple(value)


def _response_format(value: Any, out: Options) -> None:
    where = "response_format"
    if value is None:
        return
    if not isinstance(value, dict) or value.get("type") not in ("text", "json_object",
                                                                  "json_schema"):  # fmt: skip
        raise fail("expected {'type': 'text' | 'json_object' | 'json_schema', ...}", where)
    kind = value["type"]
    extra = set(value) - {"type", "json_schema"}
    if extra or (kind != "json_schema" and "json_schema" in value):
        raise fail(f"unexpected field(s) {sorted(extra) or ['json_schema']}", where)
    if kind == "text":
        return
    out.json = True
    if kind == "json_object":
        return
    spec = value.get("json_schema")
    where += ".json_schema"
    if not isinstance(spec, dict):
        raise fail("expected {'name': ..., 'schema': {...}, 'strict': ...}", where)
    unknown = set(spec) - {"name", "schema", "strict", "description"}
    if unknown:
        raise fail(f"unknown field(s) {sorted(unknown)}", where)
    name = spec.get("name")
    if name is not None and (not isinstance(name, str) or not _NAME.match(name)):
        raise fail("letters, digits, _ and -, at most 64", f"{where}.name")
    schema = spec.get("schema", {"type": "object"})
    if not isinstance(schema, dict):
        raise fail("expected a JSON schema object", f"{where}.schema")
    out.schema = schema


# -- messages ------------------------------------------------------------------------------------
@dataclass
class RawPart:
    """A content part before its media are fetched / decoded: ``kind`` text / image / audio."""

    kind: str
    value: Any  # text; an image URL; audio bytes
    where: str


def messages(obj: dict[str, Any]) -> list[tuple[str, list[RawPart], str]]:
    """``messages`` -> (role, parts, where) per message; image URLs are not fetched yet."""
    value = obj.pop("messages", None)
    if not isinstance(value, list) or not value:
        raise fail("expected a non-empty list of messages", "messages")
    out = []
    for i, message in enumerate(value):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise fail("expected an object with 'role' and 'content'", where)
        role = message.get("role")
        if role not in ("system", "developer", "user", "assistant"):
            raise fail(f"role must be system, developer, user or assistant, not {role!r}",
                       f"{where}.role")  # fmt: skip
        unknown = set(message) - {"role", "content", "name", "refusal"}
        if unknown:
            raise fail(f"unsupported field(s) {sorted(unknown)} (no tools here)",
                       f"{where}.{sorted(unknown)[0]}")  # fmt: skip
        out.append((role, _content(message.get("content"), f"{where}.content"), where))
    return out


def _content(content: Any, where: str) -> list[RawPart]:
    if isinstance(content, str):
        return [RawPart("text", content, where)]
    if not isinstance(content, list):
        raise fail("expected a string or a list of parts", where)
    parts = []
    for j, part in enumerate(content):
        at = f"{where}[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            if not isinstance(part.get("text"), str):
                raise fail("expected a string", f"{at}.text")
            parts.append(RawPart("text", part["text"], at))
        elif kind == "image_url":
            image = part.get("image_url")
            url = image.get("url") if isinstance(image, dict) else image
            parts.append(RawPart("image", url, at))
        elif kind == "input_audio":
            parts.append(RawPart("audio", _audio(part.get("input_audio"), f"{at}.input_audio"),
                                 at))  # fmt: skip
        else:
            raise fail("a part is {'type': 'text' | 'image_url' | 'input_audio', ...}", at)
    return parts


def _audio(value: Any, where: str) -> bytes:
    if not isinstance(value, dict) or not isinstance(value.get("data"), str):
        raise fail("expected {'data': <base64>, 'format': 'wav' | 'mp3'}", where)
    if value.get("format") not in AUDIO_FORMATS:
        raise fail(f"expected one of {list(AUDIO_FORMATS)}, got {value.get('format')!r}",
                   f"{where}.format")  # fmt: skip
    try:
        return decode_base64(value["data"], f"{where}.data", Modality.AUDIO)
    except RequestError as err:
        raise RequestError(err.message, 400, f"{where}.data") from None


def prompts(obj: dict[str, Any]) -> list[str]:
    """``/v1/completions``' ``prompt``: a string or a list of strings."""
    value = obj.pop("prompt", None)
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value and all(isinstance(p, str) for p in value):
        return value
    raise fail("expected a string or a non-empty list of strings (token ids are not taken)",
               "prompt")  # fmt: skip


__all__ = ["MAX_N", "MAX_STOP", "Options", "RawPart", "messages", "options", "prompts"]
