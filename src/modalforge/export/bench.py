"""``modalforge bench``: every variant of a bundle, measured the same way on the same rows.

Per variant: size on disk; latency p50 / p99 at batch 1 and at batch 32, end to end (request
fields -> decode -> model -> result, what the server does per batch) and model only (decoded
samples -> result); throughput at batch 32 end to end; and, against the PyTorch model on the
same rows, agreement, accuracy and macro-F1 (``parity.compare``).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from modalforge.export.parity import compare, request_fields
from modalforge.files import atomic_path


def variant_size(bundle, variant: str) -> int:
    """Bytes on disk of a variant's files (the original: its weights file)."""
    files = bundle.variant_files(variant)
    return sum(Path(f).stat().st_size for f in files)


def _timings(fn, batches: list, repeats: int) -> list[float]:
    fn(batches[0])  # this shape's one-off costs
    out = []
    for _ in range(repeats):
        for batch in batches:
            start = time.perf_counter()
            fn(batch)
            out.append(time.perf_counter() - start)
    return out


def _summary(seconds: list[float], size: int) -> dict[str, float]:
    ms = 1000 * np.asarray(seconds)
    return {"p50_ms": round(float(np.percentile(ms, 50)), 3),
            "p99_ms": round(float(np.percentile(ms, 99)), 3),
            "samples_per_s": round(size / float(np.median(seconds)), 2)}  # fmt: skip


def bench_variant(engine, manifest, rows: int = 64, repeats: int = 3) -> dict[str, Any]:
    """Latencies of one engine on the first ``rows`` rows of ``manifest``."""
    records = manifest.frame.to_dict("records")[:rows]
    fields = [request_fields(engine, manifest, r) for r in records]
    samples = [engine.decode(f) for f in fields]
    engine.warmup(max_batch=32)
    result: dict[str, Any] = {}
    for size in (1, 32):
        f_batches = [fields[i : i + size] for i in range(0, len(fields), size)]
        s_batches = [samples[i : i + size] for i in range(0, len(samples), size)]
        if size == 32:  # whole batches only
            f_batches = [b for b in f_batches if len(b) == 32] or f_batches[:1]
            s_batches = [b for b in s_batches if len(b) == 32] or s_batches[:1]
        result[f"batch{size}"] = {
            "end_to_end": _summary(_timings(engine.handle, f_batches, repeats), len(f_batches[0])),
            "model_only": _summary(_timings(engine.predict, s_batches, repeats), len(s_batches[0])),
        }
    return result


def bench_bundle(path: str | Path, manifest, label: str | None, variants: list[str] | None = None,
                 rows: int = 64, repeats: int = 3) -> dict[str, Any]:  # fmt: skip
    """Every variant (default: all the bundle has) -> a JSON-safe table."""
    from modalforge.bundle import load_bundle
    from modalforge.runtime.engine import Engine

    bundle = load_bundle(path)
    names = variants or list(bundle.variants)
    reference = Engine.from_bundle(path, device="cpu")
    reference.tune()
    table = []
    for name in names:
        engine = reference if name == "pytorch" else Engine.from_bundle(path, device="cpu",
                                                                        variant=name)  # fmt: skip
        row = {"variant": name, "format": bundle.variants[name].get("format"),
               "size_mb": round(variant_size(bundle, name) / 2**20, 2)}  # fmt: skip
        row.update(bench_variant(engine, manifest, rows, repeats))
        row["parity"] = compare(reference, engine, manifest, label)
        table.append(row)
    base = next((r for r in table if r["variant"] == "pytorch"), None)
    for row in table:
        if base is not None:
            for size in ("batch1", "batch32"):
                b, r = base[size]["end_to_end"]["p50_ms"], row[size]["end_to_end"]["p50_ms"]
                row[size]["speedup_vs_pytorch"] = round(b / r, 2) if r else None
            row["size_vs_pytorch"] = round(row["size_mb"] / base["size_mb"], 3)
    return {"bundle": str(path), "rows": min(rows, len(manifest)), "variants": table}


def plot(result: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["variants"]
    names = [r["variant"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    x = np.arange(len(names))
    for ax, size in zip(axes[:2], ("batch1", "batch32"), strict=True):
        e2e = [r[size]["end_to_end"]["p50_ms"] for r in rows]
        model = [r[size]["model_only"]["p50_ms"] for r in rows]
        ax.bar(x - 0.2, e2e, 0.4, label="end to end")
        ax.bar(x + 0.2, model, 0.4, label="model only")
        ax.set_xticks(x, names)
        ax.set_ylabel("p50 ms per call")
        ax.set_title(f"latency at {size.replace('batch', 'batch ')}")
        ax.legend()
    axes[2].bar(x, [r["size_mb"] for r in rows], color="gray")
    axes[2].set_xticks(x, names)
    axes[2].set_ylabel("MB on disk")
    axes[2].set_title("size")
    fig.suptitle(f"modalforge bench: {Path(result['bundle']).name} ({result['rows']} rows)")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)
    return path
