"""Training, evaluation, bundles and prediction end to end, with tiny from-scratch encoders."""

import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from modalforge.models import EncoderSpec
from modalforge.predictor import FitConfig, MultimodalPredictor

from .conftest import write_toy_manifest

TINY = {
    "image": EncoderSpec("cnn", {"widths": (8, 16), "image_size": 30}),
    "text": EncoderSpec("bag_of_embeddings", {"embed_dim": 16}),
    "audio": EncoderSpec("audio_cnn", {"n_mels": 32, "channels": (8, 16), "output_dim": 16}),
}


@pytest.fixture
def toy(tmp_path):
    """60 rows, 3 classes; the class shows in the image colour, the text and the tone pitch."""
    return write_toy_manifest(tmp_path)


def fit(toy, tmp_path, fusion="concat", epochs=8, **kw):
    p = MultimodalPredictor(label="label", fusion=fusion, encoders=TINY, hidden=32,
                            fit_config=FitConfig(epochs=epochs, batch_size=16, patience=20, **kw),
                            cache_dir=tmp_path / "cache")  # fmt: skip
    return p.fit(toy, out_dir=tmp_path / "run", progress=False)


def test_fit_evaluate_save_load_predict(toy, tmp_path):
    p = fit(toy, tmp_path)
    assert p.labels == ["b", "g", "r"] and p.history["epochs_run"] >= 1
    result = p.evaluate(toy, out_dir=tmp_path / "report")
    assert result["headline"]["accuracy"] > 0.9  # the toy task is easy
    assert {r["name"] for r in result["ablation"]} >= {"all", "without image", "only text"}
    assert (tmp_path / "report" / "report.html").is_file()
    bundle = p.save(tmp_path / "bundle", metrics=result["headline"])
    assert (bundle.path / "model.safetensors").is_file()
    assert not list(bundle.path.glob("*.pt")) and not list(bundle.path.glob("*.ckpt"))
    loaded = MultimodalPredictor.load(tmp_path / "bundle")
    # the same batches: on AVX-512 CPUs a convolution's rounding depends on the batch size
    # (batches of 16 vs 60 rows differ by 3e-8), and a loaded bundle predicts in batches of 64
    loaded.fit_config.batch_size = p.fit_config.batch_size
    a, b = p.predict_proba(toy).probs, loaded.predict_proba(toy).probs
    assert np.array_equal(a, b)
    table = loaded.predict(toy)
    assert list(table.columns[:2]) == ["label", "confidence"]
    assert {"contribution:image", "contribution:text", "contribution:audio"} <= set(table.columns)
    assert np.allclose(table.filter(like="p:").sum(axis=1), 1, atol=1e-5)


def test_predict_from_a_fresh_process_matches_evaluation(toy, tmp_path):
    p = fit(toy, tmp_path, epochs=3)
    p.save(tmp_path / "bundle")
    expected = p.predict(toy)
    out = tmp_path / "pred.csv"
    code = ("from modalforge.predictor import MultimodalPredictor as M;"
            f"M.load({str(tmp_path / 'bundle')!r}).predict({str(toy)!r}).to_csv({str(out)!r}, index=False)")  # fmt: skip
    subprocess.run([sys.executable, "-c", code], check=True)
    got = pd.read_csv(out)
    assert (got["label"] == expected["label"]).all()
    assert np.allclose(
        got.filter(like="p:").to_numpy(), expected.filter(like="p:").to_numpy(), atol=1e-6
    )


def test_evaluate_and_predict_a_manifest_without_an_optional_column(tmp_path):
    """The bundle's schema marks audio optional: a manifest without that column at all is
    scored and predicted with audio missing in every row (CLI and Python API)."""
    from typer.testing import CliRunner

    from modalforge.cli import app

    from .serving import train_toy_bundle

    bundle = train_toy_bundle(tmp_path)
    frame = pd.read_csv(tmp_path / "manifest.csv").drop(columns=["audio"])
    frame.to_csv(tmp_path / "no-audio.csv", index=False)
    loaded = MultimodalPredictor.load(bundle, cache_dir=tmp_path / "cache")
    result = loaded.evaluate(tmp_path / "no-audio.csv", ablation=False)
    assert result["rows"] == 60 and result["headline"]["accuracy"] > 0.5  # chance: 1/3
    table = loaded.predict(tmp_path / "no-audio.csv")
    assert (table["contribution:audio"] == 0).all() and len(table) == 60
    runner = CliRunner()
    out = runner.invoke(app, ["evaluate", str(bundle), "--manifest", str(tmp_path / "no-audio.csv"),
                              "--out", str(tmp_path / "report")])  # fmt: skip
    assert out.exit_code == 0, out.output
    out = runner.invoke(app, ["predict", str(bundle), "--manifest", str(tmp_path / "no-audio.csv"),
                              "--out", str(tmp_path / "pred.csv")])  # fmt: skip
    assert out.exit_code == 0, out.output
    assert len(pd.read_csv(tmp_path / "pred.csv")) == 60


def test_missing_modalities_at_prediction(toy, tmp_path):
    p = fit(toy, tmp_path, epochs=3)
    frame = pd.read_csv(toy).head(6)
    frame.loc[0, "image"] = None
    frame.loc[1, ["text", "audio"]] = None
    pred = p.predict_proba(frame, root=toy.parent)
    assert np.isfinite(pred.probs).all()
    assert pred.present["image"].tolist() == [False, True, True, True, True, True]
    table = p.predict(frame, root=toy.parent)
    assert table.loc[0, "contribution:image"] == 0.0


def test_feature_cache_makes_the_second_run_encode_nothing(toy, tmp_path):
    frozen = {
        "image": EncoderSpec("cnn", {"widths": (8, 16), "image_size": 30}, train="frozen"),
        "text": EncoderSpec("bag_of_embeddings", {"embed_dim": 16}, train="frozen"),
    }

    def run(name):
        p = MultimodalPredictor(label="label", encoders=frozen, columns=["image", "text"], hidden=16,
                                fit_config=FitConfig(epochs=1, batch_size=16), cache_dir=tmp_path / "cache")  # fmt: skip
        return p.fit(toy, out_dir=tmp_path / name, progress=False).history

    first, second = run("a"), run("b")
    assert sum(s["misses"] for s in first["cache"].values()) > 0
    assert sum(s["misses"] for s in second["cache"].values()) == 0

    # content-addressed: the 3 distinct images were encoded once, every later lookup hits
    def lookups(history):
        return sum(s["hits"] + s["misses"] for s in history["cache"].values())

    assert lookups(second) == lookups(first)


def test_class_weights_focal_and_regression(toy, tmp_path):
    from modalforge.train.module import OptimConfig

    p = fit(
        toy,
        tmp_path,
        epochs=2,
        class_weights="balanced",
        optim=OptimConfig(loss="focal", label_smoothing=0.1),
    )
    assert p.history["epochs_run"] >= 1
    frame = pd.read_csv(toy)
    frame["score"] = np.linspace(0.0, 1.0, len(frame)) + np.random.default_rng(0).normal(
        0, 0.01, len(frame)
    )
    frame = frame.drop(columns=["label"])
    reg = MultimodalPredictor(label="score", encoders=TINY, columns=["text"], hidden=16,
                              fit_config=FitConfig(epochs=2, batch_size=16), cache_dir=tmp_path / "c2")  # fmt: skip
    path = toy.parent / "reg.csv"
    frame.to_csv(path, index=False)
    reg.fit(path, out_dir=tmp_path / "reg", progress=False)
    assert reg.task == "regression"
    result = reg.evaluate(path)
    assert set(result["headline"]) >= {"rmse", "r2"}


def test_word_vocabulary_is_part_of_the_cache_key(toy, tmp_path):
    frozen = {"text": EncoderSpec("bag_of_embeddings", {"embed_dim": 8}, train="frozen")}
    frame = pd.read_csv(toy)
    ids = []
    for half in (frame.iloc[:30], frame.iloc[30:]):  # different texts -> different vocabularies
        path = toy.parent / f"half{len(ids)}.csv"
        half.to_csv(path, index=False)
        p = MultimodalPredictor(label="label", encoders=frozen, columns=["text"], hidden=8,
                                fit_config=FitConfig(epochs=1, batch_size=16), cache_dir=tmp_path / "cache")  # fmt: skip
        p.fit(path, out_dir=tmp_path / f"run{len(ids)}", progress=False)
        # the second half's texts are all new, and no feature of the first vocabulary is reused
        assert sum(s["hits"] for s in p.history["cache"].values()) == 0
        ids.append(p.model.encoder("text").encoder_id)
    assert ids[0] != ids[1]


def test_only_pretrained_encoders_take_the_small_fine_tuning_steps():
    from types import SimpleNamespace

    from modalforge.models import ModelConfig, build_model
    from modalforge.train.module import MultimodalModule, OptimConfig

    text = EncoderSpec("bag_of_embeddings", {"embed_dim": 16, "vocab_size": 50})
    config = ModelConfig(task="classification", inputs={"image": TINY["image"], "text": text},
                         num_outputs=3, fusion="concat", hidden=16)  # fmt: skip
    model = build_model(config)
    model.encoder("text").weights_id = "package:some-pretrained-text-model"  # as if loaded
    module = MultimodalModule(model, True, OptimConfig(lr=1e-3, encoder_lr=1e-5))
    module._trainer = SimpleNamespace(estimated_stepping_batches=10)
    groups = module.configure_optimizers()["optimizer"].param_groups
    by_lr = {g["initial_lr"]: {id(p) for p in g["params"]} for g in groups}
    text_ids = {id(p) for p in model.encoder("text").parameters()}
    image_ids = {id(p) for p in model.encoder("image").parameters()}
    assert by_lr[1e-5] == text_ids  # fine-tuned pretrained encoder: small steps
    assert image_ids <= by_lr[1e-3]  # from scratch: learns at the head's rate
