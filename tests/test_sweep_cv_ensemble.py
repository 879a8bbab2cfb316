"""Sweeps, cross-validation and ensembles end to end, with tiny frozen from-scratch encoders."""

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from modalforge.cli import app
from modalforge.evaluate import classification_metrics
from modalforge.predictor import MultimodalPredictor
from modalforge.schema import SchemaError
from modalforge.train.crossval import assign_folds, cross_validate
from modalforge.train.ensemble import EnsemblePredictor, train_ensemble
from modalforge.train.run import RunOptions
from modalforge.train.sweep import sweep

from .conftest import write_toy_manifest


@pytest.fixture
def toy(tmp_path):
    """60 rows, 3 classes; the class shows in the image colour and in the text."""
    return write_toy_manifest(tmp_path, inputs=("image", "text"))


def options(toy, tmp_path, **kw) -> RunOptions:
    """Frozen tiny encoders: their features are cached, so each run trains only fusion + head."""
    settings = dict(
        manifest=str(toy), label="label", out=str(tmp_path / "run"),
        encoders={"image": "cnn", "text": "bag_of_embeddings"},
        encoder_kwargs={"image": {"widths": [8, 16], "depth": 1, "image_size": 30},
                        "text": {"embed_dim": 16}},
        finetune="frozen", hidden=16, epochs=2, batch_size=16, patience=20, accelerator="cpu",
        cache_dir=str(tmp_path / "cache"),
    )  # fmt: skip
    return RunOptions(**{**settings, **kw})


def test_sweep_compares_fusions_and_single_modalities_on_one_split(toy, tmp_path):
    out = tmp_path / "sweep"
    table = sweep(options(toy, tmp_path), ["concat", "attention"], out=out, progress=False)
    assert sorted(table["name"]) == ["attention", "concat", "only image", "only text"]
    assert table.groupby("kind").size().to_dict() == {"fusion": 2, "single modality": 2}
    assert table["error"].isna().all()
    acc = table["accuracy"].to_numpy()
    assert (np.diff(acc) <= 0).all() and ((acc >= 0) & (acc <= 1)).all()  # best first
    for column in ("f1_macro", "auroc_macro", "parameters", "trainable_parameters", "train_s",
                   "encode_s", "latency_ms", "epochs"):  # fmt: skip
        assert table[column].notna().all(), column
    assert (table["trainable_parameters"] < table["parameters"]).all()  # encoders frozen
    saved = pd.read_csv(out / "sweep.csv")
    assert list(saved["name"]) == list(table["name"])
    assert (out / "sweep.png").read_bytes()[:4] == b"\x89PNG"
    text = (out / "sweep.md").read_text()
    assert "only text" in text and "read from the cache" in text
    # one split for all: the same test rows in every run, no bundles
    rows = {json.dumps(json.loads((out / r / "history.json").read_text())["rows"]) for r in
            ("concat", "attention", "only-image", "only-text")}  # fmt: skip
    assert len(rows) == 1
    assert not list(out.rglob("bundle"))
    # the feature cache: the image was encoded by the first run only
    assert table.attrs["cache"]["hits"] > 0
    assert table.attrs["cache"]["runs_that_encoded"][0] in {"concat", "attention"}


def test_cross_validation_folds_cover_every_row_once(toy, tmp_path):
    out = tmp_path / "cv"
    result = cross_validate(options(toy, tmp_path), folds=3, out=out, progress=False)
    folds = result["per_fold"]
    assert len(folds) == 3
    tested = [set(f["test_rows"]) for f in folds]
    assert sum(len(t) for t in tested) == 60 and set().union(*tested) == set(range(60))
    assignment = pd.read_csv(out / "folds.csv")
    labels = pd.read_csv(toy)["label"]
    assert sorted(assignment["row"]) == list(range(60))
    for f, rows in zip(folds, tested, strict=True):
        assert set(assignment.loc[assignment["fold"] == f["fold"], "row"]) == rows
        assert f["rows"]["test"] == len(rows) and f["rows"]["val"] > 0
        assert f["rows"]["train"] + f["rows"]["val"] + f["rows"]["test"] == 60
        # stratified: each fold tests every class
        assert set(labels.iloc[sorted(rows)]) == {"r", "g", "b"}
    for metric in ("accuracy", "f1_macro", "auroc_macro", "ece"):
        values = [f["metrics"][metric] for f in folds]
        assert result["mean"][metric] == pytest.approx(sum(values) / 3)
        sd = math.sqrt(sum((v - sum(values) / 3) ** 2 for v in values) / 2)  # ddof=1
        assert result["std"][metric] == pytest.approx(sd)
    saved = json.loads((out / "cv.json").read_text())
    assert saved["mean"] == pytest.approx(result["mean"]) and "ddof=1" in saved["std_kind"]
    assert "± " in (out / "cv.md").read_text()
    # deterministic from the seed, different for another seed
    strata = labels.tolist()
    assert (assign_folds(strata, 3, 0) + 1).tolist() == assignment.sort_values("row")[
        "fold"
    ].tolist()
    assert assign_folds(strata, 3, 0).tolist() != assign_folds(strata, 3, 1).tolist()


def test_ensemble_averages_member_probabilities(toy, tmp_path):
    out = tmp_path / "ens"
    result = train_ensemble(options(toy, tmp_path), members=2, out=out, progress=False)
    saved = json.loads((out / "ensemble.json").read_text())
    assert saved["bundles"] == ["member-1/bundle", "member-2/bundle"]
    assert [m["seed"] for m in saved["member_runs"]] == [0, 1]
    assert (out / "report" / "report.html").is_file()
    split = pd.read_csv(out / "split.csv")
    test_rows = split.loc[split["split"] == "test", "row"].tolist()
    frame = pd.read_csv(toy).iloc[test_rows].reset_index(drop=True)
    members = [MultimodalPredictor.load(out / b) for b in saved["bundles"]]
    probs = [m.predict_proba(frame, root=toy.parent).probs for m in members]
    assert not np.allclose(probs[0], probs[1])  # two seeds, two models
    mean = (probs[0] + probs[1]) / 2
    predictions = pd.read_csv(out / "predictions.csv")
    assert predictions["row"].tolist() == test_rows
    assert np.allclose(predictions.filter(like="p:").to_numpy(), mean, atol=1e-6)
    loaded = EnsemblePredictor.load(out)
    assert np.allclose(loaded.predict_proba(frame, root=toy.parent).probs, mean, atol=1e-7)
    y = [loaded.labels.index(v) for v in frame["label"]]
    expected = classification_metrics(y, mean, loaded.labels).headline()
    for key in ("accuracy", "f1_macro", "auroc_macro", "ece", "log_loss"):
        assert saved["ensemble"][key] == pytest.approx(expected[key], abs=1e-6), key
    for member, p in zip(saved["member_runs"], probs, strict=True):
        alone = classification_metrics(y, p, loaded.labels).headline()
        assert member["metrics"]["accuracy"] == pytest.approx(alone["accuracy"])
    assert result["predictor"].predict(frame, root=toy.parent)["label"].notna().all()


def test_ensemble_by_fold_uses_different_validation_rows(toy, tmp_path):
    out = tmp_path / "ens"
    result = train_ensemble(
        options(toy, tmp_path, epochs=1), members=2, out=out, by="fold", progress=False
    )
    runs = result["member_runs"]
    assert all(r["rows"]["test"] == result["rows"]["test"] for r in runs)
    pool = result["rows"]["train"] + result["rows"]["val"]
    assert sum(r["rows"]["val"] for r in runs) == pool  # each pooled row validates once


def test_cli_help():
    runner = CliRunner()
    for command, flags in (
        ("sweep", ("--fusions", "--no-single", "--manifest", "--epochs", "--image-encoder")),
        ("cv", ("--folds", "--manifest", "--seed", "--batch-size")),
        ("ensemble", ("--members", "--by", "--config", "--label")),
    ):
        out = runner.invoke(app, [command, "--help"])
        assert out.exit_code == 0, out.output
        for flag in flags:
            assert flag in out.output, (command, flag)


def test_cli_sweep_runs_from_flags_and_config(toy, tmp_path):
    import yaml

    settings = options(toy, tmp_path)
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"encoders": settings.encoders, "finetune": "frozen",
                                      "encoder_kwargs": settings.encoder_kwargs, "hidden": 16,
                                      "cache_dir": settings.cache_dir}))  # fmt: skip
    out = tmp_path / "cli-sweep"
    args = ["sweep", "--manifest", str(toy), "--label", "label", "--config", str(config),
            "--fusions", "concat", "--no-single", "--epochs", "1", "--out", str(out)]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "chart:" in result.output and (out / "sweep.png").is_file()
    assert pd.read_csv(out / "sweep.csv")["name"].tolist() == ["concat"]
    bad = CliRunner().invoke(app, [*args[:-4], "--fusions", "nope", "--out", str(out)])
    assert bad.exit_code == 1 and "unknown fusion" in bad.output


def test_config_schema_marks_inputs_optional(toy, tmp_path):
    p = options(toy, tmp_path, schema={"image": "image?", "text": "text"}).predictor()
    assert not p.declared_schema["image"].required and p.declared_schema["text"].required
    with pytest.raises(SchemaError, match="unknown type 'sound'"):
        options(toy, tmp_path, schema={"image": "sound"}).predictor()


#: shipped configs that are not `modalforge train` recipes (test_ray_serve.py checks this one)
NOT_TRAINING = {"ray-serve.yaml"}


@pytest.mark.parametrize(
    "path",
    sorted(
        p for p in Path(__file__).parents[1].glob("configs/*.yaml") if p.name not in NOT_TRAINING
    ),
    ids=lambda p: p.name,
)
def test_shipped_configs_parse(path, monkeypatch):
    options = RunOptions.from_yaml(path)
    if options.task == "chat":  # a tiny LLM stands in for Gemma (its conversion takes a minute)
        from modalforge.llm.loader import LlmRef
        from modalforge.tasks.chat import predictor as chat
        from tests.tiny_llm import tiny_gemma, tiny_tokenizer

        tiny = (tiny_gemma(), tiny_tokenizer(), LlmRef("tiny", "0" * 64))
        monkeypatch.setattr(chat, "load_llm", lambda source=None, **_: tiny)
        predictor = options.predictor()
        for key in ("image_tokens", "audio_tokens"):
            assert getattr(predictor.config, key) == options.task_options[key]
        assert predictor.fit_config.max_per_type == options.task_options["max_per_type"]
        assert predictor.label is None
        return
    predictor = options.predictor()
    # a captioner's label is the caption column it learns to write
    assert predictor.label == (options.caption if options.task == "caption" else options.label)
    if options.schema:
        assert set(predictor.declared_schema.names) == set(options.schema)
