"""The bundle folder: round trip, atomic writes, verification, no pickles, variants."""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import modalforge.bundle as bundle_mod
from modalforge.bundle import (
    BUNDLE_FORMAT_VERSION,
    MANIFEST_NAME,
    Bundle,
    BundleError,
    add_variant,
    load_bundle,
    save_bundle,
)
from modalforge.schema import Schema

SCHEMA = Schema.from_dict(
    {"columns": {"image": "image", "caption": "text?", "category": {"type": "label"}}}
)
LABELS = ["cat", "dog", "émeu"]
MODEL_CONFIG = {
    "inputs": {
        "image": {"name": "tiny_cnn", "kwargs": {"width": 8}},
        "caption": {"name": "bow", "kwargs": {}},
    },
    "preprocessing": {"image": {"size": 30}, "caption": {"max_length": 16}},
    "fusion": "concat",
    "fusion_kwargs": {"dim": 32},
}


class Tied(nn.Module):
    """An embedding reused as the output projection, like a language model's tied weights."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(5, 4)
        self.out = nn.Linear(4, 5, bias=False)
        self.out.weight = self.emb.weight
        self.register_buffer("steps", torch.tensor([3, 1 << 40], dtype=torch.int64))


def make_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = Tied()
    state = dict(model.state_dict())
    base = torch.randn(6, 3)
    state["transposed"] = base.t()  # not contiguous
    state["half"] = torch.randn(3, 2).to(torch.bfloat16)
    state["mask"] = torch.tensor([True, False, True])
    state["weird"] = torch.tensor([math.nan, math.inf, -0.0])
    return state


def save(path: Path, **overrides) -> Bundle:
    kwargs = dict(
        task="classification",
        schema=SCHEMA,
        label_column="category",
        labels=LABELS,
        model_config=MODEL_CONFIG,
        state_dict=make_state(),
        metrics={"accuracy": torch.tensor(0.75), "f1": np.float32(0.5), "auc": math.nan},
        extra={"run": {"seed": 0, "epochs": 2}},
        assets={"vocab.json": {"<pad>": 0, "cat": 1}},
    )
    kwargs.update(overrides)
    return save_bundle(path, **kwargs)


def bits(t: torch.Tensor) -> bytes:
    return t.contiguous().view(torch.uint8).numpy().tobytes()


def flip_byte(path: Path, offset: int = -1) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


# -- round trip ------------------------------------------------------------------------------


def test_round_trip(tmp_path):
    target = tmp_path / "runs" / "b1"  # parents are made
    saved = save(target)
    loaded = load_bundle(target)
    assert loaded.meta == saved.meta
    assert loaded.format_version == BUNDLE_FORMAT_VERSION
    assert loaded.task == "classification"
    assert loaded.schema == SCHEMA  # column order kept
    assert loaded.label_column == "category"
    assert loaded.labels == LABELS
    assert loaded.model_config == MODEL_CONFIG
    assert loaded.preprocessing == {"image": {"size": 30}, "caption": {"max_length": 16}}
    assert loaded.metrics == {"accuracy": 0.75, "f1": 0.5, "auc": None}  # NaN -> null
    assert loaded.extra == {"run": {"seed": 0, "epochs": 2}}
    assert loaded.variants == {"pytorch": {"format": "safetensors", "files": ["model.safetensors"]}}
    assert set(loaded.files) == {"model.safetensors", "vocab.json"}
    assert loaded.asset("vocab.json") == {"<pad>": 0, "cat": 1}
    assert loaded.created and loaded.created.endswith("+00:00")

    expected = make_state()
    state = loaded.state_dict()
    assert set(state) == set(expected)
    for key, tensor in expected.items():
        assert state[key].dtype == tensor.dtype, key
        assert state[key].shape == tensor.shape, key
        assert bits(state[key]) == bits(tensor), key
    # the tie comes back as two equal tensors; loading restores it in a tied model
    assert torch.equal(state["emb.weight"], state["out.weight"])
    model = Tied()
    model.load_state_dict({k: state[k] for k in ("emb.weight", "out.weight", "steps")})
    assert model.out.weight is model.emb.weight
    assert torch.equal(model.emb.weight, expected["emb.weight"])


def test_manifest_is_plain_json_with_versions(tmp_path):
    save(tmp_path / "b")
    text = (tmp_path / "b" / MANIFEST_NAME).read_text(encoding="utf-8")
    meta = json.loads(text)
    assert "NaN" not in text
    assert list(meta) == sorted(meta)
    assert text.startswith('{\n  "assets"')  # indent 2
    versions = meta["provenance"]["versions"]
    for package in ("python", "torch", "safetensors", "modalforge"):
        assert versions.get(package), package
    assert versions["torch"] == importlib.metadata.version("torch")
    digest = hashlib.sha256((tmp_path / "b" / "model.safetensors").read_bytes()).hexdigest()
    assert meta["files"]["model.safetensors"]["sha256"] == digest


def test_regression_bundle_without_labels(tmp_path):
    b = save(tmp_path / "r", task="regression", label_column=None, labels=None, assets=None)
    loaded = load_bundle(b.path)
    assert loaded.labels == [] and loaded.label_column is None and loaded.assets == []


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"label_column": "nope"}, "not in the schema"),
        ({"labels": ["a", "a"]}, "duplicates"),
        ({"labels": []}, "needs its labels"),
        ({"model_config": {"x": object()}}, "not JSON"),
        ({"extra": {"x": math.inf}}, "NaN or infinity"),
        ({"state_dict": {"w": [1.0]}}, "not a tensor"),
        ({"assets": {"../vocab.json": {}}}, "plain relative path"),
        ({"assets": {"vocab.txt": {}}}, "end in .json"),
        ({"assets": {"model.safetensors": {}}}, "end in .json"),
    ],
)
def test_save_rejects_bad_input(tmp_path, overrides, message):
    with pytest.raises(BundleError, match=message):
        save(tmp_path / "b", **overrides)
    assert not (tmp_path / "b").exists()
    assert not any(tmp_path.iterdir())  # no temp folders left behind


# -- atomic writes ---------------------------------------------------------------------------


def test_overwrite_refused_then_allowed(tmp_path):
    target = tmp_path / "b"
    save(target)
    before = (target / MANIFEST_NAME).read_bytes()
    with pytest.raises(BundleError, match="exists already"):
        save(target, labels=["x", "y", "z"])
    assert (target / MANIFEST_NAME).read_bytes() == before
    save(target, labels=["x", "y", "z"], overwrite=True)
    assert load_bundle(target).labels == ["x", "y", "z"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]  # old copy and temp removed


def test_non_bundle_folder_never_replaced(tmp_path):
    target = tmp_path / "precious"
    target.mkdir()
    (target / "notes.txt").write_text("keep me")
    with pytest.raises(BundleError, match="not a bundle"):
        save(target, overwrite=True)
    assert (target / "notes.txt").read_text() == "keep me"
    (tmp_path / "afile").write_text("x")
    with pytest.raises(BundleError, match="not a folder"):
        save(tmp_path / "afile", overwrite=True)


def test_empty_folder_is_filled(tmp_path):
    (tmp_path / "b").mkdir()
    save(tmp_path / "b")
    load_bundle(tmp_path / "b")


def test_failure_mid_write_leaves_old_bundle(tmp_path, monkeypatch):
    target = tmp_path / "b"
    save(target)
    before = {p.name: p.read_bytes() for p in target.iterdir()}

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(bundle_mod, "_write_text", boom)
    with pytest.raises(OSError, match="disk full"):
        save(target, overwrite=True)
    with pytest.raises(OSError, match="disk full"):
        save(tmp_path / "new")
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]
    load_bundle(target)


# -- loading errors --------------------------------------------------------------------------


def test_tampered_weights_detected(tmp_path):
    b = save(tmp_path / "b")
    flip_byte(b.path / "model.safetensors")
    with pytest.raises(BundleError, match=r"model\.safetensors: changed") as info:
        load_bundle(b.path)
    assert "sha256" in str(info.value)
    assert len(info.value.problems) == 1
    load_bundle(b.path, verify=False)  # an explicit opt-out still loads


def test_size_change_and_missing_file_detected(tmp_path):
    b = save(tmp_path / "b")
    with (b.path / "vocab.json").open("a") as f:
        f.write(" ")
    (b.path / "model.safetensors").unlink()
    with pytest.raises(BundleError) as info:
        load_bundle(b.path)
    text = str(info.value)
    assert "model.safetensors: missing" in text
    assert "vocab.json: changed" in text and "size" in text
    assert len(info.value.problems) == 2


def test_not_a_bundle(tmp_path):
    with pytest.raises(BundleError, match="no such bundle folder"):
        load_bundle(tmp_path / "nowhere")
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(BundleError, match="not a folder"):
        load_bundle(tmp_path / "file.txt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(BundleError, match=r"modalforge\.json: missing"):
        load_bundle(tmp_path / "empty")


def test_bad_json(tmp_path):
    b = save(tmp_path / "b")
    (b.path / MANIFEST_NAME).write_text('{"format_version": 1,,}')
    with pytest.raises(BundleError, match=r"modalforge\.json: invalid JSON at line 1"):
        load_bundle(b.path)
    (b.path / MANIFEST_NAME).write_text("[1, 2]")
    with pytest.raises(BundleError, match="JSON object"):
        load_bundle(b.path)


def rewrite(b: Bundle, **changes) -> None:
    meta = json.loads((b.path / MANIFEST_NAME).read_text())
    for key, value in changes.items():
        if value is None:
            meta.pop(key)
        else:
            meta[key] = value
    (b.path / MANIFEST_NAME).write_text(json.dumps(meta))


def test_future_format_version(tmp_path):
    b = save(tmp_path / "b")
    rewrite(b, format_version=BUNDLE_FORMAT_VERSION + 1)
    with pytest.raises(BundleError, match=r"modalforge\.json: format_version 2 is newer"):
        load_bundle(b.path)
    rewrite(b, format_version="one")
    with pytest.raises(BundleError, match="unknown format_version"):
        load_bundle(b.path)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"schema": None}, r"missing required keys \['schema'\]"),
        ({"format_version": None}, "missing required key 'format_version'"),
        ({"schema": {"columns": {"x": "video"}}}, "bad 'schema'"),
        ({"variants": {}}, "'pytorch' variant"),
        ({"files": {"../../etc/passwd": {"sha256": "0" * 64, "bytes": 1}}}, "relative path"),
        ({"labels": "cat,dog"}, "list of class names"),
    ],
)
def test_broken_manifest(tmp_path, changes, message):
    b = save(tmp_path / "b")
    rewrite(b, **changes)
    with pytest.raises(BundleError, match=message) as info:
        load_bundle(b.path, verify=False)
    assert MANIFEST_NAME in str(info.value)


@pytest.mark.parametrize("name", ["evil.pkl", "weights.pt", "sub/model.bin", "old.PTH"])
def test_stray_pickle_refused(tmp_path, name):
    b = save(tmp_path / "b")
    (b.path / name).parent.mkdir(exist_ok=True)
    (b.path / name).write_bytes(b"\x80\x04K\x01.")
    with pytest.raises(BundleError, match="never contains pickles") as info:
        load_bundle(b.path, verify=False)
    assert name in str(info.value)


# -- variants --------------------------------------------------------------------------------


def test_add_variant_keeps_original(tmp_path):
    b = save(tmp_path / "b")
    original = (b.path / "model.safetensors").read_bytes()
    original_entry = dict(b.files["model.safetensors"])
    source = tmp_path / "export.onnx"
    source.write_bytes(b"onnx-bytes")

    b2 = add_variant(b, "onnx", {"model.onnx": source}, {"format": "onnx", "opset": 18})
    b3 = add_variant(b2, "int8", {"model.int8.onnx": b"int8-bytes"}, {"format": "onnx-int8"})

    loaded = load_bundle(b.path)
    assert loaded.meta == b3.meta
    assert list(loaded.variants) == ["pytorch", "int8", "onnx"]
    assert loaded.variants["onnx"]["format"] == "onnx"
    assert loaded.variants["onnx"]["opset"] == 18
    assert loaded.variants["onnx"]["files"] == ["model.onnx"]
    assert loaded.files["model.onnx"] == {
        "bytes": 10,
        "sha256": hashlib.sha256(b"onnx-bytes").hexdigest(),
    }
    assert loaded.files["model.int8.onnx"]["sha256"] == hashlib.sha256(b"int8-bytes").hexdigest()
    assert loaded.files["model.safetensors"] == original_entry
    assert (b.path / "model.safetensors").read_bytes() == original
    assert loaded.variant_files("onnx") == [b.path / "model.onnx"]
    assert bits(loaded.state_dict()["emb.weight"]) == bits(make_state()["emb.weight"])
    with pytest.raises(BundleError, match=r"no \.safetensors file"):
        loaded.state_dict("onnx")
    with pytest.raises(BundleError, match="no variant 'tflite'"):
        loaded.state_dict("tflite")

    flip_byte(b.path / "model.onnx", 0)
    with pytest.raises(BundleError, match=r"model\.onnx: changed"):
        load_bundle(b.path)


def test_add_variant_refusals(tmp_path):
    b = save(tmp_path / "b")
    onnx = {"format": "onnx"}
    with pytest.raises(BundleError, match="original model"):
        add_variant(b, "pytorch", {"x.safetensors": b"x"}, {"format": "safetensors"})
    with pytest.raises(BundleError, match="belongs to the bundle"):
        add_variant(b, "onnx", {"model.safetensors": b"x"}, onnx)
    with pytest.raises(BundleError, match="belongs to the bundle"):
        add_variant(b, "onnx", {"vocab.json": b"x"}, onnx)
    with pytest.raises(BundleError, match="belongs to the bundle"):
        add_variant(b, "onnx", {MANIFEST_NAME: b"x"}, onnx)
    with pytest.raises(BundleError, match="relative path"):
        add_variant(b, "onnx", {"../model.onnx": b"x"}, onnx)
    with pytest.raises(BundleError, match="'format'"):
        add_variant(b, "onnx", {"model.onnx": b"x"}, {"opset": 18})
    with pytest.raises(BundleError, match="variant name"):
        add_variant(b, "on nx", {"model.onnx": b"x"}, onnx)
    add_variant(b, "onnx", {"model.onnx": b"x"}, onnx)
    with pytest.raises(BundleError, match="belongs to the bundle"):
        add_variant(b, "other", {"model.onnx": b"y"}, onnx)
    with pytest.raises(BundleError, match="exists already"):
        add_variant(b, "onnx", {"model.onnx": b"y"}, onnx)
    assert (b.path / "model.onnx").read_bytes() == b"x"
    assert not [p for p in b.path.iterdir() if p.name.startswith(".")]  # no temp files left

    flip_byte(b.path / "model.safetensors")
    with pytest.raises(BundleError, match=r"model\.safetensors: changed"):
        add_variant(b, "int8", {"model.int8.onnx": b"z"}, onnx)


def test_add_variant_overwrite_replaces_only_that_variant(tmp_path):
    b = save(tmp_path / "b")
    add_variant(b, "onnx", {"model.onnx": b"v1", "model.onnx.data": b"d1"}, {"format": "onnx"})
    b2 = add_variant(b, "onnx", {"model.onnx": b"v2"}, {"format": "onnx"}, overwrite=True)
    assert (b.path / "model.onnx").read_bytes() == b"v2"
    assert not (b.path / "model.onnx.data").exists()
    assert "model.onnx.data" not in b2.files
    load_bundle(b.path)


def test_declared_variant_may_hold_a_bin_file(tmp_path):
    b = save(tmp_path / "b")
    add_variant(b, "trt", {"engines/model.bin": b"engine"}, {"format": "tensorrt"})
    assert load_bundle(b.path).variant_files("trt") == [b.path / "engines" / "model.bin"]
    (b.path / "engines" / "other.bin").write_bytes(b"?")
    with pytest.raises(BundleError, match=r"engines/other\.bin"):
        load_bundle(b.path)


def test_safetensors_variant_state_dict(tmp_path):
    from safetensors.torch import save_file

    b = save(tmp_path / "b")
    small = tmp_path / "small.safetensors"
    save_file({"w": torch.arange(4.0)}, str(small))
    add_variant(b, "pruned", {"pruned.safetensors": small}, {"format": "safetensors"})
    assert torch.equal(load_bundle(b.path).state_dict("pruned")["w"], torch.arange(4.0))
