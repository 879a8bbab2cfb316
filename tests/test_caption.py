"""Captioning with a tiny CNN: decoding (greedy / beam / sampling), training on a toy set, the
report, the bundle, the CLI, and serving through /v1/caption and OpenAI's chat completions."""

import base64
import json
import math

import pandas as pd
import pytest
import torch

from modalforge.caption import CaptionPredictor, caption_words, detokenize
from modalforge.models import EncoderSpec
from modalforge.models.decoding import DecodeOptions, decode, length_penalty
from modalforge.predictor import FitConfig
from modalforge.train.module import OptimConfig

from .bundles import CAPTIONS, TINY_FROZEN, caption_manifest, caption_predictor
from .conftest import COLORS, png_bytes, shade


class Table:
    """A 'model' whose next-token log-probabilities depend only on the prefix, from a table:
    prefix (tuple of ids after <bos>) -> {token: probability}; ids: 0 pad, 2 bos, 3 eos."""

    def __init__(self, table: dict[tuple, dict[int, float]], vocab: int = 8) -> None:
        self.table, self.vocab = table, vocab

    def start(self, memory: torch.Tensor, bos: int) -> dict[str, torch.Tensor]:
        return {"prefix": torch.full((len(memory), 1), bos)}

    def step(self, memory: torch.Tensor, state: dict[str, torch.Tensor]):
        rows = []
        for p in state["prefix"].tolist():
            probs = torch.full((self.vocab,), 1e-9)
            for token, q in self.table.get(tuple(p[1:]), {3: 1.0}).items():
                probs[token] = q
            rows.append(probs.log())
        return torch.stack(rows), state


def test_beam_search_finds_what_greedy_misses_and_sampling_is_seeded():
    # greedy takes 4 (0.6) then 5 or 6 (0.5 each): 0.30; beam finds 7 (0.4) then eos (1.0)
    table = {(): {4: 0.6, 7: 0.4}, (4,): {5: 0.5, 6: 0.5}, (4, 5): {3: 1.0}, (4, 6): {3: 1.0},
             (7,): {3: 1.0}}  # fmt: skip
    model, memory = Table(table), torch.zeros(2, 1, 1)
    assert decode(model, memory, 2, 3, DecodeOptions("greedy")) == [[4, 5], [4, 5]]
    assert decode(model, memory, 2, 3, DecodeOptions("beam", beam_width=2, length_penalty=0)) == [
        [7],
        [7],
    ]
    # a strong length penalty prefers the longer sequence: log(0.3)/lp(3) > log(0.4)/lp(2)
    assert math.log(0.3) / length_penalty(3, 3.0) > math.log(0.4) / length_penalty(2, 3.0)
    assert decode(model, memory[:1], 2, 3, DecodeOptions("beam", 2, length_penalty=3.0)) == [[4, 5]]
    # sampling: the same seed, the same draws; top_p that keeps one token is greedy
    sampled = [decode(model, torch.zeros(64, 1, 1), 2, 3, DecodeOptions("sample", seed=s))
               for s in (1, 1, 2)]  # fmt: skip
    assert sampled[0] == sampled[1] != sampled[2]
    assert {tuple(r) for r in sampled[0]} <= {(4, 5), (4, 6), (7,)}
    assert len({tuple(r) for r in sampled[0]}) == 3
    # top_p 0.5 keeps only the most likely token at every step: 4, then one of the tied 5 / 6
    nucleus = decode(model, torch.zeros(16, 1, 1), 2, 3, DecodeOptions("sample", top_p=0.5))
    assert len({tuple(r) for r in nucleus}) == 1 and nucleus[0][0] == 4
    with pytest.raises(ValueError, match="top_p"):
        DecodeOptions("sample", top_p=0)
    with pytest.raises(ValueError, match="method"):
        DecodeOptions("nucleus")


def test_caption_words_and_detokenize():
    assert caption_words("Family: Woman, Boy") == ["family", ":", "woman", ",", "boy"]
    assert detokenize(caption_words("face with stuck-out tongue")) == "face with stuck-out tongue"
    assert detokenize(["family", ":", "woman", ",", "boy"]) == "family: woman, boy"


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """60 squares in three colours (shades vary), each captioned by its colour's sentence."""
    return caption_manifest(tmp_path_factory.mktemp("captions"))


@pytest.fixture(scope="module")
def fitted(toy):
    p = caption_predictor(toy)
    p.fit(toy, out_dir=toy.parent / "run", progress=False)
    return p


def test_training_learns_the_captions_and_the_report_scores_them(fitted, toy, tmp_path):
    p = fitted
    assert p.history["best_score"] < 0.5  # val cross-entropy per token
    test = p.test_manifest
    want = [CAPTIONS["rgb"[int(v.split("/")[1].split(".")[0]) % 3]] for v in test.frame["image"]]
    for method in ("greedy", "beam"):
        got = p.caption(test, DecodeOptions(method, max_length=8))
        assert got == want, method
    result = p.evaluate(test, out_dir=tmp_path / "report")
    scores = result["scores"]
    assert set(scores) == {"greedy", "beam 3", "nearest neighbour"}
    assert scores["beam 3"]["bleu4"] == pytest.approx(1.0)
    assert scores["beam 3"]["exact"] == 1.0 and scores["beam 3"]["cider_d"] >= 0
    assert result["reference_words_in_vocabulary"] == 1.0
    for name in ("report.md", "metrics.json", "captions.csv", "captions.png"):
        assert (tmp_path / "report" / name).stat().st_size > 0, name
    assert "| beam 3 | 1.0000" in (tmp_path / "report" / "report.md").read_text()
    assert len(pd.read_csv(tmp_path / "report" / "captions.csv")) == len(test)
    with pytest.raises(ValueError, match="captions"):
        p.predict(test)


def test_a_gru_decoder_trains_the_encoder_end_to_end(toy):
    optim = OptimConfig(lr=3e-3, warmup_ratio=0.0)
    spec = EncoderSpec("cnn", {"widths": (8, 16), "depth": 1, "image_size": 30})  # not frozen
    p = CaptionPredictor("image", "text", spec, decoder="gru", dim=32, dropout=0.0, max_length=8,
                         cache_dir=toy.parent / "cache-gru",
                         fit_config=FitConfig(epochs=6, batch_size=16, patience=10,
                                              optim=optim))  # fmt: skip
    p.fit(toy, out_dir=toy.parent / "run-gru", progress=False)
    logs = pd.read_csv(toy.parent / "run-gru" / "logs" / "metrics.csv")
    val = logs["val_loss"].dropna().to_numpy()
    assert val[-1] < val[0] * 0.7, val
    assert not p.model.encoder("image").frozen


def test_the_bundle_round_trip_and_the_command_line(fitted, toy, tmp_path):
    from typer.testing import CliRunner

    from modalforge.cli import app as cli
    from modalforge.predictor import MultimodalPredictor

    path = fitted.save(tmp_path / "bundle")
    assert {"model.safetensors", "caption_vocab.json", "modalforge.json"} <= {
        f.name for f in path.path.iterdir()
    }
    loaded = MultimodalPredictor.load(path.path)
    assert isinstance(loaded, CaptionPredictor)
    images = [str(toy.parent / "img" / f"{i}.png") for i in range(6)]
    assert loaded.caption(images, root="/") == fitted.caption(images, root="/")
    out = CliRunner().invoke(cli, ["caption", str(path.path), *images[:3], "--json"])
    assert out.exit_code == 0, out.output
    lines = [json.loads(line) for line in out.output.splitlines()]
    assert [x["caption"] for x in lines] == [CAPTIONS[c] for c in "rgb"]
    bad = CliRunner().invoke(cli, ["caption", str(path.path), str(tmp_path / "none.png")])
    assert bad.exit_code == 1 and "no such file" in bad.output


@pytest.fixture(scope="module")
def bundle(fitted, tmp_path_factory):
    return fitted.save(tmp_path_factory.mktemp("caption-bundle") / "captioner").path


def _data_url(color) -> str:
    return "data:image/png;base64," + base64.b64encode(png_bytes((30, 30), color)).decode()


def test_caption_and_chat_routes(bundle):
    import http.server
    import threading

    from fastapi.testclient import TestClient

    from modalforge.serve import Engine, ServeConfig, create_app

    engine = Engine.from_bundle(bundle, device="cpu")
    assert engine.card()["task"] == "caption" and engine.card()["fusion"] is None
    red = base64.b64encode(png_bytes((30, 30), COLORS["r"])).decode()
    image = png_bytes((30, 30), COLORS["g"])
    handler = type("H", (http.server.BaseHTTPRequestHandler,), {
        "do_GET": lambda self: (self.send_response(200), self.end_headers(),
                                self.wfile.write(image)),
        "log_message": lambda *a: None,
    })  # fmt: skip
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    allowed = f"http://127.0.0.1:{server.server_address[1]}/ok/"
    config = ServeConfig(allow_urls=(allowed,), allow_private_urls=True)  # a server on loopback
    try:
        with TestClient(create_app(engine, config)) as c:
            r = c.post("/v1/caption", json={"image": red})
            assert r.status_code == 200, r.text
            assert r.json()["caption"] == CAPTIONS["r"]
            assert c.post("/v1/predict", json={"image": red}).json()["caption"] == CAPTIONS["r"]
            sampled = c.post("/v1/caption", json={"image": red, "temperature": 0.5, "seed": 1})
            assert sampled.json()["decoding"]["method"] == "sample"
            greedy = c.post("/v1/caption", json={"image": red, "method": "greedy"}).json()
            assert greedy["caption"] == CAPTIONS["r"]
            short = c.post("/v1/caption", json={"image": red, "max_tokens": 2}).json()
            assert len(short["caption"].split()) <= 2
            messages = [{"role": "user", "content": [
                {"type": "text", "text": "What is in this picture?"},
                {"type": "image_url", "image_url": {"url": _data_url(COLORS["b"])}}]}]  # fmt: skip
            chat = c.post("/v1/chat/completions", json={"model": engine.name,
                                                        "messages": messages})  # fmt: skip
            assert chat.status_code == 200, chat.text
            body = chat.json()
            assert body["object"] == "chat.completion"
            assert body["choices"][0]["message"] == {"role": "assistant",
                                                     "content": CAPTIONS["b"]}  # fmt: skip
            fetched = [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": allowed + "leaf.png"}}]}]  # fmt: skip
            got = c.post("/v1/chat/completions", json={"messages": fetched, "temperature": 0})
            assert got.json()["choices"][0]["message"]["content"] == CAPTIONS["g"], got.text
            other = [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": "http://127.0.0.1:9/x.png"}}]}]  # fmt: skip
            two = [{"role": "user", "content": [messages[0]["content"][1]] * 2}]
            for bad, status, needle in [
                ({"messages": other}, 422, "not fetched"),
                ({"messages": messages, "stream": True}, 422, "streaming"),
                ({"messages": messages, "n": 2}, 422, "one completion"),
                ({"messages": two}, 422, "2 images"),
                ({"messages": messages, "temperature": -1}, 422, "temperature"),
                ({"messages": messages, "tools": []}, 422, "unsupported"),
                ({"messages": [{"role": "system", "content": "hi"}]}, 422, "role 'user'"),
                ({"messages": messages, "model": "other"}, 404, "not served"),
            ]:
                r = c.post("/v1/chat/completions", json=bad)
                assert r.status_code == status and needle in r.json()["error"]["message"], (
                    bad, r.text)  # fmt: skip
            for bad in ({"beam_width": 0}, {"beam_width": 10**6}, {"seed": -1},
                        {"temperature": 1e300}, {"length_penalty": 1e300}):  # fmt: skip
                r = c.post("/v1/caption", json={"image": red, **bad})
                assert r.status_code == 422 and next(iter(bad)) in r.json()["error"]["message"]
            # the routes set the options; a client's own are checked like any input
            r = c.post("/v1/predict", json={"image": red, "__options__": {"method": "x"}})
            assert r.status_code == 422 and "decoding" in r.json()["error"]["message"], r.text
            r = c.post("/v1/audio/transcriptions", files={"file": ("a.wav", b"RIFF")})
            assert r.status_code == 422 and "speech-to-text" in r.json()["error"]["message"]
            assert c.get("/healthz").status_code == 200  # still alive after every refusal
    finally:
        server.shutdown()


def test_openai_chat_completions_against_a_real_server(bundle):
    openai = pytest.importorskip("openai")
    from .serving import running_server

    with running_server(bundle) as (url, _):
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused")
        name = client.models.list().data[0].id
        reply = client.chat.completions.create(model=name, messages=[{"role": "user", "content": [
            {"type": "text", "text": "Caption this image."},
            {"type": "image_url", "image_url": {"url": _data_url(COLORS["r"])}}]}])  # fmt: skip
        assert reply.choices[0].message.content == CAPTIONS["r"]
        assert reply.choices[0].finish_reason == "stop" and reply.usage.completion_tokens == 4
        sampled = client.chat.completions.create(
            model=name, temperature=0.7, top_p=0.95, max_tokens=8,
            messages=[{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": _data_url(COLORS["g"])}}]}],
        )  # fmt: skip
        assert isinstance(sampled.choices[0].message.content, str)
        with pytest.raises(openai.UnprocessableEntityError, match="not fetched"):
            client.chat.completions.create(model=name, messages=[{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}]}])  # fmt: skip


@pytest.mark.parametrize("decoder", ["transformer", "gru"])
def test_captioners_export_to_onnx_through_the_gate_and_serve(decoder, fitted, toy, tmp_path):
    from fastapi.testclient import TestClient

    from modalforge.bundle import load_bundle
    from modalforge.export import export_bundle
    from modalforge.serve import Engine, ServeConfig, create_app

    p = fitted
    if decoder == "gru":  # a small GRU captioner on the same rows
        optim = OptimConfig(lr=3e-3, warmup_ratio=0.0)
        p = CaptionPredictor("image", "text", TINY_FROZEN, decoder="gru", dim=32, dropout=0.0,
                             max_length=8, cache_dir=toy.parent / "cache",
                             fit_config=FitConfig(epochs=8, batch_size=16, optim=optim))  # fmt: skip
        p.fit(toy, out_dir=tmp_path / "run", progress=False)
    path = p.save(tmp_path / "bundle").path
    info = export_bundle(path, toy)
    parity = info["parity"]
    assert parity["passed"] and parity["max_abs_diff"] <= 1e-3
    assert parity["agreement"] == {"greedy": 1.0, "beam": 1.0}
    roles = {"memory", "step", "start"} if decoder == "gru" else {"memory", "step"}
    assert set(info["caption"]) == roles | {"decoder"}
    assert all((path / f).is_file() for f in load_bundle(path).variants["onnx"]["files"])
    engine = Engine.from_bundle(path, device="cpu", variant="onnx")
    reference = Engine.from_bundle(path, device="cpu")
    red = base64.b64encode(png_bytes((30, 30), COLORS["r"])).decode()
    with (
        TestClient(create_app(engine, ServeConfig())) as c,
        TestClient(create_app(reference, ServeConfig())) as ref,
    ):
        for body in ({"image": red}, {"image": red, "method": "greedy"}):
            got = c.post("/v1/caption", json=body)
            assert got.status_code == 200, got.text
            assert got.json()["caption"] == ref.post("/v1/caption", json=body).json()["caption"]


def test_the_url_allow_list_matches_host_and_resolved_path():
    from modalforge.serve.generation import allowed

    assert allowed("http://127.0.0.1:80/ok/a.png", "http://127.0.0.1:80/ok/")
    assert allowed("https://host/img/x.png", "https://host/img")
    assert not allowed("http://127.0.0.1:80/ok/../secret", "http://127.0.0.1:80/ok/")
    assert not allowed("http://host.evil/a.png", "http://host")
    assert not allowed("https://host/imgs/x.png", "https://host/img")
    assert not allowed("http://host/img/x.png", "https://host/img")
    assert not allowed("file:///etc/passwd", "file:///")


def test_the_train_command_takes_image_and_caption_columns(toy, tmp_path):
    from typer.testing import CliRunner

    from modalforge.cli import app as cli

    run = tmp_path / "run"
    out = CliRunner().invoke(cli, ["train", "--manifest", str(toy), "--image", "image",
                                   "--caption", "text", "--image-encoder", "cnn", "--image-size",
                                   "30", "--decoder", "gru", "--epochs", "2", "--out", str(run)])  # fmt: skip
    assert out.exit_code == 0, out.output
    summary = json.loads((run / "summary.json").read_text())
    # the encoder trains end to end here (not frozen): the baseline reads its features directly
    assert set(summary["scores"]) == {"greedy", "beam 3", "nearest neighbour"}
    assert (run / "bundle" / "caption_vocab.json").is_file()
    assert "bleu4 nearest neighbour" in out.output


def test_two_hostile_requests_among_fourteen_good_captions_change_nothing(bundle):
    from fastapi.testclient import TestClient

    from modalforge.serve import Engine, ServeConfig, create_app

    from .conftest import png_claiming
    from .serving import hostile_mix

    def answer(r):
        body = r.json()
        return body["caption"] if "caption" in body else body["choices"][0]["message"]["content"]

    good = []
    for i, colour in enumerate("rgb" * 5):
        url = _data_url(shade(colour, i))
        if i % 2:
            good.append({"url": "/v1/caption", "json": {"image": url}})
        else:
            content = [{"type": "image_url", "image_url": {"url": url}}]
            good.append({"url": "/v1/chat/completions",
                         "json": {"messages": [{"role": "user", "content": content}]}})  # fmt: skip
    bomb = "data:image/png;base64," + base64.b64encode(png_claiming(1, 50)).decode()
    html = "data:text/html;base64," + base64.b64encode(b"<html></html>").decode()
    hostile = [{"url": "/v1/caption", "json": {"image": bomb}},
               {"url": "/v1/chat/completions", "json": {"messages": [{"role": "user", "content": [
                   {"type": "image_url", "image_url": {"url": html}}]}]}}]  # fmt: skip
    engine = Engine.from_bundle(bundle, device="cpu")
    with TestClient(create_app(engine, ServeConfig(max_batch=16, batch_timeout_ms=200))) as c:
        _, batches = hostile_mix(c, good[:14], hostile, answer)
    assert any(failed and items > failed for items, failed in batches), batches
