"""The short version of ``benchmarks/fuzz.py``: a real ``modalforge serve`` of the tiny classifier
and of the tiny transcriber gets every request of the fixed hostile corpus and a few hundred
schemathesis + hostile-media requests; none may get a response >= 500, and each hostile request
that is certainly a client mistake must get a 4xx. The hostile-media builders are checked to make
what they claim (a header that declares 1 x 1,000,000 pixels does, a 64-channel WAV has 64)."""

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


@pytest.fixture(scope="module", params=["classifier", "transcription"])
def server(request, classifier_bundle, tmp_path_factory):
    if request.param == "classifier":
        bundle, args, env = classifier_bundle, (), {}
    else:
        served = build(request.param, tmp_path_factory.mktemp(request.param))
        bundle, args, env = served.path, served.args, served.env
    log = tmp_path_factory.mktemp("logs") / f"{request.param}.log"
    with fuzz.Server(bundle, args, env, log=log) as s:
        yield request.param, s


def test_every_hostile_request_of_the_corpus_gets_a_4xx(server):
    kind, s = server
    wrong = []
    with httpx.Client(base_url=s.url, timeout=60) as h:
        for item in hm.corpus(kind):
            try:
                r = h.request(**item.request)
            except httpx.HTTPError as err:  # the server hung up, or took over a minute
                wrong.append((item.name, type(err).__name__, str(err)))
                continue
            bad = r.status_code >= 500 or (item.refuse and not 400 <= r.status_code < 500)
            if bad:
                wrong.append((item.name, r.status_code, r.text[:200]))
            elif r.status_code >= 400:
                assert r.json()["error"]["message"], item.name
        assert h.get("/healthz").status_code == 200
    assert s.alive()
    assert not wrong, "\n".join(map(str, wrong))


def test_a_few_hundred_fuzzed_requests_get_no_5xx(server):
    kind, s = server
    n = {"classifier": 300, "transcription": 100}[kind]
    result = fuzz.fuzz_kind(kind, s, n=n, schema_share=0.5, seed=1, rss_every=100)
    assert result["requests"] == n and result["server_alive"]
    assert result["status_by_source"].keys() == {"schemathesis", "hostile"}
    assert not result["transport_errors"], result["transport_errors"]
    five = [(e["count"], e["route"], e["example"], e["exception"], e["frame"])
            for e in result["distinct_5xx"]]  # fmt: skip
    assert result["responses_5xx"] == 0, "\n".join(map(str, five))
    accepted = [(e["name"], e["status"]) for e in result["hostile_accepted_examples"]]
    assert result["hostile_accepted"] == 0, accepted
