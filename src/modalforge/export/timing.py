"""How fast and how faithful an ONNX graph is: ``measure`` (size, median / p99 latency of an ORT
CPU session per feed) and ``choose_scheme`` (times every quantized candidate of an fp32 graph,
checks its first output against fp32's with the parity check and returns the fastest that
passes -- and is faster than fp32 -- with a report of all of them).
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np

from modalforge.runtime.onnx_encoder import graph_files
from modalforge.runtime.session import session

Feeds = Mapping[str, np.ndarray]


def model_bytes(path: Path) -> int:
    """Size on disk of a model, its external data files included."""
    return sum(f.stat().st_size for f in graph_files(path) if f.is_file())


def cpu_session(path: Path, threads: int | None = None):
    """An ONNX Runtime CPU session on ``path``, set up exactly as the server's
    (``runtime.session``), so a scheme is timed the way it will be served; ``threads``
    intra-op threads (None: ORT's default, one per core)."""
    return session(path, "cpu", threads or 0)


def _shapes(feeds: Feeds) -> dict[str, list[int]]:
    return {k: list(np.shape(v)) for k, v in feeds.items()}


def _time(session, feeds: Sequence[Feeds], repeats: int, warmup: int) -> list[dict]:
    rows = []
    for feed in feeds:
        feed = dict(feed)
        for _ in range(warmup):
            session.run(None, feed)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            session.run(None, feed)
            times.append(time.perf_counter() - start)
        rows.append({
            "shapes": _shapes(feed),
            "median_ms": 1e3 * statistics.median(times),
            "p99_ms": 1e3 * float(np.percentile(times, 99)),
            "min_ms": 1e3 * min(times),
            "repeats": repeats,
        })  # fmt: skip
    return rows


def measure(path: Path, feeds: Sequence[Feeds], repeats: int = 20, warmup: int = 2,
            threads: int | None = None) -> dict:  # fmt: skip
    """Latency and size of the ONNX model ``path`` in an ORT CPU session (``cpu_session``).

    Each feed dict (input name -> array; e.g. one per batch size) is run ``warmup`` times, then
    timed ``repeats`` times. Returns ``{"path", "bytes" (external data included), "files",
    "load_ms", "latency": [{"shapes", "median_ms", "p99_ms", "min_ms", "repeats"} per feed]}``.
    """
    path = Path(path)
    start = time.perf_counter()
    session = cpu_session(path, threads)
    load_ms = 1e3 * (time.perf_counter() - start)
    return {
        "path": str(path),
        "bytes": model_bytes(path),
        "files": [str(f) for f in graph_files(path)],
        "load_ms": load_ms,
        "latency": _time(session, feeds, repeats, warmup),
    }


def _compare(got: np.ndarray, want: np.ndarray) -> tuple[float, float]:
    """(max abs difference, min cosine similarity over rows) of two same-shape arrays, rows
    being the first axis (the batch)."""
    got = np.asarray(got, dtype=np.float64)
    want = np.asarray(want, dtype=np.float64)
    if got.shape != want.shape:
        return math.inf, -1.0
    max_abs = float(np.abs(got - want).max()) if got.size else 0.0
    a = got.reshape(got.shape[0], -1) if got.ndim else got.reshape(1, 1)
    b = want.reshape(want.shape[0], -1) if want.ndim else want.reshape(1, 1)
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    cos = np.where(norms > 0, (a * b).sum(1) / np.maximum(norms, 1e-30), 1.0)
    return max_abs, float(cos.min()) if cos.size else 1.0


def choose_scheme(
    fp32: Path,
    candidates: Mapping[str, Path],
    feeds: Sequence[Feeds],
    reference_outputs: Sequence[np.ndarray] | None,
    check: Callable[[np.ndarray, np.ndarray], bool],
    repeats: int = 20,
    min_speedup: float = 1.0,
    threads: int | None = None,
) -> tuple[str | None, dict]:
    """The fastest quantized variant of ``fp32`` that passes the parity gate.

    ``candidates``: name -> ONNX file (e.g. ``{"dynamic": ..., "static-qdq": ...}``). Each is
    timed on ``feeds`` like ``measure`` and its first output on each feed compared with
    ``reference_outputs`` (fp32's first output per feed; None: computed here): ``check(output,
    reference)`` must hold for every feed. Speed is the geometric mean over feeds of fp32's
    median latency / the candidate's; a passing candidate must also reach ``min_speedup``
    (default: faster than fp32; 0 disables).

    Returns ``(name or None, report)``; report: ``{"fp32": measure(...), "candidates": {name:
    {"bytes", "size_ratio", "latency", "speedup", "max_abs", "min_cosine", "passed", "reason"}},
    "chosen", "reason"}`` (``max_abs`` / ``min_cosine``: worst over feeds, cosine per row).
    """
    feeds = [dict(f) for f in feeds]
    fp32_session = cpu_session(fp32, threads)
    if reference_outputs is None:
        reference_outputs = [fp32_session.run(None, f)[0] for f in feeds]
    if len(reference_outputs) != len(feeds):
        raise ValueError("choose_scheme: one reference output per feed is needed")
    fp32_report = {"path": str(fp32), "bytes": model_bytes(fp32),
                   "latency": _time(fp32_session, feeds, repeats, 2)}  # fmt: skip
    del fp32_session
    base = [row["median_ms"] for row in fp32_report["latency"]]
    rows: dict[str, dict] = {}
    for name, path in candidates.items():
        row: dict = {"path": str(path), "passed": False, "reason": None}
        rows[name] = row
        try:
            row["bytes"] = model_bytes(path)
            row["size_ratio"] = row["bytes"] / max(1, fp32_report["bytes"])
            session = cpu_session(path, threads)
            outputs = [session.run(None, f)[0] for f in feeds]
            row["latency"] = _time(session, feeds, repeats, 2)
            del session
        except Exception as error:  # a candidate that does not load or run is just rejected
            row["reason"] = f"does not run: {type(error).__name__}: {error}"[:500]
            continue
        ratios = [b / max(r["median_ms"], 1e-9) for b, r in zip(base, row["latency"], strict=True)]
        row["speedup"] = math.exp(sum(math.log(r) for r in ratios) / len(ratios))
        diffs = [_compare(o, r) for o, r in zip(outputs, reference_outputs, strict=True)]
        row["max_abs"] = max(d[0] for d in diffs)
        row["min_cosine"] = min(d[1] for d in diffs)
        failed = [i for i, (o, r) in enumerate(zip(outputs, reference_outputs, strict=True))
                  if not check(o, r)]  # fmt: skip
        if failed:
            row["reason"] = f"parity check failed on feed(s) {failed}"
        elif row["speedup"] < min_speedup:
            row["reason"] = f"speedup {row['speedup']:.2f}x below {min_speedup:.2f}x"
        else:
            row["passed"] = True
    passing = [n for n, r in rows.items() if r["passed"]]
    chosen = max(passing, key=lambda n: rows[n]["speedup"]) if passing else None
    if chosen:
        reason = f"{chosen}: fastest passing candidate ({rows[chosen]['speedup']:.2f}x fp32)"
    elif rows:
        reason = "no candidate passed: " + "; ".join(f"{n}: {r['reason']}" for n, r in
                                                     rows.items())  # fmt: skip
    else:
        reason = "no candidates"
    return chosen, {"fp32": fp32_report, "candidates": rows, "chosen": chosen, "reason": reason}


__all__ = ["choose_scheme", "cpu_session", "measure", "model_bytes"]
