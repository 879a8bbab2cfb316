"""Contrastive alignment with tiny towers: the loss, the clamped temperature, training on a toy
set, evaluation, and the bundle round trip."""

import math

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from modalforge.contrastive import ContrastivePredictor, parse_pairs
from modalforge.models import EncoderSpec
from modalforge.models.contrastive import (
    ContrastiveConfig,
    build_contrastive,
    clip_loss,
    contrastive_loss,
)
from modalforge.predictor import MultimodalPredictor
from modalforge.train.module import ContrastiveModule, OptimConfig

from .bundles import contrastive_manifest, contrastive_predictor
from .conftest import COLORS, WORDS, png_bytes, shade

TINY = {
    "image": EncoderSpec("cnn", {"widths": (8, 16), "image_size": 30}),
    "text": EncoderSpec("bag_of_embeddings", {"embed_dim": 16}),
    "audio": EncoderSpec("audio_cnn", {"n_mels": 32, "channels": (8, 16), "output_dim": 16}),
}
# built without a manifest: the word vocabulary's size given
DIRECT = {**TINY, "text": EncoderSpec("bag_of_embeddings", {"embed_dim": 16, "vocab_size": 40})}


def test_clip_loss_is_symmetric_infonce():
    a = F.normalize(torch.randn(6, 8), dim=-1)
    b = F.normalize(torch.randn(6, 8), dim=-1)
    scale = torch.tensor(10.0)
    logits = 10.0 * a @ b.T
    want = 0
    for i in range(6):  # -log softmax of the matching column, over rows and over columns
        want -= torch.log_softmax(logits[i], 0)[i] / 12
        want -= torch.log_softmax(logits[:, i], 0)[i] / 12
    assert clip_loss(a, b, scale).item() == pytest.approx(want.item(), rel=1e-5)
    assert clip_loss(a, a, torch.tensor(100.0)).item() < 1e-3  # aligned: nothing to learn


def test_pairs_use_only_rows_with_both_columns():
    config = ContrastiveConfig(inputs=dict(DIRECT), pairs=[("image", "text"), ("audio", "text")])
    model = build_contrastive(config)
    e = {c: F.normalize(torch.randn(4, 256), dim=-1) for c in ("audio", "image", "text")}
    out = type("Out", (), {"embeddings": e, "scale": torch.tensor(14.0)})()
    mask = {"image": torch.tensor([1, 1, 0, 1]), "text": torch.tensor([1, 1, 1, 0]),
            "audio": torch.tensor([0, 0, 0, 1])}  # fmt: skip
    got = contrastive_loss(out, config.pairs, mask)  # audio:text has 0 rows with both: skipped
    assert got.item() == pytest.approx(clip_loss(e["image"][:2], e["text"][:2], out.scale).item())
    assert model.scale.item() == pytest.approx(1 / 0.07, rel=1e-5)


def test_temperature_stays_clamped():
    config = ContrastiveConfig(inputs=dict(DIRECT), pairs=[("image", "text")], max_logit_scale=20.0)
    model = build_contrastive(config)
    module = ContrastiveModule(model, OptimConfig())
    with torch.no_grad():
        model.logit_scale.fill_(10.0)  # exp(10) = 22026: far above the cap
    assert model.scale.item() == pytest.approx(20.0)  # the forward never sees more
    module.on_train_batch_end(None, None, 0)  # after each optimizer step
    assert model.logit_scale.item() == pytest.approx(math.log(20.0))
    with torch.no_grad():
        model.logit_scale.fill_(-3.0)
    module.on_train_batch_end(None, None, 0)
    assert model.logit_scale.item() == 0.0  # temperature at most 1


def test_bad_pairs_are_refused():
    with pytest.raises(ValueError, match="A:B"):
        parse_pairs("image-text")
    with pytest.raises(ValueError, match="two different input columns"):
        ContrastiveConfig(inputs=dict(TINY), pairs=[("image", "image")])
    with pytest.raises(ValueError, match="at least one pair"):
        parse_pairs("")


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """60 rows: a coloured square, its colour's words, a tone of its colour's pitch; the colour's
    words ("red apple") as the zero-shot label too."""
    return contrastive_manifest(tmp_path_factory.mktemp("clip"))


@pytest.fixture(scope="module")
def fitted(toy):
    p = contrastive_predictor(toy)
    before = _loss(p, toy, fresh=True)
    p.fit(toy, out_dir=toy.parent / "run", progress=False)
    return p, before


def _loss(p: ContrastivePredictor, manifest, fresh: bool = False) -> float:
    """The mean InfoNCE over both pairs on all rows, with the predictor's current towers."""
    if fresh:  # what fit() would start from
        p.schema = p._resolve_schema(p._manifest(manifest))
        p._build(p._input_specs(p._manifest(manifest)))
        p._mark_vocabularies()
    e = {c: torch.from_numpy(p.embed(manifest, c)[0]) for c in ("image", "text", "audio")}
    scale = p.model.scale.detach()
    return float(sum(clip_loss(e[a], e[b], scale) for a, b in p.pairs) / 2)


def test_training_lowers_the_loss_and_aligns_the_towers(fitted, toy):
    p, before = fitted
    after = _loss(p, toy)
    assert after < before - 0.3, (before, after)
    # the word-level toy tower knows no "an emoji of": the bare class name is the prompt (what
    # the images were aligned with, so this checks the plumbing; emoji measure the real thing)
    result = p.evaluate(toy, zero_shot=["colour"], templates=("{}",))
    # three colours: the right one of three words / pictures is near-certain after training
    assert result["retrieval"]["image→text"]["recall@1"] > 0.9
    assert result["retrieval"]["text→image"]["recall@1"] > 0.9
    assert result["zero_shot"]["image→colour"]["accuracy"] > 0.9
    assert result["zero_shot"]["audio→colour"]["classes"] == 3
    # audio and image were never paired: aligned through the text they share (every toy row is
    # its own item, so check the colour of each sound's nearest picture rather than R@1)
    assert result["retrieval"]["audio→image"]["trained_pair"] is False
    audio, image = p.embed(toy, "audio")[0], p.embed(toy, "image")[0]
    colour = pd.read_csv(toy)["colour"].to_numpy()
    assert (colour[(audio @ image.T).argmax(1)] == colour).mean() > 0.9
    assert 0 < result["temperature"] <= 1


def test_the_bundle_round_trip_gives_the_same_embeddings(fitted, toy, tmp_path):
    p, _ = fitted
    p.save(tmp_path / "bundle")
    loaded = MultimodalPredictor.load(tmp_path / "bundle")
    assert isinstance(loaded, ContrastivePredictor) and loaded.pairs == p.pairs
    for column in ("image", "text", "audio"):
        np.testing.assert_allclose(loaded.embed(toy, column)[0], p.embed(toy, column)[0],
                                   atol=1e-5)  # fmt: skip
    with pytest.raises(ValueError, match="embeds"):
        loaded.predict(toy)
    vectors, present = loaded.embed(["red", "blue"], "text")
    assert vectors.shape == (2, 32) and present.all()
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-5)


def test_evaluate_writes_the_report_with_a_retrieval_grid(fitted, toy, tmp_path):
    p, _ = fitted
    result = p.evaluate(toy, out_dir=tmp_path)
    report = (tmp_path / "report.md").read_text()
    assert "image→text" in report and "Zero-shot" in report
    grid = tmp_path / "retrieval-text-image.png"
    assert grid.stat().st_size > 20_000 and f"({grid.name})" in report
    assert result["headline"]["image→text R@1"] == result["retrieval"]["image→text"]["recall@1"]


@pytest.fixture(scope="module")
def served(fitted, tmp_path_factory):
    p, _ = fitted
    path = tmp_path_factory.mktemp("clip-bundle") / "clip"
    p.save(path)
    return p, path


def test_embeddings_route_speaks_openai(served):
    import base64

    from fastapi.testclient import TestClient

    from modalforge.serve import Engine, ServeConfig, create_app

    p, path = served
    engine = Engine.from_bundle(path, device="cpu")
    assert engine.card()["embedding_dim"] == 32 and engine.card()["pairs"] == [
        "image:text",
        "audio:text",
    ]
    red = png_bytes((30, 30), COLORS["r"])
    url = "data:image/png;base64," + base64.b64encode(red).decode()
    with TestClient(create_app(engine, ServeConfig())) as c:
        r = c.post("/v1/embeddings", json={"model": engine.name, "input": ["red", url]})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["object"] == "list" and [d["index"] for d in body["data"]] == [0, 1]
        want_text = p.embed(["red"], "text")[0][0]
        want_image = p.embed(pd.DataFrame({"image": [red]}).assign(image=[None]), "image")
        assert np.allclose(body["data"][0]["embedding"], want_text, atol=1e-5)
        assert want_image[1].sum() == 0  # (a missing image embeds to zeros)
        b64 = c.post("/v1/embeddings", json={"input": "red", "encoding_format": "base64"}).json()
        vector = np.frombuffer(base64.b64decode(b64["data"][0]["embedding"]), dtype="<f4")
        assert np.allclose(vector, want_text, atol=1e-5)
        image_vec = np.asarray(body["data"][1]["embedding"])
        assert np.linalg.norm(image_vec) == pytest.approx(1, abs=1e-4)
        # the image is nearer its own colour's words than the others'
        words = {w: c.post("/v1/embeddings", json={"input": w}).json()["data"][0]["embedding"]
                 for w in ("red apple", "green leaf", "blue sea")}  # fmt: skip
        assert max(words, key=lambda w: float(np.dot(words[w], image_vec))) == "red apple"
        for bad, status, needle in [
            ({"input": "http://example.com/x.png"}, 422, "not fetched"),
            ({"input": []}, 422, "list of 1"),
            ({"input": "red", "encoding_format": "int8"}, 422, "encoding_format"),
            ({"input": "red", "dimensions": 8}, 422, "32"),
            ({"input": "red", "extra": 1}, 422, "unknown field"),
            ({"input": ["red", "data:video/mp4;base64,AAAA"]}, 422, "input[1]"),
            ({"model": "other", "input": "red"}, 404, "not served"),
        ]:
            r = c.post("/v1/embeddings", json=bad)
            assert r.status_code == status and needle in r.json()["error"]["message"], (bad, r.text)


def test_a_classifier_refuses_embeddings(tmp_path):
    from fastapi.testclient import TestClient

    from modalforge.serve import Engine, ServeConfig, create_app

    from .serving import train_toy_bundle

    engine = Engine.from_bundle(train_toy_bundle(tmp_path, inputs=("text",)), device="cpu")
    with TestClient(create_app(engine, ServeConfig())) as c:
        r = c.post("/v1/embeddings", json={"input": "red"})
        assert r.status_code == 422 and "contrastive" in r.json()["error"]["message"]


def test_openai_package_embeds_through_a_real_server(served, toy, tmp_path):
    import base64

    import httpx
    from typer.testing import CliRunner

    from modalforge.cli import app as cli

    openai = pytest.importorskip("openai")
    from .serving import running_server

    p, path = served
    want = p.embed(["red apple", "blue sea"], "text")[0]
    built = CliRunner().invoke(cli, ["index", "build", str(path), "--manifest", str(toy),
                                     "--out", str(tmp_path / "idx")])  # fmt: skip
    assert built.exit_code == 0, built.output
    with running_server(path, "--index", str(tmp_path / "idx")) as (url, _):
        # the index `index build` wrote is served beside the bundle that built it
        hits = httpx.post(f"{url}/v1/search", json={"query": "green leaf", "k": 3}).json()
        assert {h["metadata"]["colour"] for h in hits["data"]} == {"green leaf"}, hits
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused")
        name = client.models.list().data[0].id
        got = client.embeddings.create(model=name, input=["red apple", "blue sea"],
                                       encoding_format="float")  # fmt: skip
        assert [d.index for d in got.data] == [0, 1]
        np.testing.assert_allclose([d.embedding for d in got.data], want, atol=1e-5)
        # asked for explicitly, base64 comes back as the string the server sent
        raw = client.embeddings.create(model=name, input="blue sea", encoding_format="base64")
        vector = np.frombuffer(base64.b64decode(raw.data[0].embedding), dtype="<f4")
        np.testing.assert_allclose(vector, want[1], atol=1e-5)
        # by default the package asks for base64 and decodes it itself
        default = client.embeddings.create(model=name, input="red apple")
        np.testing.assert_allclose(default.data[0].embedding, want[0], atol=1e-5)


def test_index_build_and_search_from_the_command_line(served, toy, tmp_path):
    import json

    from typer.testing import CliRunner

    from modalforge.cli import app as cli

    _, path = served
    run = CliRunner().invoke
    built = run(cli, ["index", "build", str(path), "--manifest", str(toy), "--out",
                      str(tmp_path / "idx"), "--dtype", "float16"])  # fmt: skip
    assert built.exit_code == 0, built.output
    meta = json.loads((tmp_path / "idx" / "index.json").read_text())
    assert meta["count"] == 60 and meta["info"]["column"] == "image"
    hits = run(cli, ["search", str(path), str(tmp_path / "idx"), "--text", "blue sea", "-k", "5",
                     "--json"])  # fmt: skip
    assert hits.exit_code == 0, hits.output
    found = json.loads(hits.output)
    assert len(found) == 5 and {h["metadata"]["colour"] for h in found} == {"blue sea"}
    assert found[0]["score"] >= found[-1]["score"]
    by_image = run(cli, ["search", str(path), str(tmp_path / "idx"), "--image",
                         str(toy.parent / "img" / "1.png"), "-k", "1", "--json"])  # fmt: skip
    assert json.loads(by_image.output)[0]["metadata"]["colour"] == "green leaf"  # row 1: green
    both = run(cli, ["search", str(path), str(tmp_path / "idx"), "--text", "x", "--image", "y"])
    assert both.exit_code == 1 and "exactly one" in both.output
    no_tower = run(cli, ["index", "build", str(path), "--manifest", str(toy), "--out",
                         str(tmp_path / "idx2"), "--column", "colour"])  # fmt: skip
    assert no_tower.exit_code == 1 and "towers" in no_tower.output


def test_search_route_answers_from_an_index_of_this_bundle(served, toy):
    import base64

    from fastapi.testclient import TestClient

    from modalforge.data.manifest import read_manifest
    from modalforge.index import EmbeddingIndex
    from modalforge.serve import Engine, ServeConfig, create_app

    p, path = served
    rows = read_manifest(toy)
    vectors, _ = p.embed(rows, "image", progress=False)
    meta = [{"colour": c} for c in rows.frame["colour"]]
    ids = [str(i) for i in range(len(meta))]
    engine = Engine.from_bundle(path, device="cpu")
    info = {"column": "image", "model_version": engine.version}
    index = EmbeddingIndex(ids, vectors, meta, info=info)
    with TestClient(create_app(engine, ServeConfig(), index=index)) as c:
        assert c.get("/v1/models").json()["data"][0]["index"]["size"] == 60
        r = c.post("/v1/search", json={"query": "blue sea", "k": 5})
        assert r.status_code == 200, r.text
        hits = r.json()["data"]
        assert [h["rank"] for h in hits] == [1, 2, 3, 4, 5]
        assert {h["metadata"]["colour"] for h in hits} == {"blue sea"}
        want = index.search(p.embed(["blue sea"], "text")[0][0], k=5)[0]
        assert [h["id"] for h in hits] == [w.id for w in want]
        # an image query finds its own row first; a raw vector gives the same answer
        image = (toy.parent / "img" / "4.png").read_bytes()
        url = "data:image/png;base64," + base64.b64encode(image).decode()
        own = c.post("/v1/search", json={"query": url, "k": 1}).json()["data"][0]
        assert own["id"] == "4" and own["score"] == pytest.approx(1, abs=1e-4)
        by_vector = c.post("/v1/search", json={"embedding": vectors[4].tolist(), "k": 1})
        assert by_vector.json()["data"][0]["id"] == "4"
        for bad, needle in [
            ({"query": "red", "k": 0}, "k is"),
            ({"query": "red", "embedding": [0.0] * 32}, "exactly one"),
            ({"embedding": [1.0] * 3}, "32 finite"),
            ({"query": "red", "extra": 1}, "unknown field"),
            ({"query": "ftp://x/y.png"}, "not fetched"),
        ]:
            r = c.post("/v1/search", json=bad)
            assert r.status_code == 422 and needle in r.json()["error"]["message"], (bad, r.text)
    with TestClient(create_app(engine, ServeConfig())) as c:
        r = c.post("/v1/search", json={"query": "red"})
        assert r.status_code == 404 and "--index" in r.json()["error"]["message"]
    stale = EmbeddingIndex(ids, vectors, meta, info={"model_version": "0123456789ab"})
    with pytest.raises(ValueError, match="rebuild"):
        create_app(engine, ServeConfig(), index=stale)


def test_towers_export_to_onnx_through_the_gate_and_serve(served, toy):
    from fastapi.testclient import TestClient

    from modalforge.bundle import load_bundle
    from modalforge.data.manifest import read_manifest
    from modalforge.export import export_bundle
    from modalforge.serve import Engine, ServeConfig, create_app

    _, path = served
    rows = read_manifest(toy)
    info = export_bundle(path, rows, name="onnx")
    assert info["parity"]["passed"] and info["parity"]["max_abs_logit_diff"] < 1e-4
    assert set(info["projections"]) == {"audio", "image", "text"} and "head" not in info
    assert load_bundle(path).variants["onnx"]["projections"]["text"]["file"].startswith("onnx/")
    reference = Engine.from_bundle(path, device="cpu")
    variant = Engine.from_bundle(path, device="cpu", variant="onnx")
    with TestClient(create_app(variant, ServeConfig())) as c:
        got = c.post("/v1/embeddings", json={"input": ["blue sea", "red apple"]}).json()
    want = reference.handle([{"text": "blue sea"}, {"text": "red apple"}])
    for d, w in zip(got["data"], want, strict=True):
        np.testing.assert_allclose(d["embedding"], w["embeddings"]["text"], atol=1e-5)
    with pytest.raises(ValueError, match="not offered yet"):
        export_bundle(path, rows, name="int8", quantize="int8")


def test_two_hostile_requests_among_fourteen_good_ones_change_no_embedding_or_hit(served, toy):
    import base64

    from fastapi.testclient import TestClient

    from modalforge.data.manifest import read_manifest
    from modalforge.index import EmbeddingIndex
    from modalforge.serve import Engine, ServeConfig, create_app

    from .conftest import png_claiming
    from .serving import hostile_mix

    p, path = served
    rows = read_manifest(toy)
    vectors, _ = p.embed(rows, "image", progress=False)
    engine = Engine.from_bundle(path, device="cpu")
    index = EmbeddingIndex([str(i) for i in range(len(rows.frame))], vectors,
                           info={"column": "image", "model_version": engine.version})  # fmt: skip

    def data_url(data: bytes, mime: str = "image/png") -> str:
        return f"data:{mime};base64," + base64.b64encode(data).decode()

    good = []
    for i in range(7):
        c = "rgb"[i % 3]
        image = data_url(png_bytes((30, 30), shade(c, i)))
        good.append({"url": "/v1/embeddings", "json": {"input": [f"{WORDS[c]} {i}", image]}})
        good.append({"url": "/v1/search", "json": {"query": f"{WORDS[c]} {i}", "k": 3}})
    hostile = [
        {"url": "/v1/embeddings", "json": {"input": ["red", data_url(png_claiming(1, 10**6))]}},
        {"url": "/v1/search", "json": {"query": data_url(b"<html></html>", "text/html")}},
    ]
    config = ServeConfig(max_batch=16, batch_timeout_ms=200)
    with TestClient(create_app(engine, config, index=index)) as c:
        _, batches = hostile_mix(c, good, hostile)
    assert any(failed and items > failed for items, failed in batches), batches
