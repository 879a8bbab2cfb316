"""Serving a chat LLM bundle: the official ``openai`` client against a real ``modalforge serve``
(chat completions with image and audio parts, streamed and not, n, stop, seeds, JSON grammars,
legacy completions, usage and the prefix cache, refusals), a client that leaves mid-stream, and
``modalforge chat``. One tiny bundle (a random 2-layer Gemma, stage 1 only) for the module.

The server runs with ``MODALFORGE_LLM_QUANTIZE=none``: fp32 decoding gives the same tokens
batched or alone, so a choice of ``n=2`` can be compared with the same seed asked alone."""

from __future__ import annotations

import base64
import json
import re
import time

import httpx
import pytest

from tests.bundles import chat_bundle
from tests.serving import running_server
from tests.tiny_llm import tiny_tokenizer

openai = pytest.importorskip("openai")

SCHEMA = {"type": "object", "properties": {"ok": {"type": "boolean"},
                                           "colour": {"enum": ["red", "green", "blue"]}},
          "required": ["ok", "colour"], "additionalProperties": False}  # fmt: skip


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return chat_bundle(tmp_path_factory.mktemp("chatserve"))


@pytest.fixture(scope="module")
def server(bundle):
    mp = pytest.MonkeyPatch()
    mp.setenv("MODALFORGE_LLM_QUANTIZE", "none")
    try:
        with running_server(bundle, "--name", "bundle") as (url, _):
            yield url
    finally:
        mp.undo()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0)


def data_url(path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def audio_part(path) -> dict:
    return {
        "type": "input_audio",
        "input_audio": {"data": base64.b64encode(path.read_bytes()).decode(), "format": "wav"},
    }


def image_part(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


def conversation(bundle) -> list[dict]:
    """System, a user turn with an image, the model's answer, a user turn with a clip."""
    root = bundle.parent
    return [
        {"role": "developer", "content": "answer with a colour"},
        {"role": "user", "content": [image_part(data_url(root / "red.png")),
                                     {"type": "text", "text": "what is this?"}]},
        {"role": "assistant", "content": "red"},
        {"role": "user", "content": [{"type": "text", "text": "and this?"},
                                     audio_part(root / "green.wav")]},
    ]  # fmt: skip


def greedy(client, messages, **kw):
    return client.chat.completions.create(model="bundle", messages=messages, temperature=0, **kw)


def test_the_card_describes_the_llm(server):
    card = httpx.get(f"{server}/v1/models").json()["data"][0]
    assert card["task"] == "chat" and card["labels"] == []
    assert card["llm"]["quantize"] is None and len(card["llm"]["sha256"]) == 12
    assert (card["image_tokens"], card["audio_tokens"], card["max_context"]) == (4, 2, 512)
    assert [i["name"] for i in card["inputs"]] == ["image", "audio"]


def test_multiturn_with_image_and_audio_and_the_prefix_cache(client, bundle):
    messages = conversation(bundle)
    first = greedy(client, messages, max_tokens=6)
    choice = first.choices[0]
    assert choice.finish_reason in ("stop", "length") and choice.message.role == "assistant"
    u = first.usage
    assert u.total_tokens == u.prompt_tokens + u.completion_tokens
    # 1 bos + image (4) + audio (2) + turn markup and text: well over the media alone
    assert u.prompt_tokens > 4 + 2 + 10
    again = greedy(client, messages, max_tokens=6)
    assert again.choices[0].message.content == choice.message.content  # greedy: the same
    cached = again.usage.prompt_tokens_details.cached_tokens
    assert 0 < cached < again.usage.prompt_tokens  # the whole prompt but its last token


def test_max_tokens_ends_with_length(client, bundle):
    long = greedy(client, conversation(bundle), max_tokens=40)
    if long.choices[0].finish_reason != "length":
        pytest.skip("the random model stops on its own before 40 tokens here")
    for field in ("max_tokens", "max_completion_tokens"):
        r = greedy(client, conversation(bundle), **{field: 3})
        assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 3


def test_streaming_gives_the_same_answer_in_chunks(client, bundle):
    messages = conversation(bundle)
    whole = greedy(client, messages, max_tokens=12)
    chunks = list(greedy(client, messages, max_tokens=12, stream=True,
                         stream_options={"include_usage": True}))  # fmt: skip
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finals = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finals[-1] == whole.choices[0].finish_reason and set(finals[:-1]) == {None}
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == (
        whole.usage.completion_tokens
    )
    assert len({c.id for c in chunks}) == 1


def test_stop_cuts_the_answer_before_the_stop_string(client, bundle):
    text = greedy(client, conversation(bundle), max_tokens=30).choices[0].message.content
    k = next((i for i, ch in enumerate(text) if i > 0 and ch.strip() and ch != "\ufffd"
              and ch not in text[:i]), None)  # fmt: skip
    if k is None:
        pytest.skip(f"no usable stop character in {text!r}")
    cut = greedy(client, conversation(bundle), max_tokens=30, stop=[text[k], "\x00never"])
    assert cut.choices[0].message.content == text[:k] and cut.choices[0].finish_reason == "stop"


def test_n_choices_each_with_its_seed(client, bundle):
    messages = conversation(bundle)
    two = client.chat.completions.create(model="bundle", messages=messages, n=2, seed=7,
                                         temperature=1.0, max_tokens=8)  # fmt: skip
    assert [c.index for c in two.choices] == [0, 1]
    again = client.chat.completions.create(model="bundle", messages=messages, n=2, seed=7,
                                           temperature=1.0, max_tokens=8)  # fmt: skip
    assert [c.message.content for c in again.choices] == [c.message.content for c in two.choices]
    alone = client.chat.completions.create(model="bundle", messages=messages, seed=8,
                                           temperature=1.0, max_tokens=8)  # fmt: skip
    assert alone.choices[0].message.content == two.choices[1].message.content  # seed + 1
    u = two.usage  # the prompt once, both choices' tokens
    assert u.prompt_tokens == alone.usage.prompt_tokens and 2 <= u.completion_tokens <= 16


def test_json_schema_and_json_object_outputs_parse(client, bundle):
    jsonschema = pytest.importorskip("jsonschema")
    messages = conversation(bundle)
    fmt = {"type": "json_schema", "json_schema": {"name": "answer", "schema": SCHEMA,
                                                  "strict": True}}  # fmt: skip
    for seed in (0, 1):
        r = client.chat.completions.create(model="bundle", messages=messages, seed=seed,
                                           max_tokens=120, response_format=fmt)  # fmt: skip
        assert r.choices[0].finish_reason == "stop"
        jsonschema.validate(json.loads(r.choices[0].message.content), SCHEMA)
    r = greedy(client, messages, max_tokens=150, response_format={"type": "json_object"})
    if r.choices[0].finish_reason == "stop":  # a random model may write a long object
        assert isinstance(json.loads(r.choices[0].message.content), dict)
    else:
        assert r.choices[0].message.content.lstrip().startswith("{")


def test_completions_take_raw_text(client):
    r = client.completions.create(model="bundle", prompt=["the cat", "a dog sat"], max_tokens=3,
                                  temperature=0)  # fmt: skip
    assert [c.index for c in r.choices] == [0, 1]
    assert 2 <= r.usage.completion_tokens <= 6
    assert all(c.finish_reason in ("stop", "length") for c in r.choices)
    one = client.completions.create(model="bundle", prompt="the cat", max_tokens=3, temperature=0)
    assert one.choices[0].text == r.choices[0].text
    streamed = "".join(
        c.choices[0].text
        for c in client.completions.create(
            model="bundle", prompt="the cat", max_tokens=3, temperature=0, stream=True
        )
        if c.choices
    )
    assert streamed == one.choices[0].text  # fmt: skip
    assert one.usage.prompt_tokens == 1 + len(
        tiny_tokenizer()("the cat", add_special_tokens=False)["input_ids"]
    )
    with pytest.raises(openai.BadRequestError, match="echo"):
        client.completions.create(model="bundle", prompt="x", max_tokens=2, echo=True)


@pytest.mark.parametrize(
    ("change", "where"),
    [
        (lambda m: m[1]["content"].__setitem__(0, image_part("data:image/png;base64,AAAA")),
         r"messages\[1\]\.content\[0\]\.image_url\.url"),
        (lambda m: m[3]["content"].append(m[1]["content"][0]),
         r"messages\[3\]\.content\[2\]\.image_url\.url: this model reads one image"),
        (lambda m: m[3]["content"].append({"type": "input_audio", "input_audio": {
            "data": "QUJD", "format": "flac"}}), r"messages\[3\]\.content\[2\]\.input_audio"),
        (lambda m: m[1]["content"].__setitem__(0, image_part("https://example.com/a.png")),
         r"messages\[1\]\.content\[0\]\.image_url\.url: URLs are not fetched"),
        (lambda m: m.__setitem__(2, {"role": "tool", "content": "x"}), r"messages\[2\]\.role"),
    ],
)  # fmt: skip
def test_bad_messages_are_400s_naming_the_part(client, bundle, change, where):
    messages = conversation(bundle)
    change(messages)
    with pytest.raises(openai.BadRequestError, match=where):
        greedy(client, messages, max_tokens=2)


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"frobnicate": 1}, "frobnicate"),
        ({"response_format": {"type": "json_schema", "json_schema": {
            "name": "x", "schema": {"type": "object", "properties": {"a": {"type": "nope"}}}}}},
         "response_format.json_schema.schema"),
        ({"logprobs": True}, "logprobs"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"n": 0}, "n"),
        ({"temperature": 3}, "temperature"),
    ],
)  # fmt: skip
def test_bad_fields_are_400s_naming_the_field(server, bundle, extra, param):
    body = {"model": "bundle", "messages": conversation(bundle), "max_tokens": 2, **extra}
    r = httpx.post(f"{server}/v1/chat/completions", json=body, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


def test_harmless_openai_fields_are_ignored(server, bundle):
    body = {"model": "bundle", "messages": conversation(bundle), "max_tokens": 2, "user": "u",
            "metadata": {"a": "b"}, "store": False, "logprobs": False, "frequency_penalty": 0,
            "presence_penalty": 0, "temperature": 0}  # fmt: skip
    r = httpx.post(f"{server}/v1/chat/completions", json=body, timeout=30)
    assert r.status_code == 200, r.text


def _metric(server: str, name: str) -> float:
    text = httpx.get(f"{server}/metrics", timeout=10).text
    return float(re.search(rf"^{name} (\S+)$", text, re.M).group(1))


def test_a_client_leaving_mid_stream_frees_its_slot(server, bundle):
    body = {"model": "bundle", "prompt": "the cat sat on the mat", "max_tokens": 400,
            "temperature": 0}  # fmt: skip
    whole = httpx.post(f"{server}/v1/completions", json=body, timeout=60).json()
    if whole["choices"][0]["finish_reason"] != "length":
        pytest.skip("the random model stops on its own here")
    free = _metric(server, "modalforge_llm_free_slots")
    cancelled = _metric(server, "modalforge_llm_cancelled_total")
    with httpx.stream("POST", f"{server}/v1/completions", json={**body, "stream": True},
                      timeout=60) as r:  # fmt: skip
        lines = r.iter_lines()
        assert next(line for line in lines if line.startswith("data:"))
    deadline = time.monotonic() + 10
    while _metric(server, "modalforge_llm_cancelled_total") == cancelled:
        assert time.monotonic() < deadline, "the generation was not cancelled"
        time.sleep(0.05)
    while _metric(server, "modalforge_llm_free_slots") < free:
        assert time.monotonic() < deadline, "the slot was not freed"
        time.sleep(0.05)
    assert _metric(server, "modalforge_llm_active") == 0


def test_completions_are_refused_for_other_bundles():
    from types import SimpleNamespace

    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from modalforge.errors import RequestError
    from modalforge.serve.routes import mount_all

    engine = SimpleNamespace(can=lambda capability: False, name="toy", task="classification",
                             inputs=[])  # fmt: skip
    app = FastAPI()
    mount_all(app, SimpleNamespace(engine=engine, columns={}, index=None))
    with TestClient(app) as c, pytest.raises(RequestError, match="chat LLM bundle"):
        c.post("/v1/completions", json={"prompt": "x"})
    with TestClient(app) as c, pytest.raises(RequestError, match="captioning bundle"):
        c.post("/v1/chat/completions", json={"messages": []})  # the old refusal, unchanged


def test_quantize_setting():
    import torch

    from modalforge.tasks.chat.serving import quantize_setting

    mp = pytest.MonkeyPatch()
    try:
        mp.delenv("MODALFORGE_LLM_QUANTIZE", raising=False)
        assert quantize_setting(torch.device("cpu")) == "int8"
        assert quantize_setting(torch.device("cuda")) is None
        mp.setenv("MODALFORGE_LLM_QUANTIZE", "none")
        assert quantize_setting(torch.device("cpu")) is None
        mp.setenv("MODALFORGE_LLM_QUANTIZE", "fp4")
        with pytest.raises(ValueError, match="int8 or none"):
            quantize_setting(torch.device("cpu"))
    finally:
        mp.undo()


def test_chat_command_prints_the_servers_answer(client, bundle, monkeypatch):
    from typer.testing import CliRunner

    from modalforge.cli import app

    image = bundle.parent / "red.png"
    served = greedy(
        client,
        [
            {
                "role": "user",
                "content": [image_part(data_url(image)), {"type": "text", "text": "what is this?"}],
            }
        ],
        max_tokens=8,
    )
    monkeypatch.setenv("MODALFORGE_LLM_QUANTIZE", "none")
    monkeypatch.setenv("MODALFORGE_CACHE", str(bundle.parent / "mfcache"))
    result = CliRunner().invoke(app, ["chat", str(bundle), "--image", str(image),
                                      "--max-tokens", "8", "what is this?"])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == served.choices[0].message.content.strip()  # stderr apart
    result = CliRunner().invoke(app, ["chat", str(bundle), "--image", "nope.png", "hi"])
    assert result.exit_code == 1 and "no such file" in result.output


def test_two_hostile_requests_among_fourteen_good_chats_change_no_answer(bundle, monkeypatch):
    """In-process: 14 greedy chats (image, audio, text, multi-turn) decoded together with two
    requests that must fail (an image whose pixel data is cut short, an HTML data: URL) give
    the answers they give alone; the two get 4xx."""
    from fastapi.testclient import TestClient

    from modalforge.serve import Engine, ServeConfig, create_app
    from tests.conftest import png_claiming
    from tests.serving import hostile_mix

    monkeypatch.setenv("MODALFORGE_LLM_QUANTIZE", "none")
    root = bundle.parent
    turns = conversation(bundle)
    contents = [
        [image_part(data_url(root / "red.png")), {"type": "text", "text": "what is this?"}],
        [audio_part(root / "green.wav"), {"type": "text", "text": "said?"}],
        [image_part(data_url(root / "green.png")), {"type": "text", "text": "what?"}],
        "say a colour",
    ]
    good = []
    for i in range(14):
        messages = turns if i % 5 == 4 else [{"role": "user", "content": contents[i % 4]}]
        good.append({"url": "/v1/chat/completions",
                     "json": {"messages": messages, "temperature": 0, "max_tokens": 6 + i % 3}})  # fmt: skip
    cut = "data:image/png;base64," + base64.b64encode(png_claiming(1, 50)).decode()
    html = "data:text/html;base64," + base64.b64encode(b"<html></html>").decode()
    hostile = [{"url": "/v1/chat/completions", "json": {"messages": [{"role": "user",
                "content": [image_part(url), {"type": "text", "text": "what?"}]}]}}
               for url in (cut, html)]  # fmt: skip
    engine = Engine.from_bundle(bundle)
    answer = lambda r: r.json()["choices"][0]["message"]["content"]  # noqa: E731
    with TestClient(create_app(engine, ServeConfig())) as c:
        bad, _ = hostile_mix(c, good, hostile, answer)
    assert "pixel data" in bad[0].json()["error"]["message"]
    assert "text/html" in bad[1].json()["error"]["message"]
