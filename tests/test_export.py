"""ONNX export of whole models: every fusion's head with every modality pattern, a bundle's
variant end to end (parity gate, missing inputs, serving), and a broken variant refused."""

import copy
import itertools
import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from modalforge.bundle import load_bundle
from modalforge.cli import app as cli
from modalforge.data.manifest import read_manifest
from modalforge.export import GATES, SCHEMES, ParityGateError, export_bundle
from modalforge.export.onnx import export_head, head_input_names
from modalforge.export.runtime import session
from modalforge.fusion import list_fusions
from modalforge.models import EncoderSpec, ModelConfig, build_model
from modalforge.serve import Engine, ServeConfig, create_app

from .conftest import COLORS, png_bytes
from .serving import running_server, train_toy_bundle

HEAD_INPUTS = {
    "image": EncoderSpec("cnn", {"widths": (8, 16), "image_size": 30}),
    "tabular": EncoderSpec("tabular_mlp", {"n_features": 3}),
    "text": EncoderSpec("bag_of_embeddings", {"embed_dim": 16, "vocab_size": 40}),
}


@pytest.mark.parametrize("fusion", [f.name for f in list_fusions()])
def test_every_fusion_head_exports_with_every_presence_pattern(fusion, tmp_path):
    config = ModelConfig(task="classification", inputs=HEAD_INPUTS, num_outputs=4,
                         fusion=fusion, hidden=16)  # fmt: skip
    model = build_model(config).eval()
    info = export_head(model, tmp_path / "head.onnx")
    sess = session(tmp_path / "head.onnx")
    columns = model.columns
    patterns = list(itertools.product([True, False], repeat=len(columns)))  # incl. all missing
    n = len(patterns)
    gen = torch.Generator().manual_seed(0)
    feats = {c: torch.randn(n, model.encoder(c).output_dim, generator=gen) for c in columns}
    mask = {c: torch.tensor([p[i] for p in patterns]) for i, c in enumerate(columns)}
    feeds = {}
    for name, c in zip(info["inputs"][::2], columns, strict=True):
        feeds[name] = feats[c].numpy()
        feeds[f"mask.{c}"] = mask[c].numpy()
    got = sess.run(None, feeds)
    with torch.no_grad():
        want = model({}, mask, features=feats)
    np.testing.assert_allclose(got[0], want.outputs.numpy(), rtol=1e-4, atol=1e-4)
    if want.weights is not None:
        np.testing.assert_allclose(got[1], want.weights.numpy(), rtol=1e-4, atol=1e-4)
    assert info["inputs"] == head_input_names(columns)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return train_toy_bundle(tmp_path_factory.mktemp("export"))


@pytest.fixture(scope="module")
def exported(bundle):
    manifest = read_manifest(bundle.parent / "manifest.csv")
    info = export_bundle(bundle, manifest, label="label")
    return bundle, info


def test_export_adds_a_checked_onnx_variant(exported):
    bundle, info = exported
    assert info["parity"]["passed"] and info["opset"] >= 18
    loaded = load_bundle(bundle)  # verifies every file's hash, the new ones included
    variant = loaded.variants["onnx"]
    assert variant["format"] == "onnx" and variant["parity"]["passed"]
    assert variant["parity"]["agreement"] == 1.0 and variant["parity"]["rows"] == 60
    assert variant["parity"]["max_abs_logit_diff"] < 1e-3
    for column in ("audio", "image", "text"):
        assert (bundle / variant["encoders"][column]["file"]).is_file()
    assert (bundle / variant["head"]["file"]).is_file()
    assert (bundle / "model.safetensors").is_file()  # the original stays


def test_the_variant_predicts_like_pytorch_with_any_input_missing(exported):
    bundle, _ = exported
    reference = Engine.from_bundle(bundle, device="cpu")
    variant = Engine.from_bundle(bundle, device="cpu", variant="onnx")
    assert variant.card()["variant"] == "onnx"
    red = png_bytes((30, 30), COLORS["r"])
    from .conftest import sine, wav_bytes

    full = {"image": red, "text": "a red apple", "audio": wav_bytes(sine(300, 0.25))}
    for keep in itertools.chain.from_iterable(itertools.combinations(full, k) for k in (1, 2, 3)):
        fields = {k: full[k] for k in keep}
        a = reference.handle([fields, fields])
        b = variant.handle([fields, fields])
        for x, y in zip(a, b, strict=True):
            assert x["modalities"] == y["modalities"] == sorted(keep)
            for label, p in x["probabilities"].items():
                assert y["probabilities"][label] == pytest.approx(p, abs=1e-4), keep


def test_the_server_answers_from_the_variant(exported):
    bundle, _ = exported
    engine = Engine.from_bundle(bundle, device="cpu", variant="onnx")
    with TestClient(create_app(engine, ServeConfig())) as c:
        r = c.post(
            "/v1/predict", files={"image": ("r.png", png_bytes((30, 30), COLORS["r"]), "image/png")}
        )
        assert r.status_code == 200 and r.json()["label"] == "r"
        assert c.get("/v1/models").json()["data"][0]["variant"] == "onnx"
    with running_server(bundle, "--variant", "onnx") as (url, _):
        import httpx

        r = httpx.post(f"{url}/v1/predict", json={"text": "a red apple"}, timeout=30)
        assert r.status_code == 200 and r.json()["modalities"] == ["text"]
    with pytest.raises(Exception, match="no variant 'int8'"):
        Engine.from_bundle(bundle, variant="int8")


def test_big_encoders_keep_their_weights_in_external_data_files(bundle, monkeypatch):
    import modalforge.encoders.onnx_runtime as ort_encoders

    # every encoder counts as "big" (the real threshold is ~1.5 GB of weights)
    monkeypatch.setattr(ort_encoders, "EXTERNAL_DATA_BYTES", 0)
    manifest = read_manifest(bundle.parent / "manifest.csv")
    info = export_bundle(bundle, manifest, label="label", name="onnx-external")
    assert info["parity"]["agreement"] == 1.0
    files = load_bundle(bundle).variants["onnx-external"]["files"]  # hashes checked
    for column in ("audio", "image", "text"):
        graph = bundle / info["encoders"][column]["file"]
        listed = ort_encoders.graph_files(graph)
        assert len(listed) == 2 and listed[1].stat().st_size > 1000
        assert str(listed[1].relative_to(bundle)) in files
    engine = Engine.from_bundle(bundle, device="cpu", variant="onnx-external")
    got = engine.handle([{"image": png_bytes((30, 30), COLORS["r"])}])[0]["probabilities"]
    want = Engine.from_bundle(bundle, device="cpu").handle(
        [{"image": png_bytes((30, 30), COLORS["r"])}]
    )[0]["probabilities"]
    assert got == pytest.approx(want, abs=1e-4)


def test_a_broken_variant_fails_the_gate_and_is_not_added(bundle, monkeypatch):
    import modalforge.export.onnx as onnx_export

    real = onnx_export.export_onnx

    def broken(model, examples, out_dir):
        model = copy.deepcopy(model)  # the reference keeps the trained weights
        with torch.no_grad():  # the exported head's weights are scrambled
            for p in model.head.parameters():
                p.copy_(torch.randn_like(p) * 3)
        return real(model, examples, out_dir)

    monkeypatch.setattr(onnx_export, "export_onnx", broken)
    manifest = read_manifest(bundle.parent / "manifest.csv")
    with pytest.raises(ParityGateError, match="agreement") as info:
        export_bundle(bundle, manifest, label="label", name="broken")
    assert info.value.result["agreement"] < GATES["fp32"].min_agreement
    assert "broken" not in load_bundle(bundle).variants

    result = CliRunner().invoke(cli, ["export", str(bundle), "--manifest",
                                      str(bundle.parent / "manifest.csv"), "--split", "",
                                      "--name", "broken2"])  # fmt: skip
    assert result.exit_code == 1 and "failed its parity gate" in result.output
    assert "broken2" not in json.loads((bundle / "modalforge.json").read_text())["variants"]


def test_bench_measures_every_variant(exported, tmp_path):
    bundle, _ = exported
    result = CliRunner().invoke(cli, ["bench", str(bundle), "--manifest", str(bundle.parent / "manifest.csv"),
                                      "--split", "", "--rows", "8", "--out", str(tmp_path)])  # fmt: skip
    assert result.exit_code == 0, result.output
    table = json.loads((tmp_path / "bench.json").read_text())
    assert (tmp_path / "bench.png").stat().st_size > 10_000
    rows = {r["variant"]: r for r in table["variants"]}
    assert set(rows) >= {"pytorch", "onnx"}
    for r in rows.values():
        assert r["size_mb"] > 0 and r["parity"]["rows"] == 60
        for size in ("batch1", "batch32"):
            for kind in ("end_to_end", "model_only"):
                t = r[size][kind]
                assert 0 < t["p50_ms"] <= t["p99_ms"] and t["samples_per_s"] > 0
    assert rows["pytorch"]["batch1"]["speedup_vs_pytorch"] == 1.0
    assert rows["onnx"]["parity"]["agreement"] == 1.0


def test_int8_export_picks_per_encoder_schemes_under_the_gate(exported):
    bundle, _ = exported
    manifest = read_manifest(bundle.parent / "manifest.csv")
    info = export_bundle(bundle, manifest, label="label", name="int8", quantize="int8")
    assert info["format"] == "onnx-int8" and info["parity"]["passed"]
    assert info["parity"]["f1_macro_drop"] <= 0.01
    tried = info["quantization"]["tried"]
    assert tried and tried[-1]["passed"]
    for column, spec in info["encoders"].items():
        report = info["quantization"]["encoders"][column]
        assert {"dynamic", "static-qdq", "static-products"} <= set(report["candidates"])
        assert spec["quantization"] in (None, *SCHEMES["int8"])
        assert report.get("chosen") == spec["quantization"]  # the report says what is used
        if spec["quantization"] is not None:
            assert spec["file"].startswith("int8/") and spec["file"].endswith(".int8.onnx")
            assert report["candidates"][spec["quantization"]]["passed"]
    loaded = load_bundle(bundle)
    assert set(loaded.variants) >= {"pytorch", "onnx", "int8"}
    engine = Engine.from_bundle(bundle, device="cpu", variant="int8")
    out = engine.handle([{"image": png_bytes((30, 30), COLORS["r"])}])[0]
    assert out["label"] in ("r", "g", "b") and out["modalities"] == ["image"]


@pytest.mark.weights
def test_text_padding_is_decided_on_the_pytorch_encoder_for_a_variant():
    """An int8 graph's per-batch scales see the padding, so its features always differ a
    little between fixed and longest padding; the choice (and so the preprocessing the parity
    gate saw) comes from the PyTorch encoder."""
    from modalforge.data.dataset import Featurizer
    from modalforge.encoders import create_encoder
    from modalforge.encoders.base import EncoderOutput
    from modalforge.export.runtime import OrtEncoder
    from modalforge.schema import Modality

    torch_encoder = create_encoder("minilm").freeze()
    variant = OrtEncoder.__new__(OrtEncoder)  # stands in for an int8 graph: padding-sensitive
    variant.encoder = torch_encoder
    variant.__class__ = type("NoisyOrt", (OrtEncoder,), {
        "__call__": lambda self, batch: EncoderOutput(
            pooled=self.encoder(batch).pooled + 1e-3 * batch["input_ids"].shape[1])})  # fmt: skip
    feat = Featurizer(Modality.TEXT, torch_encoder.preprocessing)
    assert feat.text_cfg.padding == "max_length"
    engine = SimpleNamespace(to_device=lambda batch: batch)  # all _tune_padding needs
    result = Engine._tune_padding(engine, feat, variant)
    assert result["padding"] == "longest" and feat.text_cfg.padding == "longest"
