"""modalforge.evaluate: metrics against scikit-learn, ablation, weight summaries, the report."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn import metrics as skm
from sklearn.exceptions import UndefinedMetricWarning

from modalforge.evaluate import (
    classification_metrics,
    modality_ablation,
    regression_metrics,
    summarize_weights,
    write_report,
)

TOL = 1e-6


def softmax_probs(y: np.ndarray, num_classes: int, seed: int, signal: float = 1.5) -> np.ndarray:
    """Noisy class probabilities ``(N, C)`` leaning towards ``y``."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(len(y), num_classes)) + signal * np.eye(num_classes)[y]
    p = np.exp(logits)
    return p / p.sum(axis=1, keepdims=True)


def never_predict(p: np.ndarray, k: int) -> np.ndarray:
    """``p`` with class ``k`` scaled down until it is never the argmax, rows renormalized."""
    p = p.copy()
    p[:, k] *= 1e-3
    return p / p.sum(axis=1, keepdims=True)


def assert_matches_sklearn(y: np.ndarray, p: np.ndarray, labels_for_macro: list[int] | None):
    """Every label-based metric of ``classification_metrics`` against sklearn. ``labels_for_macro``
    None: sklearn infers the labels (the classes in y or in the predictions)."""
    num_classes = p.shape[1]
    names = [f"c{k}" for k in range(num_classes)]
    m = classification_metrics(y, p, names)
    pred = p.argmax(axis=1)
    every = list(range(num_classes))

    assert m.accuracy == pytest.approx(skm.accuracy_score(y, pred), abs=TOL)
    for avg in ("macro", "micro"):
        sk = skm.precision_recall_fscore_support(
            y, pred, labels=labels_for_macro, average=avg, zero_division=0
        )
        assert getattr(m, f"precision_{avg}") == pytest.approx(sk[0], abs=TOL), avg
        assert getattr(m, f"recall_{avg}") == pytest.approx(sk[1], abs=TOL), avg
        assert getattr(m, f"f1_{avg}") == pytest.approx(sk[2], abs=TOL), avg
    sk_p, sk_r, sk_f, sk_s = skm.precision_recall_fscore_support(
        y, pred, labels=every, average=None, zero_division=0
    )
    for k, row in enumerate(m.per_class):
        assert row.name == names[k]
        assert (row.precision, row.recall, row.f1) == pytest.approx(
            (sk_p[k], sk_r[k], sk_f[k]), abs=TOL
        )
        assert row.support == sk_s[k]
    np.testing.assert_array_equal(m.confusion, skm.confusion_matrix(y, pred, labels=every))
    assert m.log_loss == pytest.approx(skm.log_loss(y, p, labels=every), abs=TOL)
    return m


def test_five_classes_one_never_predicted():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 5, 120)
    p = never_predict(softmax_probs(y, 5, seed=1), 2)
    assert 2 in y and 2 not in p.argmax(axis=1)
    m = assert_matches_sklearn(y, p, labels_for_macro=None)
    # zero_division=0: precision of the never-predicted class is 0, and it still counts in macro
    assert m.per_class[2].precision == 0.0
    assert m.auroc_macro == pytest.approx(
        skm.roc_auc_score(y, p, multi_class="ovr", average="macro"), abs=TOL
    )
    for k, row in enumerate(m.per_class):
        assert row.auroc == pytest.approx(skm.roc_auc_score(y == k, p[:, k]), abs=TOL)
        assert m.pr[k].area == pytest.approx(skm.average_precision_score(y == k, p[:, k]), abs=TOL)


def test_binary():
    rng = np.random.default_rng(2)
    y = rng.integers(0, 2, 80)
    p = softmax_probs(y, 2, seed=3, signal=1.0)
    m = assert_matches_sklearn(y, p, labels_for_macro=None)
    # one-vs-rest over two classes is the binary AUROC twice
    assert m.auroc_macro == pytest.approx(skm.roc_auc_score(y, p[:, 1]), abs=TOL)
    assert m.per_class[0].auroc == pytest.approx(m.per_class[1].auroc, abs=TOL)


def test_class_absent_from_y_true():
    """Class 4 is in neither y nor the predictions: macro P/R/F1 leave it out (sklearn without
    labels=), its AUROC is None, and the macro AUROC averages the classes present, where sklearn's
    multiclass roc_auc_score raises (or returns NaN with labels=)."""
    rng = np.random.default_rng(4)
    y = rng.integers(0, 4, 100)
    p = never_predict(softmax_probs(y, 5, seed=5), 4)
    m = assert_matches_sklearn(y, p, labels_for_macro=None)
    assert m.per_class[4].support == 0
    assert m.per_class[4].auroc is None
    assert m.pr[4].area is None
    present = [skm.roc_auc_score(y == k, p[:, k]) for k in range(4)]
    assert m.auroc_macro == pytest.approx(float(np.mean(present)), abs=TOL)
    with pytest.raises(ValueError):
        skm.roc_auc_score(y, p, multi_class="ovr", average="macro")
    with pytest.warns(UndefinedMetricWarning):
        nan = skm.roc_auc_score(y, p, multi_class="ovr", average="macro", labels=list(range(5)))
    assert math.isnan(nan)


def test_auroc_undefined_everywhere_is_none():
    y = np.zeros(6, dtype=int)
    p = softmax_probs(y, 3, seed=6)
    m = classification_metrics(y, p, ["a", "b", "c"])
    assert m.auroc_macro is None
    assert all(row.auroc is None for row in m.per_class)
    json.dumps(m.to_dict(curves=True), allow_nan=False)


def test_ece_hand_computed():
    """Top-label confidences 0.95 (right), 0.95 (wrong), 0.7 x3 (right), 15 bins:
    bin [0.933, 1): acc 0.5, conf 0.95, weight 2/5 -> 0.18; bin [0.667, 0.733): acc 1, conf 0.7,
    weight 3/5 -> 0.18. ECE = 0.36."""
    p = np.array(
        [
            [0.95, 0.03, 0.02],
            [0.95, 0.03, 0.02],
            [0.10, 0.70, 0.20],
            [0.10, 0.70, 0.20],
            [0.20, 0.10, 0.70],
        ]
    )
    y = np.array([0, 1, 1, 1, 2])
    m = classification_metrics(y, p, ["a", "b", "c"])
    assert m.ece == pytest.approx(0.36, abs=TOL)
    bins = m.calibration
    assert bins.count.sum() == 5 and len(bins.count) == 15
    filled = bins.count > 0
    from_bins = np.sum(
        bins.count[filled] / 5 * np.abs(bins.accuracy[filled] - bins.confidence[filled])
    )
    assert from_bins == pytest.approx(0.36, abs=TOL)


def test_to_dict_is_plain_json():
    y = np.array([0, 1, 2, 2, 1, 0, 2])
    p = softmax_probs(y, 3, seed=7)
    m = classification_metrics(
        torch.tensor(y), torch.tensor(p, dtype=torch.float32), ["a", "b", "c"]
    )
    d = m.to_dict(curves=True)

    def check(x):
        if isinstance(x, dict):
            assert all(isinstance(k, str) for k in x)
            for v in x.values():
                check(v)
        elif isinstance(x, list):
            for v in x:
                check(v)
        else:
            assert x is None or type(x) in (str, int, float, bool), type(x)

    check(d)
    json.dumps(d, allow_nan=False)
    assert d["confusion_matrix"] == m.confusion.tolist()
    assert len(d["roc"]) == 3 and set(d["roc"][0]) == {"x", "y", "thresholds", "area"}
    assert set(m.headline()) == {"n", "accuracy", "f1_macro", "auroc_macro", "ece", "log_loss"}
    assert "roc" not in m.to_dict()
    # torchmetrics' float32 ratios are stored at their shortest decimal form: 17/20 is 0.85
    y20 = np.arange(20) % 2
    p20 = np.eye(2)[np.where(np.arange(20) < 17, y20, 1 - y20)] * 0.8 + 0.1
    assert classification_metrics(y20, p20, ["a", "b"]).accuracy == 0.85


@pytest.mark.parametrize(
    ("y", "p", "names", "match"),
    [
        ([0, 1], [[0.5, 0.5], [0.5, 0.5]], ["a"], "columns"),
        ([0, 2], [[0.5, 0.5], [0.5, 0.5]], ["a", "b"], "outside"),
        ([0, 1], [[2.0, -1.0], [0.5, 0.5]], ["a", "b"], "logits"),
        ([0, 1], [[0.6, 0.6], [0.5, 0.5]], ["a", "b"], "sum to 1"),
        ([0, 1], [[0.5, 0.5]], ["a", "b"], "shape"),
        ([0.5, 1], [[0.5, 0.5], [0.5, 0.5]], ["a", "b"], "integer"),
        ([], np.zeros((0, 2)), ["a", "b"], "non-empty"),
    ],
)
def test_bad_inputs(y, p, names, match):
    with pytest.raises(ValueError, match=match):
        classification_metrics(y, p, names)


def test_regression_matches_sklearn():
    rng = np.random.default_rng(8)
    t = rng.normal(size=50)
    pr = t + rng.normal(scale=0.5, size=50)
    m = regression_metrics(t, pr)
    assert m.mse == pytest.approx(skm.mean_squared_error(t, pr), abs=TOL)
    assert m.rmse == pytest.approx(skm.root_mean_squared_error(t, pr), abs=TOL)
    assert m.mae == pytest.approx(skm.mean_absolute_error(t, pr), abs=TOL)
    assert m.r2 == pytest.approx(skm.r2_score(t, pr), abs=TOL)
    json.dumps(m.to_dict(), allow_nan=False)
    assert set(m.headline()) == {"n", "rmse", "mae", "r2"}


def test_regression_multioutput_and_constant_target():
    rng = np.random.default_rng(9)
    t = rng.normal(size=(40, 3))
    pr = t + rng.normal(scale=0.3, size=(40, 3))
    m = regression_metrics(t, pr)
    assert m.mse == pytest.approx(skm.mean_squared_error(t, pr), abs=TOL)
    assert m.mae == pytest.approx(skm.mean_absolute_error(t, pr), abs=TOL)
    assert m.r2 == pytest.approx(skm.r2_score(t, pr), abs=TOL)
    assert regression_metrics(np.ones(5), np.arange(5.0)).r2 is None
    with pytest.raises(ValueError, match="shapes differ"):
        regression_metrics(t, pr[:, :2])


def fake_predictor(y: np.ndarray, num_classes: int = 3):
    """Right answers while "image" is kept; a fixed wrong class without it. Records the calls."""
    calls: list[set[str]] = []
    right = np.eye(num_classes)[y] * 0.9 + 0.1 / num_classes
    wrong = np.eye(num_classes)[(y + 1) % num_classes] * 0.9 + 0.1 / num_classes

    def predict(drop: set[str]) -> np.ndarray:
        calls.append(drop)
        return wrong if "image" in drop else right

    return predict, calls


def test_modality_ablation():
    y = np.array([0, 1, 2, 0, 1, 2])
    predict, calls = fake_predictor(y)
    rows = modality_ablation(predict, y, ["image", "text", "audio"])
    assert [r.name for r in rows] == [
        "all",
        "without image",
        "without text",
        "without audio",
        "only image",
        "only text",
        "only audio",
    ]
    by_name = {r.name: r for r in rows}
    assert by_name["all"].dropped == () and by_name["all"].delta == 0.0
    assert by_name["only text"].dropped == ("audio", "image")
    assert by_name["without image"].accuracy == 0.0 and by_name["without image"].delta == -1.0
    assert by_name["without text"].accuracy == 1.0 and by_name["without text"].macro_f1 == 1.0
    assert by_name["only image"].delta == 0.0 and by_name["only audio"].delta == -1.0
    assert all(isinstance(c, set) for c in calls) and len(calls) == 7
    json.dumps([r.to_dict() for r in rows], allow_nan=False)


def test_modality_ablation_reuses_equal_drop_sets_and_checks_metric():
    y = np.array([0, 1, 2, 0])
    predict, calls = fake_predictor(y)
    rows = modality_ablation(predict, y, ["image", "text"], metric="macro_f1")
    # with two modalities "only image" is "without text": three distinct predictions
    assert len(rows) == 5 and len(calls) == 3
    assert all(r.metric == "macro_f1" for r in rows)
    assert rows[1].delta == pytest.approx(rows[1].macro_f1 - rows[0].macro_f1)
    with pytest.raises(ValueError, match="metric"):
        modality_ablation(predict, y, ["image"], metric="auroc")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unique"):
        modality_ablation(predict, y, ["image", "image"])


def test_summarize_weights():
    w = np.array([[0.5, 0.5, 0.0], [0.2, 0.3, 0.5], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    s = summarize_weights(w, ["a", "b", "c"])
    assert s["a"] == pytest.approx(
        {"mean": np.mean([0.5, 0.2, 1.0]), "std": np.std([0.5, 0.2, 1.0]), "n": 3}
    )
    assert s["c"] == {"mean": 0.5, "std": 0.0, "n": 1}
    present = np.ones((4, 3), dtype=bool)
    assert summarize_weights(w, ["a", "b", "c"], present)["c"]["n"] == 4
    assert summarize_weights(w, ["a", "b", "c"], np.zeros((4, 3), bool))["a"] == {
        "mean": None,
        "std": None,
        "n": 0,
    }
    with pytest.raises(ValueError, match="shape"):
        summarize_weights(w, ["a", "b"])


def open_png(path) -> tuple[int, int]:
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert im.format == "PNG"
        return im.size


def test_classification_report(tmp_path):
    names = ["cat", "<script>alert(1)</script>", "a|b", "price $5"]
    rng = np.random.default_rng(10)
    y = rng.integers(0, 4, 60)
    p = softmax_probs(y, 4, seed=11)
    m = classification_metrics(y, p, names)
    predict, _ = fake_predictor(y, 4)
    rows = modality_ablation(predict, y, ["image", "text"])
    weights = summarize_weights(rng.dirichlet([2, 1], size=60), ["image", "text"])
    examples = [{"id": 1, "true": names[1], "confidence": 0.25}, {"id": 2, "note": "<b>x</b>"}]
    out = tmp_path / "report"
    html_path = write_report(
        out,
        "Eval <i>run</i>",
        m,
        rows,
        weights,
        extra={"config": {"lr": 0.1}, "bad": float("nan")},
        examples=examples,
    )
    assert html_path == out / "report.html"
    pngs = {
        "confusion_matrix.png",
        "roc_curves.png",
        "pr_curves.png",
        "reliability.png",
        "per_class_f1.png",
        "ablation.png",
        "fusion_weights.png",
    }
    assert {f.name for f in out.iterdir()} == pngs | {"report.md", "report.html", "metrics.json"}
    for name in pngs:
        width, height = open_png(out / name)
        assert 300 <= width <= 4000 and 150 <= height <= 4000, (name, width, height)

    page = html_path.read_text(encoding="utf-8")
    assert "<script" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "&lt;b&gt;x&lt;/b&gt;" in page and "<i>run</i>" not in page
    for name in pngs:
        assert f'src="{name}"' in page
    md = (out / "report.md").read_text(encoding="utf-8")
    assert "<script" not in md and "a\\|b" in md and f"({'confusion_matrix.png'})" in md

    data = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    assert data["metrics"]["class_names"] == names
    assert data["headline"]["accuracy"] == m.accuracy
    assert len(data["ablation"]) == 5 and data["fusion_weights"]["image"]["n"] == 60
    assert data["extra"] == {"config": {"lr": 0.1}, "bad": None}


def test_report_many_classes_and_regression(tmp_path):
    names = [f"class number {k}" for k in range(40)]
    y = np.arange(200) % 40
    m = classification_metrics(y, softmax_probs(y, 40, seed=12, signal=3.0), names)
    write_report(tmp_path / "many", "Many classes", m)
    width, height = open_png(tmp_path / "many" / "confusion_matrix.png")
    assert width > 1000 and height > 1000

    rng = np.random.default_rng(13)
    t = rng.normal(size=100)
    r = regression_metrics(t, t + rng.normal(scale=0.2, size=100))
    out = tmp_path / "reg"
    write_report(out, "Regression", r)
    assert {f.name for f in out.iterdir()} == {
        "regression_scatter.png",
        "residuals.png",
        "report.md",
        "report.html",
        "metrics.json",
    }
    for name in ("regression_scatter.png", "residuals.png"):
        width, height = open_png(out / name)
        assert width >= 300 and height >= 200
    assert json.loads((out / "metrics.json").read_text())["metrics"]["r2"] == pytest.approx(r.r2)
    assert math.isfinite(r.r2)
