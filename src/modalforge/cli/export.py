"""`modalforge export` and `bench`: checked variants of a bundle, and what they cost."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from modalforge.cli._common import _split_rows, console, err_console, fail
from modalforge.files import atomic_write_json


def export(
    bundle: Annotated[Path, typer.Argument(help="A bundle folder (RUN/bundle).")],
    manifest: Annotated[
        Path,
        typer.Option(
            help="Held-out rows to check the variant on (with the bundle's inputs and, "
            "for the metric deltas, its label column)."
        ),
    ],
    format: Annotated[str, typer.Option("--format", help="onnx (the only one so far).")] = "onnx",
    split: Annotated[
        str | None, typer.Option(help="Only rows whose split column is this ('' = all rows).")
    ] = "test",
    name: Annotated[str | None, typer.Option(help="Variant name (default: the format).")] = None,
    max_rows: Annotated[int, typer.Option(help="Check at most this many rows.")] = 2000,
    overwrite: Annotated[bool, typer.Option(help="Replace a variant of the same name.")] = False,
    quantize: Annotated[
        str | None,
        typer.Option(
            help="int8 (per encoder, the fastest of dynamic / static QDQ / static "
            "weight-products-only that keeps its features), int8-dynamic, int8-static. "
            "Gate: macro-F1 may drop at most 1 point."
        ),
    ] = None,
    calibration: Annotated[
        Path | None,
        typer.Option(
            help="Rows to calibrate static int8 on (default: --manifest's train "
            "split, else its checked rows)."
        ),
    ] = None,
    prune: Annotated[
        float | None,
        typer.Option(
            help="Instead of ONNX: magnitude-prune this share (0-1) of each encoder's and the "
            "fusion's weights, fine-tune on --manifest's train/val rows, add variant 'pruned' "
            "(PyTorch weights). Gate: macro-F1 may drop at most 1 point."
        ),
    ] = None,
    structured: Annotated[
        bool, typer.Option(help="With --prune: zero whole output channels (L2) per layer.")
    ] = False,
    finetune_epochs: Annotated[
        int, typer.Option(help="With --prune: epochs of fine-tuning with the zeros kept.")
    ] = 3,
    distill_into: Annotated[
        Path | None,
        typer.Option(
            help="Instead of ONNX: train the student this run config (train's YAML) "
            "describes on --manifest's train/val rows against the bundle's soft targets, add "
            "variant 'distilled'. Gate: macro-F1 may drop at most 5 points."
        ),
    ] = None,
    temperature: Annotated[float, typer.Option(help="With --distill-into: softmax T.")] = 2.0,
    alpha: Annotated[
        float, typer.Option(help="With --distill-into: weight of the soft-target loss.")
    ] = 0.5,
    max_f1_drop: Annotated[
        float | None,
        typer.Option(help="Override the gate: macro-F1 points (0.01 = 1) the variant may lose."),
    ] = None,
) -> None:
    """Add a checked variant to a bundle: ONNX (one graph per encoder + the fusion head,
    presence masks as inputs, dynamic batch; --quantize for int8), a pruned copy (--prune) or a
    distilled student (--distill-into). Every variant is compared with the PyTorch model on
    held-out rows (--manifest's --split rows); the command fails, adding nothing, when an fp32
    variant's predictions agree on fewer than 99.9 % of them, or an int8 or pruned variant
    loses more than 1 point of macro-F1 (a distilled one 5). Serve any variant with
    `modalforge serve BUNDLE --variant NAME`.
    """
    from modalforge.bundle import BundleError
    from modalforge.data.manifest import read_manifest
    from modalforge.export import ParityGateError, export_bundle
    from modalforge.export.compress import distill_bundle, prune_bundle
    from modalforge.export.parity import GATES, Gate

    if format != "onnx":
        fail(f"unknown --format {format!r}: onnx is the one export format so far")
    modes = [o for o, v in (("--quantize", quantize), ("--prune", prune),
                            ("--distill-into", distill_into)) if v is not None]  # fmt: skip
    if len(modes) > 1:
        fail(f"{' and '.join(modes)}: one kind of variant per export")
    kind = "int8" if quantize else "pruned" if prune is not None else (
        "distilled" if distill_into else "fp32")  # fmt: skip
    variant_name = name or {"fp32": format}.get(kind, kind)
    rule = None if max_f1_drop is None else Gate(max_f1_drop=max_f1_drop)
    if rule is None and kind != "fp32":
        rule = GATES[kind]
    try:
        rows = _split_rows(manifest, split)
        rows = rows.subset(range(min(max_rows, len(rows))))
        if len(rows) == 0:
            fail("no rows to check the variant on")
        meta = json.loads((bundle / "modalforge.json").read_text())
        with console.status(f"exporting {bundle} ({variant_name}), checking {len(rows)} rows ..."):
            if prune is not None:
                info = prune_bundle(bundle, read_manifest(manifest), rows, prune, structured,
                                    finetune_epochs, name=variant_name, rule=rule,
                                    overwrite=overwrite)  # fmt: skip
            elif distill_into is not None:
                info = distill_bundle(bundle, distill_into, read_manifest(manifest), rows,
                                      temperature, alpha, name=variant_name, rule=rule,
                                      overwrite=overwrite)  # fmt: skip
            else:
                calib = None
                if quantize:
                    calib = (read_manifest(calibration) if calibration
                             else _split_rows(manifest, "train"))  # fmt: skip
                info = export_bundle(
                    bundle, rows, label=meta.get("label_column"), name=variant_name,
                    rule=rule, overwrite=overwrite, quantize=quantize, calibration=calib,
                )  # fmt: skip
    except ParityGateError as err:
        for key, value in err.result.items():
            err_console.print(f"  {key}: {value}")
        fail(str(err))
    except (BundleError, ValueError, FileNotFoundError) as err:
        fail(str(err))
    parity = info["parity"]
    console.print(f"variant [bold]{variant_name}[/] added to {bundle} "
                  f"({info['export_seconds']} s)")  # fmt: skip
    if "sparsity" in info:
        console.print(f"  sparsity: {info['sparsity']['model']['sparsity']:.3f} of all weights; "
                      f"fine-tune {info['finetune']}")  # fmt: skip
    if "params" in info:
        console.print(f"  parameters: teacher {info['params']['teacher']:,}, "
                      f"student {info['params']['student']:,}")  # fmt: skip
    for key in (
        "rows",
        "agreement",
        "max_abs_logit_diff",
        "reference_f1_macro",
        "variant_f1_macro",
    ):
        if key in parity:
            console.print(f"  {key}: {parity[key]}")


def bench(
    bundle: Annotated[Path, typer.Argument(help="A bundle folder (RUN/bundle).")],
    manifest: Annotated[Path, typer.Option(help="Rows to measure and check on.")],
    split: Annotated[
        str | None, typer.Option(help="Only rows whose split column is this ('' = all rows).")
    ] = "test",
    variant: Annotated[
        list[str] | None, typer.Option(help="Variants to measure (default: all). Repeatable.")
    ] = None,
    rows: Annotated[int, typer.Option(help="Rows to time (parity uses all selected rows).")] = 64,
    out: Annotated[Path, typer.Option(help="Folder for bench.json and bench.png.")] = Path("bench"),
) -> None:
    """Measure every variant of a bundle: size, latency p50/p99 at batch 1 and 32 (end to end
    and model only), throughput, and agreement / accuracy / macro-F1 against PyTorch."""
    import torch

    from modalforge.bundle import BundleError
    from modalforge.export.bench import bench_bundle, plot

    torch.set_num_threads(max(1, len(__import__("os").sched_getaffinity(0))))
    try:
        selected = _split_rows(manifest, split)
        meta = json.loads((bundle / "modalforge.json").read_text())
        with console.status(f"measuring {bundle} on {len(selected)} rows ..."):
            result = bench_bundle(bundle, selected, meta.get("label_column"), variant, rows)
    except (BundleError, ValueError, FileNotFoundError) as err:
        fail(str(err))
    atomic_write_json(out / "bench.json", result)
    plot(result, out / "bench.png")
    table = Table(title=f"{bundle} ({result['rows']} rows timed)", title_justify="left")
    for col in ("variant", "MB", "b1 p50/p99 ms", "b1 model ms", "b32 p50 ms", "b32 samples/s",
                "speed-up b1 / b32", "agreement", "macro-F1"):  # fmt: skip
        table.add_column(col)
    for r in result["variants"]:
        b1, b32, parity = r["batch1"], r["batch32"], r["parity"]
        table.add_row(
            r["variant"], f"{r['size_mb']:.1f}",
            f"{b1['end_to_end']['p50_ms']:.1f} / {b1['end_to_end']['p99_ms']:.1f}",
            f"{b1['model_only']['p50_ms']:.1f}", f"{b32['end_to_end']['p50_ms']:.0f}",
            f"{b32['end_to_end']['samples_per_s']:.0f}",
            f"{b1.get('speedup_vs_pytorch', '-')}x / {b32.get('speedup_vs_pytorch', '-')}x",
            f"{parity.get('agreement', float('nan')):.4f}",
            f"{parity.get('variant_f1_macro', float('nan')):.4f}",
        )  # fmt: skip
    console.print(table)
    console.print(f"-> {out / 'bench.json'}, {out / 'bench.png'}")
