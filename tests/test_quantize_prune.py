"""Int8 variants of ONNX graphs (dynamic, static QDQ, the fastest passing one) and magnitude
pruning, on tiny models built here."""

import warnings

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from torch import nn

from modalforge.export.prune import magnitude_prune, make_permanent, sparsity_report
from modalforge.export.quantize import (
    bias_correct,
    choose_scheme,
    cpu_session,
    measure,
    quantization_info,
    quantize_dynamic_int8,
    quantize_static_corrected,
    quantize_static_int8,
    stem_nodes,
    torch_dynamic_int8,
)


def export(model: nn.Module, example: torch.Tensor, path):
    """``model`` to ONNX with the dynamo exporter, the batch axis dynamic, input "x"."""
    auto = torch.export.Dim.AUTO
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(model.eval(), (example,), input_names=["x"],
                                    output_names=["y"], dynamic_shapes=({0: auto},),
                                    dynamo=True, verbose=False)  # fmt: skip
        program.save(str(path), external_data=False)
    return path


def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(),
                         nn.Linear(256, 64)).eval()  # fmt: skip


def convnet(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.ReLU(),  # depthwise
        nn.Conv2d(16, 32, 1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 24),
    ).eval()  # fmt: skip


def cosine_rows(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def run(path, x):
    return cpu_session(path).run(None, {"x": x})[0]


def feeds(shape, n, seed=0):
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal(shape).astype(np.float32)} for _ in range(n)]


@pytest.fixture(scope="module")
def mlp_onnx(tmp_path_factory):
    return export(mlp(), torch.randn(4, 64), tmp_path_factory.mktemp("mlp") / "mlp.onnx")


@pytest.fixture(scope="module")
def conv_onnx(tmp_path_factory):
    path = tmp_path_factory.mktemp("conv") / "conv.onnx"
    return export(convnet(), torch.randn(2, 3, 16, 16), path)


# --------------------------------------------------------------------------- ONNX int8


def test_dynamic_int8_shrinks_an_mlp_and_stays_close(mlp_onnx, tmp_path):
    assert {n.op_type for n in onnx.load(str(mlp_onnx)).graph.node} >= {"Gemm"}  # 2-D linears
    dst = quantize_dynamic_int8(mlp_onnx, tmp_path / "dyn.onnx")
    ops = {n.op_type for n in onnx.load(str(dst)).graph.node}
    assert "MatMulInteger" in ops and "Gemm" not in ops  # rewritten, then quantized
    assert dst.stat().st_size <= 0.35 * mlp_onnx.stat().st_size
    info = quantization_info(dst)
    assert info["scheme"] == "dynamic" and info["per_channel"] and info["gemm_rewritten"] == 3
    assert info["pre_process"] == "ok"
    x = feeds((16, 64), 1, seed=5)[0]["x"]
    got, want = run(dst, x), run(mlp_onnx, x)
    assert got.shape == want.shape and cosine_rows(got, want).min() > 0.99
    per_tensor = quantize_dynamic_int8(mlp_onnx, tmp_path / "dyn-pt.onnx", per_channel=False)
    assert cosine_rows(run(per_tensor, x), want).min() > 0.98


@pytest.mark.parametrize("method", ["minmax", "entropy", "percentile"])
def test_static_int8_is_qdq_and_stays_close(mlp_onnx, tmp_path, method):
    dst = quantize_static_int8(mlp_onnx, tmp_path / "static.onnx", feeds((8, 64), 8),
                               method=method)  # fmt: skip
    ops = [n.op_type for n in onnx.load(str(dst)).graph.node]
    assert "QuantizeLinear" in ops and "DequantizeLinear" in ops
    info = quantization_info(dst)
    assert info["scheme"] == "static-qdq" and info["method"] == method
    assert info["calibration_batches"] == 8
    assert dst.stat().st_size <= 0.4 * mlp_onnx.stat().st_size
    x = feeds((16, 64), 1, seed=5)[0]["x"]
    assert cosine_rows(run(dst, x), run(mlp_onnx, x)).min() > 0.98


def test_static_int8_of_a_convnet(conv_onnx, tmp_path):
    calibration = (f for f in feeds((4, 3, 16, 16), 8))  # any iterable, consumed once
    dst = quantize_static_int8(conv_onnx, tmp_path / "conv-int8.onnx", calibration)
    ops = {n.op_type for n in onnx.load(str(dst)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "Conv"} <= ops
    x = feeds((3, 3, 16, 16), 1, seed=9)[0]["x"]  # another batch size
    got, want = run(dst, x), run(conv_onnx, x)
    assert got.shape == (3, 24) and cosine_rows(got, want).min() > 0.98
    with pytest.raises(ValueError, match="method"):
        quantize_static_int8(conv_onnx, tmp_path / "x.onnx", feeds((1, 3, 16, 16), 1),
                             method="mse")  # fmt: skip
    with pytest.raises(ValueError, match="empty"):
        quantize_static_int8(conv_onnx, tmp_path / "y.onnx", [])


def test_a_failing_pre_process_falls_back_to_the_raw_model(mlp_onnx, tmp_path, monkeypatch):
    import onnxruntime.quantization.shape_inference as shape_inference

    def broken(*args, **kwargs):
        raise RuntimeError("symbolic shape inference gave up")

    real = shape_inference.quant_pre_process

    def no_symbolic(src, dst, skip_symbolic_shape=False, **kwargs):
        if not skip_symbolic_shape:
            raise RuntimeError("Incomplete symbolic shape inference")
        return real(src, dst, skip_symbolic_shape=True, **kwargs)

    monkeypatch.setattr(shape_inference, "quant_pre_process", no_symbolic)
    dst = quantize_dynamic_int8(mlp_onnx, tmp_path / "retried.onnx")
    assert quantization_info(dst)["pre_process"].startswith("ok without symbolic shape")
    monkeypatch.setattr(shape_inference, "quant_pre_process", broken)
    dst = quantize_dynamic_int8(mlp_onnx, tmp_path / "dyn.onnx")
    assert quantization_info(dst)["pre_process"].startswith("failed: RuntimeError: symbolic")
    x = feeds((4, 64), 1)[0]["x"]
    assert cosine_rows(run(dst, x), run(mlp_onnx, x)).min() > 0.99
    assert quantization_info(mlp_onnx) is None


def test_measure_reports_latencies_and_size(mlp_onnx, tmp_path):
    sets = [feeds((1, 64), 1)[0], feeds((32, 64), 1)[0]]
    report = measure(mlp_onnx, sets, repeats=5)
    assert report["bytes"] == mlp_onnx.stat().st_size
    assert [row["shapes"] for row in report["latency"]] == [{"x": [1, 64]}, {"x": [32, 64]}]
    for row in report["latency"]:
        assert 0 < row["min_ms"] <= row["median_ms"] <= row["p99_ms"] and row["repeats"] == 5
    # a model with its weights in an external data file counts that file too
    model = onnx.load(str(mlp_onnx))
    external = tmp_path / "ext.onnx"
    onnx.save(model, str(external), save_as_external_data=True, location="ext.onnx.data",
              size_threshold=0)  # fmt: skip
    report = measure(external, sets[:1], repeats=2)
    data = tmp_path / "ext.onnx.data"
    assert report["bytes"] == external.stat().st_size + data.stat().st_size
    assert report["files"] == [str(external), str(data)] and data.stat().st_size > 390_000


def negated(src, dst):
    """``src`` with its first weight negated: a wrong model that runs fine."""
    model = onnx.load(str(src))
    init = next(i for i in model.graph.initializer if len(i.dims) == 2)
    init.CopyFrom(numpy_helper.from_array(-numpy_helper.to_array(init), init.name))
    onnx.save(model, str(dst))
    return dst


def test_choose_scheme_picks_the_fastest_passing_candidate(mlp_onnx, tmp_path):
    calibration = feeds((8, 64), 4)
    candidates = {
        "dynamic": quantize_dynamic_int8(mlp_onnx, tmp_path / "dyn.onnx"),
        "static": quantize_static_int8(mlp_onnx, tmp_path / "static.onnx", calibration),
        "wrong": negated(mlp_onnx, tmp_path / "wrong.onnx"),
        "missing": tmp_path / "missing.onnx",
    }
    sets = [feeds((1, 64), 1, seed=3)[0], feeds((16, 64), 1, seed=4)[0]]
    refs = [run(mlp_onnx, f["x"]) for f in sets]

    def close(got, want):
        return cosine_rows(got, want).min() > 0.99

    name, report = choose_scheme(mlp_onnx, candidates, sets, refs, close, repeats=5,
                                 min_speedup=0.0)  # fmt: skip
    rows = report["candidates"]
    assert rows["wrong"]["passed"] is False and "parity" in rows["wrong"]["reason"]
    assert rows["wrong"]["min_cosine"] < 0.99
    assert rows["missing"]["passed"] is False and "does not run" in rows["missing"]["reason"]
    assert rows["dynamic"]["passed"] and rows["static"]["passed"]
    assert name == max(("dynamic", "static"), key=lambda n: rows[n]["speedup"])
    assert report["chosen"] == name and name in report["reason"]
    for n in ("dynamic", "static"):
        assert rows[n]["size_ratio"] < 0.4 and rows[n]["min_cosine"] > 0.99
        assert rows[n]["max_abs"] < 0.05 and len(rows[n]["latency"]) == 2
    assert len(report["fp32"]["latency"]) == 2

    # a gate nobody passes; references computed from fp32 when not given
    name, report = choose_scheme(mlp_onnx, {"dynamic": candidates["dynamic"]}, sets, None,
                                 lambda got, want: False, repeats=2)  # fmt: skip
    assert name is None and "no candidate passed" in report["reason"]
    # fast enough is part of passing
    name, report = choose_scheme(mlp_onnx, {"static": candidates["static"]}, sets, refs, close,
                                 repeats=2, min_speedup=1e6)  # fmt: skip
    assert name is None and "speedup" in report["candidates"]["static"]["reason"]


def test_torch_dynamic_int8_is_close_and_leaves_the_original_alone():
    model = mlp()
    quantized = torch_dynamic_int8(model)
    assert isinstance(model[0], nn.Linear) and type(quantized[0]) is not nn.Linear
    x = torch.randn(16, 64)
    with torch.no_grad():
        want = model(x).numpy()
        got = quantized(x).numpy()
    assert cosine_rows(got, want).min() > 0.99


# --------------------------------------------------------------------------- pruning


def mixed(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3), nn.Conv2d(16, 16, 3, groups=16), nn.Conv1d(4, 8, 3),
        nn.Linear(64, 128), nn.Linear(128, 32),
    )  # fmt: skip


def clean_state(model):
    keys = list(model.state_dict())
    return not any(k.endswith(("_orig", "_mask")) for k in keys)


def test_unstructured_pruning_hits_the_global_sparsity():
    model = mixed()
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    report = magnitude_prune(model, 0.6)
    assert abs(report["global"]["sparsity"] - 0.6) < 0.01
    assert {k: v.shape for k, v in model.state_dict().items()} == shapes
    assert clean_state(model) and all(type(p) is nn.Parameter for p in model.parameters())
    assert set(report["layers"]) == {"0", "1", "2", "3", "4"}  # depthwise included
    again = sparsity_report(model)
    assert again["global"] == report["global"] and again["layers"] == report["layers"]
    zeros = sum(int((m.weight == 0).sum()) for m in model)
    assert report["global"]["zeros"] == zeros
    assert report["model"]["params"] == sum(p.numel() for p in model.parameters())
    assert all(int((m.bias == 0).sum()) == 0 for m in model)  # biases untouched


def test_structured_pruning_zeros_whole_output_rows():
    model = mixed()
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    report = magnitude_prune(model, 0.5, structured=True)
    assert {k: v.shape for k, v in model.state_dict().items()} == shapes and clean_state(model)
    assert report["pruning"]["layers_pruned"] == ["0", "2", "3", "4"]  # not the depthwise conv
    for name, layer in model.named_children():
        rows = layer.weight.detach().reshape(layer.weight.shape[0], -1)
        zero_rows = int((rows == 0).all(1).sum())
        assert report["layers"][name]["zero_rows"] == zero_rows
        if name == "1":
            assert zero_rows == 0 and report["layers"][name]["zeros"] == 0
        else:
            assert zero_rows == round(0.5 * rows.shape[0])
            # a row is pruned whole or not at all
            assert int((rows == 0).sum()) == zero_rows * rows.shape[1]
    assert sparsity_report(model)["layers"] == report["layers"]


def test_masks_kept_through_a_fine_tune_then_folded():
    model = mixed()
    report = magnitude_prune(model, 0.5, skip=("4",), permanent=False)
    assert "4" not in report["layers"] and report["layers"]["3"]["zeros"] > 0
    assert not clean_state(model)  # masks attached while fine-tuning
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    before = sparsity_report(model, skip=("4",))["global"]["zeros"]
    model[3](torch.randn(2, 64)).pow(2).sum().backward()
    optimizer.step()
    model[3](torch.randn(2, 64))  # the weight is recomputed from orig * mask
    assert sparsity_report(model, skip=("4",))["global"]["zeros"] == before
    assert make_permanent(model) == 4 and clean_state(model)
    assert sparsity_report(model, skip=("4",))["global"]["zeros"] == before
    with pytest.raises(ValueError, match="amount"):
        magnitude_prune(model, 1.0)


def test_bias_correction_removes_the_mean_shift_of_rounded_weights(conv_onnx, tmp_path):
    """After correction, a graph whose convolutions use int8-rounded weights has (about) the
    fp32 graph's mean output; without it, the rounding shifts the mean."""
    calibration = feeds((8, 3, 16, 16), 4)
    corrected = bias_correct(conv_onnx, tmp_path / "bc.onnx", calibration)

    def rounded(src, dst):  # every conv weight rounded as symmetric per-channel int8 does
        model = onnx.load(str(src))
        convs = {n.input[1] for n in model.graph.node if n.op_type == "Conv"}
        for init in model.graph.initializer:
            if init.name in convs:
                w = numpy_helper.to_array(init)
                s = np.abs(w).reshape(len(w), -1).max(1).reshape(-1, 1, 1, 1) / 127
                init.CopyFrom(
                    numpy_helper.from_array((np.round(w / s) * s).astype(np.float32), init.name)
                )
        onnx.save(model, str(dst))
        return dst

    x = np.concatenate([f["x"] for f in calibration])
    want = run(conv_onnx, x).mean(0)
    plain = run(rounded(conv_onnx, tmp_path / "r.onnx"), x).mean(0)
    fixed = run(rounded(corrected, tmp_path / "rbc.onnx"), x).mean(0)
    assert np.abs(fixed - want).mean() < 0.5 * np.abs(plain - want).mean()


def test_static_corrected_keeps_the_stem_in_fp32(tmp_path):
    torch.manual_seed(0)
    layers = [nn.Conv2d(3, 8, 3, padding=1), nn.ReLU6()]
    for _ in range(6):
        layers += [
            nn.Conv2d(8, 8, 3, padding=1, groups=8),
            nn.ReLU6(),
            nn.Conv2d(8, 8, 1),
            nn.ReLU6(),
        ]
    net = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten()).eval()
    src = export(net, torch.randn(2, 3, 16, 16), tmp_path / "cnn.onnx")
    dst = quantize_static_corrected(src, tmp_path / "cnn-int8.onnx", feeds((4, 3, 16, 16), 6))
    graph = onnx.load(str(dst)).graph
    stem = [n for n in graph.node if n.op_type == "Conv"][:3]
    produced_by_dq = {o for n in graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    assert all(n.input[0] not in produced_by_dq for n in stem)  # the stem reads float inputs
    assert sum(n.op_type == "QuantizeLinear" for n in graph.node) > 5
    x = feeds((5, 3, 16, 16), 1, seed=4)[0]["x"]
    assert cosine_rows(run(dst, x), run(src, x)).min() > 0.98
    assert (
        stem_nodes(src, 3)[-1]
        == [n.name for n in onnx.load(str(src)).graph.node if n.op_type == "Conv"][2]
    )
