"""The HTTP service: every route in-process (TestClient) and against a real uvicorn process on
127.0.0.1, the Python client, the official ``openai`` package, and 200 malformed requests."""

import base64
import concurrent.futures
import io
import json
import signal
import struct
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from modalforge.bundle import load_bundle
from modalforge.client import Client, ServerError
from modalforge.predictor import MultimodalPredictor
from modalforge.serve import Engine, RequestError, ServeConfig, create_app

from .conftest import COLORS, PITCH, WORDS, png_bytes, png_claiming, sine, wav_bytes
from .serving import hostile_mix, running_server, start_server, stop_server, train_toy_bundle


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    """A tiny image + text + audio classifier whose three inputs are all optional."""
    return train_toy_bundle(tmp_path_factory.mktemp("serve"))


@pytest.fixture(scope="module")
def engine(bundle) -> Engine:
    return Engine.from_bundle(bundle, cache_dir=bundle.parent / "cache")


@pytest.fixture
def client(engine):
    with TestClient(create_app(engine, ServeConfig(max_body_mb=1))) as c:
        yield c


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


RED = png_bytes((30, 30), COLORS["r"])
TONE = wav_bytes(sine(PITCH["b"], 0.25))


# -- predict ------------------------------------------------------------------------------------
def test_predict_json_and_multipart_agree_with_the_python_predictor(client, bundle):
    j = client.post(
        "/v1/predict", json={"image": b64(RED), "text": "a red apple", "audio": b64(TONE)}
    )
    assert j.status_code == 200, j.text
    body = j.json()
    assert body["model"] == "toy" and len(body["version"]) == 12
    assert body["label"] in "rgb" and set(body["probabilities"]) == {"r", "g", "b"}
    assert abs(sum(body["probabilities"].values()) - 1) < 1e-5
    assert body["modalities"] == ["audio", "image", "text"]
    assert set(body["contributions"]) == {"audio", "image", "text"}
    assert set(body["fusion_weights"]) == {"audio", "image", "text"}

    m = client.post(
        "/v1/predict",
        files={"image": ("x.png", RED, "image/png"), "audio": ("x.wav", TONE, "audio/wav")},
        data={"text": "a red apple"},
    )
    assert m.status_code == 200 and m.json()["probabilities"] == pytest.approx(
        body["probabilities"], abs=1e-6
    )

    # the server reads inputs exactly as training and `modalforge predict` do
    folder = bundle.parent / "same"
    folder.mkdir(exist_ok=True)
    (folder / "x.png").write_bytes(RED)
    (folder / "x.wav").write_bytes(TONE)
    table = MultimodalPredictor.load(bundle, cache_dir=bundle.parent / "cache").predict(
        [{"image": "x.png", "text": "a red apple", "audio": "x.wav"}], root=folder
    )
    for c in "rgb":
        assert table[f"p:{c}"][0] == pytest.approx(body["probabilities"][c], abs=1e-5)
    for col in ("audio", "image", "text"):
        assert table[f"contribution:{col}"][0] == pytest.approx(
            body["contributions"][col], abs=1e-5
        )


def test_missing_modalities_are_masked_not_refused(client):
    r = client.post("/v1/predict", json={"image": b64(RED)})
    assert r.status_code == 200
    body = r.json()
    assert body["modalities"] == ["image"]
    assert body["contributions"]["text"] is None and body["contributions"]["audio"] is None
    assert body["label"] == "r"  # the colour alone decides this toy task
    data_url = "data:image/png;base64," + b64(RED)
    assert client.post("/v1/predict", json={"image": data_url}).json()["label"] == "r"


def test_batch_equals_single_predictions_and_names_the_bad_item(client):
    items = [{"image": b64(RED)}, {"text": "a green leaf"}, {"audio": b64(TONE), "text": "sea"}]
    r = client.post("/v1/predict/batch", json={"inputs": items})
    assert r.status_code == 200
    batch = r.json()["predictions"]
    for item, got in zip(items, batch, strict=True):
        one = client.post("/v1/predict", json=item).json()
        assert got["probabilities"] == pytest.approx(one["probabilities"], abs=1e-5)
    bad = client.post("/v1/predict/batch", json={"inputs": [items[0], {"image": "%%%"}]})
    assert bad.status_code == 422 and bad.json()["error"]["param"] == "inputs[1].image"
    assert "invalid base64" in bad.json()["error"]["message"]
    for body in ({"inputs": []}, {"inputs": {}}, {"rows": [items[0]]}, [items[0]]):
        r = client.post("/v1/predict/batch", json=body)
        assert r.status_code == 422, body


# -- describe and operate -------------------------------------------------------------------------
def test_models_health_ready_metrics_docs_and_playground(client, bundle):
    models = client.get("/v1/models").json()
    assert models["object"] == "list" and len(models["data"]) == 1
    card = models["data"][0]
    assert card["id"] == "toy" and card["object"] == "model" and card["owned_by"] == "modalforge"
    assert card["labels"] == ["b", "g", "r"] and card["task"] == "classification"
    assert {c["name"]: c["required"] for c in card["inputs"]} == {
        "audio": False,
        "image": False,
        "text": False,
    }
    assert card["metrics"] == load_bundle(bundle).metrics  # the bundle's, as saved
    assert set(card["metrics"]) == {"val_accuracy"} and 0 < card["metrics"]["val_accuracy"] <= 1
    assert client.get("/v1/models/toy").json()["id"] == "toy"
    assert client.get("/v1/models/other").status_code == 404

    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").json()["status"] == "ready"

    client.post("/v1/predict", json={"text": "red"})
    client.post("/v1/predict", content=b"x", headers={"content-type": "text/plain"})
    text = client.get("/metrics").text
    for name in (
        "modalforge_requests_total",
        "modalforge_request_seconds_bucket",
        "modalforge_batch_size_bucket",
        "modalforge_queue_depth",
        "modalforge_errors_total",
        "modalforge_batches_total",
    ):
        assert name in text, name
    assert 'modalforge_requests_total{route="/v1/predict",status="415"} 1.0' in text

    spec = client.get("/openapi.json").json()
    body = spec["paths"]["/v1/predict"]["post"]["requestBody"]["content"]
    assert set(body) == {"application/json", "multipart/form-data"}
    assert set(body["application/json"]["schema"]["properties"]) == {"audio", "image", "text"}
    assert client.get("/docs").status_code == 200
    page = client.get("/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]


def test_api_key(engine):
    with TestClient(create_app(engine, ServeConfig(api_key="s3cret"))) as c:
        r = c.get("/v1/models")
        assert r.status_code == 401 and "API key" in r.json()["error"]["message"]
        assert c.get("/v1/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert c.get("/v1/models", headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert c.get("/v1/models", headers={"X-API-Key": "s3cret"}).status_code == 200
        assert c.post("/v1/predict", json={"text": "x"}).status_code == 401
        assert c.get("/healthz").status_code == 200 and c.get("/").status_code == 200


@pytest.mark.parametrize(
    ("body", "headers", "status", "words"),
    [
        (b"", {"content-type": "application/json"}, 400, "empty body"),
        (b"{", {"content-type": "application/json"}, 400, "invalid JSON"),
        (b'{"text": "\xff"}', {"content-type": "application/json"}, 400, "not valid UTF-8"),
        (b'"just a string"', {"content-type": "application/json"}, 422, "JSON object"),
        (b"text=hi", {"content-type": "application/x-www-form-urlencoded"}, 415, "content type"),
        (b"hi", {}, 415, "content type"),
        (b'{"colour": "red"}', {"content-type": "application/json"}, 422, "unknown field"),
        (b'{"image": 12}', {"content-type": "application/json"}, 422, "base64"),
        (
            b'{"image": "http://example.com/x.png"}',
            {"content-type": "application/json"},
            422,
            "not fetched",
        ),
        (b'{"text": ["a"]}', {"content-type": "application/json"}, 422, "expected a string"),
        (b"{}", {"content-type": "application/json"}, 422, "no inputs"),
        (b"--x\r\nno headers\r\n", {"content-type": "multipart/form-data"}, 400, "boundary"),
        (b"garbage", {"content-type": "multipart/form-data; boundary=x"}, 400, "multipart"),
        (
            b"{}",
            {"content-type": "application/json", "content-length": "abc"},
            400,
            "Content-Length",
        ),
    ],
)
def test_bad_requests_get_a_4xx_that_names_the_problem(client, body, headers, status, words):
    r = client.post("/v1/predict", content=body, headers=headers)
    assert r.status_code == status, r.text
    assert words in r.json()["error"]["message"]


def wav_declaring(channels: int = 1, bits: int = 16, rate: int = 16_000) -> bytes:
    """A RIFF/WAVE PCM file whose fmt chunk says what it is told, with 0.1 s of silence."""
    align = max(1, channels * bits // 8)
    data = bytes(1600 * align)
    fmt = struct.pack("<HHIIHH", 1, channels, rate, rate * align % 2**32, align, bits)
    chunks = b"fmt " + struct.pack("<I", len(fmt)) + fmt + b"data" + struct.pack("<I", len(data))
    return b"RIFF" + struct.pack("<I", 4 + len(chunks) + len(data)) + b"WAVE" + chunks + data


def data_url(mime: str, data: bytes) -> str:
    return f"data:{mime};base64,{b64(data)}"


# what a hostile client sent and got a 500 for (or a 200 where it should be refused)
HOSTILE_FIELDS = [
    ({"image": data_url("text/html", b"<html><script>x</script></html>")}, 415, "text/html"),
    ({"image": data_url("image/png", b"<html></html>")}, 422, "its bytes are"),
    ({"image": data_url("audio/wav", wav_declaring())}, 422, "takes image"),
    ({"audio": data_url("audio/wav", RED)}, 422, "image bytes"),
    ({"image": b64(png_claiming(1, 1_000_000))}, 422, "aspect ratio"),
    ({"image": b64(png_claiming(1, 50))}, 422, "needs 200 bytes of pixel data"),
    ({"image": b64(png_claiming(50_000, 50_000))}, 422, "too large"),
    ({"audio": b64(wav_declaring(channels=64))}, 422, "64 channels"),
    ({"audio": b64(wav_declaring(bits=3))}, 422, "3-bit"),
    ({"audio": b64(wav_declaring(rate=0))}, 422, "sample rate of 0 Hz"),
    ({"audio": b64(wav_declaring(rate=4_000_000_000))}, 422, "sample rate"),
]


@pytest.mark.parametrize(("fields", "status", "words"), HOSTILE_FIELDS)
def test_hostile_media_is_refused_with_the_field_named(client, fields, status, words):
    r = client.post("/v1/predict", json={**fields, "text": "a red apple"})
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert words in error["message"] and error["param"] == next(iter(fields)), error


def test_an_image_strip_is_refused_fast_and_a_long_one_is_cropped_before_scaling(client):
    r = client.post("/v1/predict", files={"image": ("t.png", tall_png(1, 300_000), "image/png")})
    assert r.status_code == 422 and "aspect ratio" in r.json()["error"]["message"], r.text
    wide = client.post("/v1/predict", files={"image": ("w.png", tall_png(90, 3), "image/png")})
    assert wide.status_code == 200, wide.text


@pytest.mark.parametrize(
    ("body", "words"),
    [
        (b'{"text": 1' + b"0" * 5000 + b"}", "over the limit of 64"),
        (b'{"text": "a", "x": ' + b"[" * 10_000 + b"]" * 10_000 + b"}", "nested too deeply"),
        (b'{"text": "a", "x": ' + b'{"a":' * 40 + b"1" + b"}" * 40 + b"}", "nested too deeply"),
        (b'{"text": "\\ud800 red"}', "lone UTF-16 surrogate"),
        (b'{"text": "a", "x": NaN}', "no NaN"),
        (b'{"text": "a", "x": 1e999}', "out of range"),
    ],
)
def test_json_limits_are_a_400_that_names_the_limit(client, body, words):
    r = client.post("/v1/predict", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    assert words in r.json()["error"]["message"]


def test_a_server_fault_is_a_500_with_a_request_id_logged_and_counted(engine, monkeypatch, caplog):
    with TestClient(create_app(engine, ServeConfig()), raise_server_exceptions=False) as c:
        ok = c.post("/v1/predict", json={"text": "a red apple"}, headers={"x-request-id": "abc-1"})
        assert ok.headers["x-request-id"] == "abc-1"
        fresh = c.post("/v1/predict", json={"text": "x"}, headers={"x-request-id": "no spaces!"})
        assert len(fresh.headers["x-request-id"]) == 16  # a forged id is replaced

        def broken(samples):
            raise RuntimeError("a bug")

        monkeypatch.setattr(engine.adapter, "predict", broken)
        with caplog.at_level("ERROR", logger="modalforge.serve"):
            r = c.post("/v1/predict", json={"text": "a red apple"})
        rid = r.headers["x-request-id"]
        assert r.status_code == 500 and r.json()["error"]["type"] == "server_error"
        assert rid in r.json()["error"]["message"]
        assert any(rid in rec.getMessage() and rec.exc_info for rec in caplog.records)
        metrics = c.get("/metrics").text
    assert 'kind="server_error"' in metrics and 'status="500"' in metrics


def test_body_limit_413(client):
    big = b"0" * (2 * 2**20)
    r = client.post("/v1/predict", content=big, headers={"content-type": "application/json"})
    assert r.status_code == 413 and "over the limit" in r.json()["error"]["message"]
    assert client.get("/healthz").status_code == 200


def test_backpressure_429_and_timeout_504(engine):
    def slow(requests):
        time.sleep(0.3)
        return engine.handle(requests)

    with TestClient(create_app(engine, ServeConfig(max_queue=2, max_batch=1))) as c:
        c.app.state.batcher.fn = slow
        with concurrent.futures.ThreadPoolExecutor(6) as pool:
            codes = list(pool.map(lambda _: c.post("/v1/predict", json={"text": "x"}), range(6)))
        statuses = sorted(r.status_code for r in codes)
        assert 200 in statuses and 429 in statuses and set(statuses) <= {200, 429}
        busy = next(r for r in codes if r.status_code == 429)
        assert int(busy.headers["Retry-After"]) >= 1 and "busy" in busy.json()["error"]["message"]
    with TestClient(create_app(engine, ServeConfig(request_timeout_s=0.05))) as c:
        c.app.state.batcher.fn = slow
        r = c.post("/v1/predict", json={"text": "x"})
        assert r.status_code == 504 and "no result within" in r.json()["error"]["message"]


# -- a real server ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def server(bundle):
    """`modalforge serve` in its own process on 127.0.0.1."""
    with running_server(bundle, "--max-body-mb", "1") as running:
        yield running


def test_every_route_over_real_http(server):
    url, _ = server
    with httpx.Client(base_url=url, timeout=30) as h:
        assert h.get("/healthz").json() == {"status": "ok"}
        assert h.get("/readyz").status_code == 200
        assert h.get("/v1/models").json()["data"][0]["id"] == "toy"
        assert h.get("/v1/models/toy").status_code == 200
        r = h.post("/v1/predict", files={"image": ("r.png", RED, "image/png")})
        assert r.status_code == 200 and r.json()["label"] == "r"
        r = h.post("/v1/predict", json={"image": b64(RED), "audio": b64(TONE)})
        assert r.status_code == 200
        r = h.post("/v1/predict/batch", json={"inputs": [{"image": b64(RED)}] * 5})
        assert [p["label"] for p in r.json()["predictions"]] == ["r"] * 5
        assert "modalforge_batches_total" in h.get("/metrics").text
        assert h.get("/openapi.json").status_code == 200 and h.get("/docs").status_code == 200
        assert "<html" in h.get("/").text.lower()
        assert h.get("/nope").status_code == 404


def test_python_client(server, tmp_path):
    url, _ = server
    (tmp_path / "r.png").write_bytes(RED)
    with Client(url) as c:
        assert c.health() and c.ready()
        assert c.models()[0]["id"] == "toy"
        red_tone = wav_bytes(sine(PITCH["r"], 0.25))
        one = c.predict(image=tmp_path / "r.png", text="a red apple", audio=red_tone)
        assert one["label"] == "r" and one["modalities"] == ["audio", "image", "text"]
        assert c.predict(text="a blue sea")["modalities"] == ["text"]
        many = c.predict_batch([{"image": tmp_path / "r.png"}, {"text": "green leaf"}])
        assert len(many) == 2 and many[0]["label"] == "r"
        with pytest.raises(ServerError) as info:
            c.predict(image=b"not a png")
        assert info.value.status == 422 and info.value.param == "image"
        with pytest.raises(ValueError, match="no tabular input"):
            c.predict(tabular=1.0)


def test_openai_package_lists_the_model(server):
    openai = pytest.importorskip("openai")
    url, _ = server
    models = openai.OpenAI(base_url=f"{url}/v1", api_key="unused").models.list()
    assert [m.id for m in models.data] == ["toy"]
    assert models.data[0].owned_by == "modalforge"


def lying_wav() -> bytes:
    data = bytearray(wav_bytes(sine(440, 0.2)))
    i = data.index(b"data")
    data[i + 4 : i + 8] = (10**9).to_bytes(4, "little")
    return bytes(data)


def malformed_requests() -> list[tuple[str, dict]]:
    """(what, httpx request kwargs) — every kind the serving issue names, and a few more."""
    js = {"content-type": "application/json"}
    return [
        ("truncated png", {"files": {"image": ("t.png", RED[: len(RED) // 2], "image/png")}}),
        ("truncated png b64", {"json": {"image": b64(RED[:40])}}),
        ("wrong content type", {"content": b"image=1", "headers": {"content-type": "text/csv"}}),
        ("no content type", {"content": b"{}"}),
        ("invalid base64", {"json": {"image": "@@@not base64@@@"}}),
        ("empty body", {"content": b"", "headers": js}),
        ("over the limit", {"content": b"x" * (1 * 2**20 + 10), "headers": js}),
        (
            "50k x 50k header",
            {"files": {"image": ("big.png", png_claiming(50_000, 50_000), "image/png")}},
        ),
        ("non-utf-8 text", {"files": {"text": ("t.txt", "café".encode("latin-1"), "text/plain")}}),
        ("non-utf-8 json", {"content": b'{"text": "caf\xe9"}', "headers": js}),
        ("lying wav", {"files": {"audio": ("a.wav", lying_wav(), "audio/wav")}}),
        ("unknown fields", {"json": {"image": b64(RED), "colour": "red"}}),
        ("unknown multipart field", {"files": {"photo": ("r.png", RED, "image/png")}}),
        ("not an image", {"files": {"image": ("x.png", b"GIF89a" + b"\0" * 20, "image/png")}}),
        ("audio that is text", {"json": {"audio": b64(b"hello, I am not audio")}}),
        ("wrong json type", {"json": [1, 2, 3]}),
        ("broken json", {"content": b'{"text": ', "headers": js}),
        (
            "bad boundary",
            {
                "content": b"--zz\r\n\r\n",
                "headers": {"content-type": "multipart/form-data; boundary=qq"},
            },
        ),
        (
            "duplicate field",
            {
                "content": b'--b\r\nContent-Disposition: form-data; name="text"\r\n\r\na\r\n--b\r\nContent-Disposition: form-data; name="text"\r\n\r\nb\r\n--b--\r\n',
                "headers": {"content-type": "multipart/form-data; boundary=b"},
            },
        ),
        ("blank text only", {"json": {"text": "   "}}),
    ]


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def test_200_malformed_requests_get_4xx_and_the_server_stays_up_with_flat_memory(server):
    url, proc = server
    cases = malformed_requests()
    answers = {}
    with httpx.Client(base_url=url, timeout=30) as h:

        def send_all(rounds: int) -> None:
            for _ in range(rounds):
                for what, kwargs in cases:
                    r = h.post("/v1/predict", **kwargs)
                    answers.setdefault(what, set()).add(
                        (r.status_code, r.json()["error"]["message"])
                    )

        send_all(2)  # warm-up: first-use allocations are not a leak
        before = rss_kb(proc.pid)
        send_all(10)  # 10 x 20 = 200 malformed requests
        after = rss_kb(proc.pid)
        assert h.get("/healthz").status_code == 200
        ok = h.post("/v1/predict", files={"image": ("r.png", RED, "image/png")})
        assert ok.status_code == 200 and ok.json()["label"] == "r"
    assert proc.poll() is None
    for what, seen in answers.items():
        assert all(400 <= code < 500 for code, _ in seen), (what, seen)
    expected = {
        "truncated png": "image",
        "invalid base64": "base64",
        "empty body": "empty",
        "over the limit": "limit",
        "50k x 50k header": "too large",
        "non-utf-8 text": "UTF-8",
        "lying wav": "lies about its length",
        "unknown fields": "colour",
        "wrong content type": "content type",
    }
    for what, words in expected.items():
        assert all(words in message for _, message in answers[what]), (what, answers[what])
    assert after - before < 20_000, f"RSS grew {after - before} kB over 200 malformed requests"


def test_sigterm_finishes_requests_in_flight(bundle):
    url, proc = start_server(bundle)
    try:
        # a request still uploading when SIGTERM arrives: half the body, the signal, the rest
        data = json.dumps({"inputs": [{"image": b64(RED)}, {"audio": b64(TONE)}] * 4}).encode()
        half_sent, go_on = threading.Event(), threading.Event()

        def body():
            yield data[: len(data) // 2]
            half_sent.set()
            go_on.wait(10)
            yield data[len(data) // 2 :]

        headers = {"content-type": "application/json", "content-length": str(len(data))}
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            pending = pool.submit(
                httpx.post, f"{url}/v1/predict/batch", content=body(), headers=headers, timeout=60
            )
            assert half_sent.wait(10)
            time.sleep(0.2)
            proc.send_signal(signal.SIGTERM)
            time.sleep(0.5)
            assert proc.poll() is None  # still draining
            go_on.set()
            r = pending.result()
        assert r.status_code == 200 and len(r.json()["predictions"]) == 8
        # uvicorn re-raises the signal once it has shut down cleanly
        assert proc.wait(timeout=30) in (0, -signal.SIGTERM)
        assert b"Traceback" not in proc.stdout.read()
    finally:
        stop_server(proc)


def test_engine_tuning_keeps_features(engine):
    tuning = engine.tune(max_batch=8)
    assert tuning["image"]["chunk_size"] in (1, 2, 4, 8)
    images = [engine.decode({"image": png_bytes((30, 30), (i * 20, 0, 0))}) for i in range(11)]
    feats, _ = engine.features(images)
    one_by_one = np.concatenate([engine.features([s])[0]["image"].numpy() for s in images])
    np.testing.assert_allclose(feats["image"].numpy(), one_by_one, atol=1e-5)


def test_engine_handle_decodes_in_the_batch_and_isolates_bad_requests(engine):
    seen = []
    out = engine.handle([{"image": RED}, {"image": b"broken"}, {"text": "a blue sea"}], seen.append)
    assert out[0]["label"] == "r" and out[2]["modalities"] == ["text"]
    assert isinstance(out[1], RequestError) and out[1].param == "image"
    assert len(seen) == 2 and all(s >= 0 for s in seen)


def tall_png(width: int, height: int) -> bytes:
    """A real, decodable PNG of width x height (a few kB: rows of one colour compress well)."""
    buf = io.BytesIO()
    Image.new("RGB", (width, height), (200, 40, 40)).save(buf, format="PNG")
    return buf.getvalue()


def classifier_requests():
    """14 good /v1/predict requests (JSON and multipart, every input mix) and 2 hostile ones."""
    good = []
    for i, colour in enumerate(["r", "g", "b"] * 5):
        image = png_bytes((30, 30), COLORS[colour])
        words = f"a {WORDS[colour]} {i}"
        if i % 3 == 0:
            good.append({"url": "/v1/predict", "json": {"image": b64(image), "text": words}})
        elif i % 3 == 1:
            good.append({"url": "/v1/predict", "files": {"image": ("x.png", image, "image/png")},
                         "data": {"text": words}})  # fmt: skip
        else:
            tone = wav_bytes(sine(PITCH[colour], 0.25 + 0.01 * i))
            good.append({"url": "/v1/predict", "json": {"audio": b64(tone), "text": words}})
    hostile = [
        {"url": "/v1/predict", "json": {"image": b64(png_claiming(1, 1_000_000)), "text": "x"}},
        {"url": "/v1/predict", "files": {"image": ("t.png", tall_png(1, 300_000), "image/png")}},
    ]
    return good[:14], hostile


@pytest.mark.parametrize("route", ["/v1/predict", "/v1/predict/batch"])
def test_two_hostile_requests_among_fourteen_good_ones_change_nothing(engine, route):
    good, hostile = classifier_requests()
    if route == "/v1/predict/batch":  # the same samples as one-item batches, the JSON ones
        good = [{"url": route, "json": {"inputs": [r["json"]]}} for r in good if "json" in r]
        good += [{"url": route, "json": {"inputs": [{"text": f"a red apple {i}"}]}}
                 for i in range(14 - len(good))]  # fmt: skip
        hostile = [{"url": route, "json": {"inputs": [r["json"]]}} for r in hostile[:1]]
        lone_surrogate = b'{"inputs": [{"text": "\\ud800"}]}'
        hostile.append({"url": route, "content": lone_surrogate,
                        "headers": {"content-type": "application/json"}})  # fmt: skip
    config = ServeConfig(max_batch=16, batch_timeout_ms=200)
    with TestClient(create_app(engine, config)) as c:
        _, batches = hostile_mix(c, good, hostile)
    # the hostile requests were decoded in the same batches as good ones
    assert any(failed and items > failed for items, failed in batches), batches


def test_a_sample_that_breaks_the_batched_forward_fails_alone(engine, monkeypatch):
    """A forward that raises for one sample (here: out of memory on the text "boom") is
    retried on halves of its batch: that request gets a 413, the others their own answers."""
    predict = engine.adapter.predict

    def fragile(samples):
        if any(s.values.get("text") == "boom" for s in samples):
            raise MemoryError
        return predict(samples)

    good, _ = classifier_requests()
    config = ServeConfig(max_batch=16, batch_timeout_ms=200)
    with TestClient(create_app(engine, config)) as c:
        monkeypatch.setattr(engine.adapter, "predict", fragile)
        boom = {"url": "/v1/predict", "json": {"text": "boom"}}
        (bad,), batches = hostile_mix(c, good, [boom])
    assert bad.status_code == 413 and "out of memory" in bad.json()["error"]["message"]
    assert any(items > 1 and failed == 1 for items, failed in batches), batches


def test_two_inference_workers(engine):
    with TestClient(create_app(engine, ServeConfig(workers=2, max_batch=2))) as c:
        bodies = [{"image": b64(RED), "text": f"a red apple {i}"} for i in range(12)]
        with concurrent.futures.ThreadPoolExecutor(6) as pool:
            answers = list(pool.map(lambda b: c.post("/v1/predict", json=b), bodies))
        assert [a.status_code for a in answers] == [200] * 12
        assert {a.json()["label"] for a in answers} == {"r"}


def test_media_limits_are_set_at_serve_time(engine):
    config = ServeConfig(max_image_pixels=500, max_audio_seconds=0.2)
    with TestClient(create_app(engine, config)) as c:
        r = c.post("/v1/predict", json={"image": b64(RED)})
        assert r.status_code == 422 and "over the limit of 500" in r.text, r.text
        r = c.post("/v1/predict", json={"audio": b64(wav_bytes(sine(440, 0.5)))})
        assert r.status_code == 422 and "over the limit of 0.2 s" in r.text, r.text
        assert c.post("/v1/predict", json={"audio": b64(wav_bytes(sine(440, 0.1)))}).is_success
    with TestClient(create_app(engine, ServeConfig(max_image_pixels=40_000_000))) as c:
        assert c.post("/v1/predict", json={"image": b64(RED)}).status_code == 200


def test_a_server_fault_keeps_the_keep_alive_connection_open(engine, monkeypatch):
    """uvicorn drops the connection of a request whose exception reaches it; the Gate stops a
    fault that has been answered, so the next request on the same socket (another client's,
    behind a proxy) is answered too."""
    import socket

    import uvicorn

    from .serving import free_port

    def broken(samples):
        if any(s.values.get("text") == "bug" for s in samples):
            raise RuntimeError("a bug")
        return predict(samples)

    predict = engine.adapter.predict
    monkeypatch.setattr(engine.adapter, "predict", broken)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(engine), port=port, log_level="critical"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 60
        while not server.started and time.monotonic() < deadline:
            time.sleep(0.05)

        def request(sock, text: str) -> bytes:
            body = json.dumps({"text": text}).encode()
            sock.sendall(b"POST /v1/predict HTTP/1.1\r\nhost: x\r\ncontent-type: application/json"
                         b"\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body))  # fmt: skip
            head = b""
            while b"\r\n\r\n" not in head:
                chunk = sock.recv(65536)
                assert chunk, f"the server closed the connection after {head!r}"
                head += chunk
            top, _, rest = head.partition(b"\r\n\r\n")
            length = int(next(line.split(b":")[1] for line in top.split(b"\r\n")
                              if line.lower().startswith(b"content-length")))  # fmt: skip
            while len(rest) < length:
                rest += sock.recv(65536)
            return top.split(b"\r\n")[0] + b" " + rest

        with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
            assert b" 500 " in request(sock, "bug")
            answer = request(sock, "a red apple")
            assert b" 200 " in answer and b'"label"' in answer, answer
    finally:
        server.should_exit = True
        thread.join(30)
