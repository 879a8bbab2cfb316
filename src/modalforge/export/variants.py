"""ONNX variants of a classifier or a contrastive model: one graph per encoder plus the fusion
head (or each tower's projection), checked against PyTorch on held-out rows before they are
added; with ``quantize``, int8 encoder graphs chosen per encoder under the gate.

    info = export_fused("runs/demo/bundle", manifest, label="category")   # adds "onnx"
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from modalforge.export.onnx import encoder_file
from modalforge.export.parity import GATES, Gate, ParityGateError, compare, gate, request_fields


def _examples(engine, manifest) -> dict[str, dict]:
    """Per input column, a collated batch of 3 real rows holding it (placeholders if fewer)."""
    out = {}
    rows = manifest.frame.to_dict("records") if manifest is not None else []
    for column in engine.inputs:
        items = []
        for row in rows:
            fields = request_fields(engine, manifest, row)
            if column.name in fields:
                items.append(engine.decode({column.name: fields[column.name]}).values[column.name])
            if len(items) == 3:
                break
        featurizer = engine.featurizers[column.name]
        while len(items) < 3:
            items.append(featurizer.placeholder())
        out[column.name] = featurizer.collate(items)
    return out


#: what ``--quantize`` tries per encoder graph (the fastest that passes the check is kept)
SCHEMES = {
    "int8": ("dynamic", "static-qdq", "static-corrected", "static-products"),
    "int8-dynamic": ("dynamic",),
    "int8-static": ("static-qdq", "static-corrected", "static-products"),
}
#: per-encoder check: the worst per-row cosine of pooled features vs fp32 (the whole variant
#: then has to pass the int8 gate on macro-F1)
MIN_COSINE = 0.94


def _encoder_feeds(engine, column: str, items: list, batch: int) -> list[dict]:
    """The ONNX inputs of ``column``'s encoder graph for ``items`` (decoded values)."""
    import torch

    from modalforge.runtime.onnx import OrtEncoder

    encoder = engine.model.encoder(column)
    if isinstance(encoder, OrtEncoder):  # it wraps the torch one, whose prepare() we want
        encoder = encoder.encoder
    featurizer = engine.featurizers[column]
    feeds = []
    for start in range(0, len(items), batch):
        collated = featurizer.collate(items[start : start + batch])
        with torch.no_grad():
            features = encoder.prepare(collated)
        feeds.append({k: v.detach().cpu().numpy() for k, v in features.items()})
    return feeds


def _candidates(fp32: Path, schemes: tuple[str, ...], calibration: list[dict]) -> dict[str, Path]:
    from modalforge.export import quantize as q

    out = {}
    for scheme in schemes:
        dst = fp32.with_name(f"{fp32.stem}.{scheme}.onnx")
        if scheme == "dynamic":
            out[scheme] = q.quantize_dynamic_int8(fp32, dst, per_channel=True)
        elif scheme == "static-qdq":
            # percentile clipping kept EfficientNet closest to fp32 (worst cosine 0.965 vs
            # 0.947 for min-max), but ORT's histogram calibrators need one shape per input
            shapes = {tuple((k, v.shape) for k, v in sorted(f.items())) for f in calibration}
            method = "percentile" if len(shapes) == 1 else "minmax"
            out[scheme] = q.quantize_static_int8(
                fp32, dst, calibration, per_channel=True, method=method
            )
        elif scheme == "static-corrected":  # CNNs: stem in fp32 + bias correction
            if _conv_count(fp32) < 6:
                continue
            out[scheme] = q.quantize_static_corrected(fp32, dst, calibration)
        else:  # constant-weight products only: what transformers tolerate
            out[scheme] = q.quantize_static_int8(
                fp32, dst, calibration, per_channel=True, method="minmax",
                op_types=("MatMul", "Gemm", "Conv", "Gather"),
                extra_options={"MatMulConstBOnly": True},
            )  # fmt: skip
    return out


def _conv_count(path: Path) -> int:
    import onnx

    return sum(
        n.op_type == "Conv" for n in onnx.load(str(path), load_external_data=False).graph.node
    )


def quantize_encoders(
    reference, info: dict, root: Path, scheme: str, calibration_rows, check_rows
) -> tuple[dict[str, list[dict]], dict[str, Any]]:
    """Int8 candidates of every encoder graph, timed at batch 1 and 8 on held-out rows and
    checked against fp32 (worst per-row cosine of pooled features >= MIN_COSINE). Returns, per
    column, the options in order of preference -- passing candidates, fastest first, except that
    one within 5 % of the fastest wins if it is closer to fp32 -- ending with fp32 itself, and
    the per-column reports."""
    from modalforge.export.timing import choose_scheme

    def items(rows, column):
        out = []
        for row in rows.frame.to_dict("records"):
            fields = request_fields(reference, rows, row)
            if column in fields:
                out.append(reference.decode({column: fields[column]}).values[column])
            if len(out) == 32:
                break
        return out

    def check(got, want):
        got, want = got.reshape(len(got), -1), want.reshape(len(want), -1)
        norms = np.linalg.norm(got, axis=1) * np.linalg.norm(want, axis=1) + 1e-12
        return bool(((got * want).sum(1) / norms).min() >= MIN_COSINE)

    options, reports = {}, {}
    for column, spec in info["encoders"].items():
        fp32 = {"scheme": None, "path": root / spec["file"], "speedup": 1.0, "min_cosine": 1.0}
        checks = items(check_rows, column)
        if not checks:
            options[column] = [fp32]
            reports[column] = {"chosen": None, "reason": "no held-out rows with this input"}
            continue
        # no calibration rows with this input: calibrate on the held-out ones
        calibration_items = items(calibration_rows, column) or checks
        calibration = _encoder_feeds(reference, column, calibration_items, 8)
        feeds = _encoder_feeds(reference, column, checks[:1], 1)
        feeds += _encoder_feeds(reference, column, checks[:8], 8)
        logging.disable(logging.WARNING)  # ORT's quantizer logs a line per odd weight
        try:
            # ORT's quantizers leave <uuid>.data files (external weights of big models) in the
            # working directory: keep them in the export's temporary folder
            with contextlib.chdir(root):
                candidates = _candidates(fp32["path"], SCHEMES[scheme], calibration)
            _, report = choose_scheme(fp32["path"], candidates, feeds, None, check, repeats=10)
        finally:
            logging.disable(logging.NOTSET)
        passing = [
            {"scheme": n, "path": Path(candidates[n]), "speedup": r["speedup"],
             "min_cosine": r["min_cosine"]}
            for n, r in report["candidates"].items()
            # a "quantized" graph about as big as fp32 quantized nothing (dynamic int8 of a CNN)
            if r["passed"] and r["size_ratio"] < 0.9
        ]  # fmt: skip
        passing.sort(key=lambda o: -o["speedup"])
        if passing:
            near = [o for o in passing if o["speedup"] >= 0.95 * passing[0]["speedup"]]
            best = max(near, key=lambda o: o["min_cosine"])
            passing.remove(best)
            passing.insert(0, best)
        for row in (report["fp32"], *report["candidates"].values()):
            row.pop("path", None)
        options[column] = [*passing, fp32]
        reports[column] = report
    return options, reports


def _apply(info: dict, files: dict, root: Path, choice: dict[str, dict]) -> None:
    """Point ``info`` / ``files`` at the chosen graph of every encoder."""
    for column, option in choice.items():
        spec = info["encoders"][column]
        fp32_name = encoder_file(column)
        for name in (fp32_name, fp32_name.replace(".onnx", ".int8.onnx")):
            files.pop(name, None)
        name = fp32_name if option["scheme"] is None else fp32_name.replace(".onnx", ".int8.onnx")
        if option["scheme"] is not None:
            shutil.copyfile(option["path"], root / name)
        files[name] = root / name
        spec.update(file=name, quantization=option["scheme"])


def export_fused(bundle: str | Path, manifest, label: str | None = None, name: str = "onnx",
                 rule: Gate | None = None, overwrite: bool = False, quantize: str | None = None,
                 calibration=None) -> dict[str, Any]:  # fmt: skip
    """A classifier's ONNX variant (encoders + fusion head); ``rule`` defaults to the fp32 gate,
    with ``quantize`` the int8 gate (see ``export_bundle``)."""
    from modalforge.export import onnx as onnx_export
    from modalforge.runtime.onnx import OrtModel

    rule = rule or GATES["int8" if quantize else "fp32"]
    return _export(bundle, manifest, label, name, rule, overwrite, quantize, calibration,
                   onnx_export.export_onnx, OrtModel)  # fmt: skip


def export_towers(bundle: str | Path, manifest, label: str | None = None, name: str = "onnx",
                  rule: Gate | None = None, overwrite: bool = False, quantize: str | None = None,
                  calibration=None) -> dict[str, Any]:  # fmt: skip
    """A contrastive model's ONNX variant (each tower's encoder + projection), gated on the
    embeddings (``GATES["embeddings"]``)."""
    from modalforge.export import onnx as onnx_export
    from modalforge.runtime.onnx import OrtTowers

    if quantize:
        raise ValueError("--quantize: int8 towers of a contrastive bundle are not offered yet")
    rule = rule or GATES["embeddings"]
    return _export(bundle, manifest, label, name, rule, overwrite, None, None,
                   onnx_export.export_towers_onnx, OrtTowers)  # fmt: skip


def _export(bundle, manifest, label, name: str, rule: Gate, overwrite: bool, quantize,
            calibration, write_graphs, runtime_model) -> dict[str, Any]:  # fmt: skip
    """Write the graphs (``write_graphs``), run them as ``runtime_model`` beside PyTorch on
    ``manifest``, gate, add."""
    from modalforge.bundle import add_variant
    from modalforge.runtime.engine import Engine
    from modalforge.tasks import load

    if quantize is not None and quantize not in SCHEMES:
        raise ValueError(f"quantize must be one of {sorted(SCHEMES)}, not {quantize!r}")
    predictor = load(bundle)
    reference = Engine(predictor, device="cpu")
    reference.tune()
    with tempfile.TemporaryDirectory(prefix="modalforge-export-") as tmp:
        root = Path(tmp)
        start = time.perf_counter()
        files, info = write_graphs(predictor.model, _examples(reference, manifest), root)
        options: dict[str, list[dict]] = {}
        if quantize:
            rows = calibration if calibration is not None else manifest
            options, reports = quantize_encoders(reference, info, root, quantize, rows, manifest)
            info["format"] = "onnx-int8"
            info["quantization"] = {"scheme": quantize, "min_cosine": MIN_COSINE,
                                    "encoders": reports, "tried": []}  # fmt: skip
        info["export_seconds"] = round(time.perf_counter() - start, 2)
        choice = {column: opts[0] for column, opts in options.items()}
        while True:
            _apply(info, files, root, choice)
            model = runtime_model(predictor.model, root, info)
            candidate = Engine(predictor, device="cpu", variant=name, model=model)
            result = compare(reference, candidate, manifest, label)
            problems = gate(result, rule)
            if quantize:
                info["quantization"]["tried"].append(
                    {"encoders": {c: o["scheme"] for c, o in choice.items()},
                     "f1_macro_drop": result.get("f1_macro_drop"), "passed": not problems}
                )  # fmt: skip
            movable = [c for c, o in choice.items() if o is not options[c][-1]]
            if not problems or not movable:
                break
            worst = min(movable, key=lambda c: choice[c]["min_cosine"])
            following = options[worst][options[worst].index(choice[worst]) + 1 :]
            choice[worst] = next((o for o in following
                                  if o["min_cosine"] > choice[worst]["min_cosine"]),
                                 options[worst][-1])  # fmt: skip
        for column, option in choice.items():  # what the variant uses, after any fall-back
            info["quantization"]["encoders"][column]["chosen"] = option["scheme"]
        info["parity"] = {**result, "gate": asdict(rule), "passed": not problems}
        if problems:
            raise ParityGateError(name, problems, result, info)
        # each variant's files live in their own folder of the bundle
        files = {f"{name}/{k}": v for k, v in files.items()}
        graphs = [info["head"]] if "head" in info else []
        for spec in (*info["encoders"].values(), *info.get("projections", {}).values(), *graphs):
            spec["file"] = f"{name}/{spec['file']}"
        add_variant(bundle, name, files, info, overwrite=overwrite)
    return info


__all__ = ["MIN_COSINE", "SCHEMES", "export_fused", "export_towers", "quantize_encoders"]
