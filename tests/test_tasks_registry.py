"""The task registry: every entry resolves, bundles find their task (a VQA classifier is claimed
by the ``vqa`` entry), options imply tasks, routes are mounted by capability, and the renamed
widths still read their old names."""

from __future__ import annotations

import importlib
import sys
import warnings

import pytest
from fastapi.testclient import TestClient

from modalforge import tasks
from modalforge.schema import Schema
from modalforge.tasks.registry import CHAT, EMBED, PREDICT

from .serving import train_toy_bundle


def test_every_entry_names_objects_that_exist():
    for spec in tasks.list_tasks():
        for part in ("predictor", "serving", "config", "onnx_model", "exporter", "options",
                     "claims"):  # fmt: skip
            if getattr(spec, part) is not None:
                assert callable(spec.resolve(part)), (spec.name, part)
        assert spec.capabilities, spec.name
    with pytest.raises(LookupError, match="no exporter"):
        tasks.get("transcribe").resolve("exporter")


def test_importing_the_registry_imports_no_task_module():
    code = ("import sys, modalforge.tasks; "
            "print(sorted(m for m in sys.modules if m.startswith('modalforge.tasks.')))")  # fmt: skip
    import subprocess

    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "['modalforge.tasks.registry']"


def test_names_aliases_and_refinements():
    assert tasks.get("regression").name == "classification"
    assert tasks.get("transcription").name == "transcribe"
    with pytest.raises(KeyError, match="unknown task 'nope'"):
        tasks.get("nope")
    vqa = Schema.from_specs(["image=image", "question=text", "answer=label"])
    three = Schema.from_specs(["image=image", "text=text", "audio=audio", "label=label"])
    assert tasks.spec_for("classification", vqa).name == "vqa"
    assert tasks.spec_for("classification", three).name == "classification"
    assert tasks.spec_for("contrastive", vqa).name == "contrastive"  # only classifiers refine
    assert tasks.get("vqa").can(CHAT) and not tasks.get("classification").can(CHAT)
    assert [s.name for s in tasks.with_capability(EMBED)] == ["contrastive"]
    assert tasks.trainable() == ["classification", "regression", "contrastive", "caption", "chat"]


def test_options_imply_their_task():
    from modalforge.experiments.run import RunOptions

    assert tasks.implied_task(RunOptions(manifest="m.csv", label="y")) is None
    assert tasks.implied_task(RunOptions(manifest="m.csv", pairs=["image:text"])) == "contrastive"
    assert tasks.implied_task(RunOptions(manifest="m.csv", caption="text")) == "caption"
    assert (
        tasks.implied_task(RunOptions(manifest="m.csv", caption="t", task="caption")) == "caption"
    )
    predictor = RunOptions(manifest="m.csv", pairs=["image:text"]).predictor()
    assert type(predictor).__name__ == "ContrastivePredictor"
    with pytest.raises(ValueError, match="not trained by modalforge train"):
        RunOptions(manifest="m.csv", task="transcribe").predictor()


def test_old_width_names_are_read_with_a_deprecation_message(tmp_path):
    from modalforge.experiments.run import RunOptions
    from modalforge.models import ModelConfig

    config = tmp_path / "run.yaml"
    config.write_text("manifest: m.csv\nlabel: y\nhidden: 48\nfusion_kwargs: {hidden: 12}\n")
    with pytest.warns(FutureWarning, match="'hidden' is deprecated"):
        options = RunOptions.from_yaml(config)
    assert (options.fusion_out_dim, options.decoder_dim) == (48, 48)
    assert options.fusion_kwargs == {"width": 12} and "hidden" not in options.to_dict()
    old = {"task": "classification", "inputs": {}, "num_outputs": 2, "hidden": 64,
           "fusion_kwargs": {"hidden": 16}}  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an old bundle's config loads without a warning
        parsed = ModelConfig.from_dict(old)
    assert parsed.fusion_out_dim == 64 and parsed.fusion_kwargs == {"width": 16}
    assert "hidden" not in parsed.to_dict()


def test_old_module_paths_are_the_new_modules():
    pairs = {"modalforge.predictor": None, "modalforge.contrastive": "modalforge.tasks.contrastive",
             "modalforge.caption": "modalforge.tasks.caption",
             "modalforge.transcribe": "modalforge.tasks.transcription",
             "modalforge.serve.engine": "modalforge.runtime.engine",
             "modalforge.export.runtime": "modalforge.runtime.onnx",
             "modalforge.train.sweep": "modalforge.experiments.sweep"}  # fmt: skip
    for old, new in pairs.items():
        module = importlib.import_module(old)
        if new is not None:
            assert module is importlib.import_module(new), old
    from modalforge.predictor import MultimodalPredictor
    from modalforge.tasks.classification import MultimodalPredictor as new

    assert MultimodalPredictor is new


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    return train_toy_bundle(tmp_path_factory.mktemp("registry"), inputs=("text", "audio"))


def test_routes_are_mounted_by_capability_with_the_old_refusals(classifier):
    from modalforge.runtime import Engine
    from modalforge.serve import ServeConfig, create_app

    engine = Engine.from_bundle(classifier, device="cpu")
    assert engine.can(PREDICT) and not engine.can(EMBED)
    with TestClient(create_app(engine, ServeConfig())) as client:
        paths = set(client.get("/openapi.json").json()["paths"])
        assert {"/v1/predict", "/v1/predict/batch", "/v1/models"} <= paths
        assert not paths & {"/v1/embeddings", "/v1/search", "/v1/caption",
                            "/v1/chat/completions", "/v1/audio/transcriptions"}  # fmt: skip
        for path, words in (("/v1/embeddings", "embeddings come from a contrastive bundle"),
                            ("/v1/caption", "captions come from a captioning bundle"),
                            ("/v1/chat/completions", "chat completions come from"),
                            ("/v1/audio/transcriptions", "transcripts come from")):  # fmt: skip
            r = client.post(path, json={})
            assert r.status_code == 422, (path, r.text)
            error = r.json()["error"]
            assert words in error["message"] and error["param"] == "model"
            assert error["message"].startswith("'toy' is a classification model")
        r = client.post("/v1/search", json={"query": "x"})
        assert r.status_code == 404 and "no index" in r.json()["error"]["message"]


def test_a_vqa_classifier_gets_the_chat_route(tmp_path):
    """Claimed by the ``vqa`` entry: one image and one text input."""
    import base64

    from modalforge.runtime import Engine
    from modalforge.serve import ServeConfig, create_app

    from .conftest import COLORS, png_bytes

    bundle = train_toy_bundle(tmp_path, inputs=("image", "text"))
    engine = Engine.from_bundle(bundle, device="cpu")
    assert engine.spec.name == "vqa" and engine.task == "classification"
    url = "data:image/png;base64," + base64.b64encode(png_bytes((30, 30), COLORS["g"])).decode()
    message = {
        "role": "user",
        "content": [
            {"type": "text", "text": "a green leaf"},
            {"type": "image_url", "image_url": {"url": url}},
        ],
    }
    with TestClient(create_app(engine, ServeConfig())) as client:
        assert "/v1/chat/completions" in client.get("/openapi.json").json()["paths"]
        r = client.post("/v1/chat/completions", json={"messages": [message]})
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["message"]["content"] in ("r", "g", "b")
        empty = {"role": "user", "content": [message["content"][1]]}
        r = client.post("/v1/chat/completions", json={"messages": [empty]})
        assert r.status_code == 422 and "needs the question" in r.json()["error"]["message"]
