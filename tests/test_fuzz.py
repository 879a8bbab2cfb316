"""The short version of ``benchmarks/fuzz.py``: a real ``modalforge serve`` of the tiny classifier
gets every request of the fixed hostile corpus and 300 schemathesis + hostile-media requests (and
the tiny transcriber, in-process, its corpus); none may get a response >= 500, and each hostile
request that is certainly a client mistake must get a 4xx. The hostile-media builders are checked
to make what they claim (a header that declares 1 x 1,000,000 pixels does, a 64-channel WAV has
64 channels)."""

from __future__ import annotations

import io
import sys
from pathlib import Path

import httpx
import pytest
import soundfile as sf
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import fuzz
import hostile_media as hm

from .bundles import build


def test_hostile_builders_make_what_they_claim(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)  # read the bombs' headers here
    assert Image.open(io.BytesIO(hm.png_claiming(1, 1_000_000))).size == (1, 1_000_000)
    assert Image.open(io.BytesIO(hm.jpeg_claiming(65535, 65535))).size == (65535, 65535)
    webp = hm.webp_claiming(2**24, 2**24)  # libwebp will not open it: read the VP8X canvas
    assert webp[:4] == b"RIFF" and webp[8:16] == b"WEBPVP8X"
    assert (
        int.from_bytes(webp[24:27], "little") + 1
        == 2**24
        == int.from_bytes(webp[27:30], "little") + 1
    )
    for channels, bits in ((64, 16), (1, 3)):
        info = sf.info(io.BytesIO(hm.wav_header(channels=channels, bits=bits, frames=100)))
        assert info.channels == channels and info.frames == 100, info
    raw = hm.raw_json({"a": hm.HOLE}, '"\\ud800"')
    assert raw == b'{"a": "\\ud800"}'
    body, headers = hm.multipart([("text", None, None, b"a"), ("text", None, None, b"b")])
    assert body.count(b'name="text"') == 2 and "boundary=mfz" in headers["content-type"]
    for kind in hm.KINDS:  # every kind has a corpus, each request names its route
        found = hm.corpus(kind)
        assert len(found) > 30 and all(h.request["url"].startswith("/v1/") for h in found)
        assert len({h.name for h in found}) == len(found), kind


@pytest.fixture(scope="module")
def server(classifier_bundle, tmp_path_factory):
    with fuzz.Server(classifier_bundle, log=tmp_path_factory.mktemp("logs") / "server.log") as s:
        yield s


def check_corpus(kind: str, h) -> list[tuple]:
    """Every request of ``kind``'s corpus through ``h`` (an httpx-style client) -> the wrong
    answers: a 5xx, a hang-up, or anything but a 4xx where the request must be refused."""
    wrong = []
    for item in hm.corpus(kind):
        try:
            r = h.request(**item.request)
        except httpx.HTTPError as err:  # the server hung up, or took over a minute
            wrong.append((item.name, type(err).__name__, str(err)))
            continue
        if r.status_code >= 500 or (item.refuse and not 400 <= r.status_code < 500):
            wrong.append((item.name, r.status_code, r.text[:200]))
        elif r.status_code >= 400:
            assert r.json()["error"]["message"], item.name
    assert h.get("/healthz").status_code == 200
    return wrong


def test_every_hostile_request_of_the_corpus_gets_a_4xx(server):
    with httpx.Client(base_url=server.url, timeout=60) as h:
        wrong = check_corpus("classifier", h)
    assert server.alive()
    assert not wrong, "\n".join(map(str, wrong))


def test_the_transcription_corpus_in_process(tmp_path):
    """The speech route parses its own multipart (a ``file`` part): its corpus, in-process (a
    tiny random Whisper loads in a second; a server process would take ten more)."""
    from fastapi.testclient import TestClient

    from modalforge.serve import Engine, ServeConfig, create_app

    engine = Engine.from_bundle(build("transcription", tmp_path).path, device="cpu")
    with TestClient(create_app(engine, ServeConfig()), raise_server_exceptions=False) as h:
        wrong = check_corpus("transcription", h)
    assert not wrong, "\n".join(map(str, wrong))


def test_a_few_hundred_fuzzed_requests_get_no_5xx(server):
    result = fuzz.fuzz_kind("classifier", server, n=300, schema_share=0.5, seed=1, rss_every=100)
    assert result["requests"] == 300 and result["server_alive"]
    assert result["status_by_source"].keys() == {"schemathesis", "hostile"}
    assert not result["transport_errors"], result["transport_errors"]
    five = [(e["count"], e["route"], e["example"], e["exception"], e["frame"])
            for e in result["distinct_5xx"]]  # fmt: skip
    assert result["responses_5xx"] == 0, "\n".join(map(str, five))
    accepted = [(e["name"], e["status"]) for e in result["hostile_accepted_examples"]]
    assert result["hostile_accepted"] == 0, accepted
