"""Throughput of the pretrained encoders, PyTorch eager vs ONNX Runtime, against the machine's
fp32 matrix-multiply ceiling.

    .venv/bin/python benchmarks/encoders.py --out benchmarks/results/encoders.json

* ceiling: the best GFLOP/s the machine reaches on large square fp32 matrix multiplies, over
  ``torch.matmul`` (torch's default threads) and ONNX Runtime's MatMul, best of several runs per
  size (on the AMD EPYC here ORT's MLAS kernel doubles torch's BLAS; both are in the JSON);
* per encoder and batch size: samples/s in eager PyTorch (``inference_mode``) and through
  ``OnnxEncoder`` (exported here with the dynamo exporter, parity-checked, ORT session with its
  default threads); FLOPs per sample counted with ``torch.utils.flop_counter.FlopCounterMode`` on
  the eager forward (a multiply-add is 2 FLOPs; attention included), hence achieved GFLOP/s and %
  of the ceiling for both runtimes, and the ORT / eager speedup.

Whisper's timings are end to end: the numpy log-mel (``prepare``, shared by both runtimes) is
included and also reported on its own (``prepare``). Each measurement repeats the call for
``--seconds`` (at least 3 calls per block after a warm-up; eager and ORT alternate in 2 blocks
each, each block after waiting for the CPUs to be idle, see ``Quiet``); throughput comes from the
best call, the median is kept too. Writes JSON and a PNG bar chart beside it.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from _machine import busy_fraction, cpu_name, machine_jiffies, write_results
from modalforge.encoders import create_encoder
from modalforge.encoders.pretrained.whisper import SENTENCES as WHISPER_SENTENCES
from modalforge.runtime.onnx_encoder import OnnxEncoder

# Whisper's test sentences plus two longer ones, for text and speech inputs alike
SENTENCES = (
    *WHISPER_SENTENCES,
    "a cat sleeps on the warm windowsill while the rain falls outside",
    "the stock market fell sharply today after the announcement",
)


# --------------------------------------------------------------------------- measurement


def _own_jiffies() -> float:
    t = os.times()
    return (t.user + t.system) * os.sysconf("SC_CLK_TCK")


class Quiet:
    """The machine may be shared (other people's test runs on the same cores). With 2 cores and
    OpenMP / ORT thread pools, one busy foreign process slows a run far more than 2x (a
    descheduled worker stalls every barrier), so timings are guarded:

    * before each timed block, wait until the CPUs are idle (busy fraction of all CPUs under
      ``threshold``), at most ``max_wait`` seconds per block and ``budget`` seconds in all;
    * during each block, measure the CPU time other processes took (the machine's busy time
      minus this process's); a block where they took more than ``threshold`` of the CPUs is
      timed again (up to ``retries`` times), else the least disturbed attempt is kept.
    """

    def __init__(self, threshold: float = 0.1, max_wait: float = 30.0, budget: float = 180.0,
                 retries: int = 3) -> None:  # fmt: skip
        self.threshold, self.max_wait, self.budget = threshold, max_wait, budget
        self.retries = retries
        self.waited = 0.0
        self.blocks = 0
        self.retried = 0
        self.disturbed: list[float] = []  # foreign share of each kept block

    def wait(self) -> None:
        start = time.perf_counter()
        limit = min(self.max_wait, max(0.0, self.budget - self.waited))
        while busy_fraction() > self.threshold and time.perf_counter() - start < limit:
            time.sleep(0.25)
        self.waited += time.perf_counter() - start

    def block(self, fn: Callable[[], list[float]]) -> list[float]:
        """Run one timed block (``fn`` returns its call times) under the guard."""
        attempts = []
        for _ in range(1 + self.retries):
            self.wait()
            before, own = machine_jiffies(), _own_jiffies()
            times = fn()
            after, own = machine_jiffies(), _own_jiffies() - own
            foreign = 0.0
            if before is not None and after is not None:
                total = max(1, after[0] - before[0])
                foreign = max(0.0, (after[1] - before[1] - own) / total)
            attempts.append((foreign, times))
            if foreign <= self.threshold:
                break
        self.blocks += 1
        self.retried += len(attempts) - 1
        foreign, times = min(attempts, key=lambda a: a[0])
        self.disturbed.append(foreign)
        return times

    def report(self) -> dict:
        worst = max(self.disturbed, default=0.0)
        return {"threshold": self.threshold, "waited_seconds": round(self.waited, 1),
                "blocks": self.blocks, "blocks_retried": self.retried,
                "blocks_kept_while_disturbed": sum(d > self.threshold for d in self.disturbed),
                "worst_foreign_cpu_share": round(worst, 3)}  # fmt: skip


def timed_calls(fn: Callable[[], object], seconds: float, min_calls: int = 3,
                max_calls: int = 200) -> list[float]:  # fmt: skip
    """Wall times of ``fn()`` after one warm-up call: at least ``min_calls`` calls, more until
    ``seconds`` have passed."""
    fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < min_calls or (
        time.perf_counter() - start < seconds and len(times) < max_calls
    ):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def compare(fns: dict[str, Callable[[], object]], seconds: float, quiet: Quiet,
            rounds: int = 2) -> dict[str, list[float]]:  # fmt: skip
    """Time each function in blocks of ``seconds / rounds``, alternating between them
    ``rounds`` times (so a slow spell of the machine hits both), each block guarded by
    ``quiet``."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            times[name] += quiet.block(lambda fn=fn: timed_calls(fn, seconds / rounds))
    return times


def matmul_ceiling(sizes: tuple[int, ...], repeats: int, quiet: Quiet) -> dict:
    """GFLOP/s of fp32 n x n matrix products, best of ``repeats`` per size: ``torch.matmul``
    (torch's default threads; this is the ceiling) and, for reference, ONNX Runtime's MatMul
    (a one-node graph, default threads)."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("MatMul", ["a", "b"], ["c"])],
        "matmul",
        [helper.make_tensor_value_info(k, TensorProto.FLOAT, ["n", "n"]) for k in "ab"],
        [helper.make_tensor_value_info("c", TensorProto.FLOAT, ["n", "n"])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    session = ort.InferenceSession(model.SerializeToString())
    torch_rates, ort_rates = {}, {}
    for n in sizes:
        g = torch.Generator().manual_seed(n)
        a, b = torch.randn(n, n, generator=g), torch.randn(n, n, generator=g)
        feeds = {"a": a.numpy(), "b": b.numpy()}
        for rates, fn in (
            (torch_rates, lambda a=a, b=b: torch.matmul(a, b)),
            (ort_rates, lambda feeds=feeds: session.run(None, feeds)),
        ):
            best = min(quiet.block(lambda fn=fn: timed_calls(fn, 0.0, min_calls=repeats)))
            rates[str(n)] = round(2 * n**3 / best / 1e9, 1)
    return {
        "torch_gflops_by_size": torch_rates,
        "torch_matmul_gflops": max(torch_rates.values()),
        # a property of the machine: the best any of the two kernels reaches
        "ceiling_gflops": max(*torch_rates.values(), *ort_rates.values()),
        "onnxruntime_gflops_by_size": ort_rates,
        "onnxruntime_matmul_gflops": max(ort_rates.values()),
        "repeats": repeats,
    }


def flops_per_sample(encoder: torch.nn.Module, batch: dict[str, torch.Tensor], n: int) -> int:
    """FLOPs of the eager forward on ``batch`` (``n`` samples), divided by ``n``. CPU SDPA's op
    (``_scaled_dot_product_flash_attention_for_cpu``) is counted like the other SDPA kernels."""
    from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

    def cpu_sdpa(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
        return sdpa_flop_count(query_shape, key_shape, value_shape)

    mapping = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: cpu_sdpa}
    with torch.inference_mode(), FlopCounterMode(display=False, custom_mapping=mapping) as fc:
        encoder(batch)
    return round(fc.get_total_flops() / n)


# --------------------------------------------------------------------------- the cases


@dataclass
class Case:
    model: str  # registry name
    variant: str  # what distinguishes this row (resolution, window)
    options: dict  # create_encoder overrides
    unit: str  # what a sample is
    batches: tuple[int, ...]
    make_batch: Callable[[int], dict[str, torch.Tensor]]


def image_batch(size: int) -> Callable[[int], dict[str, torch.Tensor]]:
    def make(b: int) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(b)
        return {"pixels": torch.randn(b, 3, size, size, generator=g)}

    return make


def text_batch(max_length: int) -> Callable[[int], dict[str, torch.Tensor]]:
    from modalforge.data.text import TextConfig, load_tokenizer, tokenize

    tokenizer = load_tokenizer("minilm")
    cfg = TextConfig(max_length=max_length, padding="max_length")

    def make(b: int) -> dict[str, torch.Tensor]:
        texts = [SENTENCES[i % len(SENTENCES)] for i in range(b)]
        return tokenize(texts, tokenizer, cfg)

    return make


def audio_batch(seconds: float) -> Callable[[int], dict[str, torch.Tensor]]:
    """espeak-ng sentences, each cut / zero-padded to exactly ``seconds``."""
    from modalforge.data.audio import fit_length
    from modalforge.data.catalog.speech import speak

    n = round(seconds * 16_000)
    waves = [fit_length(speak(s, voice="en-us", speed=150), n) for s in SENTENCES]

    def make(b: int) -> dict[str, torch.Tensor]:
        stacked = np.stack([waves[i % len(waves)] for i in range(b)])
        return {"waves": torch.from_numpy(stacked), "wave_lengths": torch.full((b,), n)}

    return make


def cases(args) -> list[Case]:
    out: list[Case] = []
    for size in args.image_sizes:
        out.append(
            Case(
                "efficientnet_lite0",
                f"{size}px",
                {"image_size": size},
                "images",
                (1, args.image_batch),
                image_batch(size),
            )
        )
    out.append(
        Case(
            "minilm",
            f"{args.max_length} tokens",
            {"max_length": args.max_length},
            "sentences",
            (1, args.text_batch),
            text_batch(args.max_length),
        )
    )
    audio = audio_batch(args.clip_seconds)
    for window in ("full", "trimmed"):
        out.append(
            Case(
                "whisper_tiny_en",
                f"{args.clip_seconds:g}s clip, {window} window",
                {"window": window},
                "clips",
                (1, args.audio_batch),
                audio,
            )
        )
    return out


def rate(n: int, times: list[float], flops: int, ceiling: float) -> dict:
    """Throughput from the best call (the machine may be shared: noise only adds time); the
    median call is kept alongside."""
    best = min(times)
    gflops = flops * n / best / 1e9
    return {
        "ms_per_batch_best": round(1000 * best, 2),
        "ms_per_batch_median": round(1000 * statistics.median(times), 2),
        "calls": len(times),
        "samples_per_s": round(n / best, 2),
        "gflops": round(gflops, 1),
        "pct_of_ceiling": round(100 * gflops / ceiling, 1),
    }


def measure(
    case: Case, ceiling: float, cache: Path, seconds: float, quiet: Quiet
) -> tuple[dict, list[dict]]:
    t0 = time.perf_counter()
    encoder = create_encoder(case.model, **case.options).freeze()
    load_s = time.perf_counter() - t0
    runner = OnnxEncoder(encoder, case.make_batch(2), cache=cache)
    export = {
        "model": case.model,
        "variant": case.variant,
        "load_seconds": round(load_s, 2),
        "exported": runner.exported,
        "export_seconds": round(runner.export_seconds, 1),
        "onnx_mb": round(runner.path.stat().st_size / 2**20, 1),
        "max_abs_diff": float(f"{runner.max_abs_diff:.2e}"),
        "params": sum(p.numel() for p in encoder.parameters()),
    }
    flops = flops_per_sample(encoder, case.make_batch(1), 1)
    prepare = getattr(encoder, "prepare", None)  # untraced preprocessing both runtimes pay

    def eager(batch):
        with torch.inference_mode():
            return encoder(batch)

    rows = []
    for b in case.batches:
        batch = case.make_batch(b)
        runtimes = {
            "eager": lambda batch=batch: eager(batch),
            "onnxruntime": lambda batch=batch: runner(batch),
        }
        times = compare(runtimes, seconds, quiet)
        row = {
            "model": case.model,
            "variant": case.variant,
            "unit": case.unit,
            "batch": b,
            "gflop_per_sample": round(flops / 1e9, 4),
            "eager": rate(b, times["eager"], flops, ceiling),
            "onnxruntime": rate(b, times["onnxruntime"], flops, ceiling),
            "speedup_ort_vs_eager": round(min(times["eager"]) / min(times["onnxruntime"]), 2),
        }
        if callable(prepare):
            with torch.inference_mode():
                prep = quiet.block(lambda b=batch: timed_calls(lambda: prepare(b), seconds / 4))
            row["prepare_ms_per_batch_best"] = round(1000 * min(prep), 2)
        print(json.dumps(row), flush=True)
        rows.append(row)
    return export, rows


# --------------------------------------------------------------------------- report


def plot(payload: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = payload["results"]
    labels = [f"{r['model']} {r['variant']}, b{r['batch']}" for r in rows]
    y = np.arange(len(rows))
    h = 0.38
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 0.45 * len(rows) + 1.6), sharey=True)
    for ax, key, xlabel, log in (
        (left, "samples_per_s", "samples / s (log scale)", True),
        (
            right,
            "pct_of_ceiling",
            f"% of the fp32 matmul ceiling ({payload['matmul']['ceiling_gflops']:.0f} GFLOP/s)",
            False,
        ),
    ):
        for offset, runtime, color in (
            (-h / 2, "eager", "tab:blue"),
            (h / 2, "onnxruntime", "tab:orange"),
        ):
            values = [r[runtime][key] for r in rows]
            bars = ax.barh(y + offset, values, h, label=runtime, color=color)
            ax.bar_label(bars, [f"{v:g}" for v in values], fontsize=7, padding=2)
        ax.set_xlabel(xlabel)
        if log:
            ax.set_xscale("log")
        ax.margins(x=0.15)
        if not log:
            mm = payload["matmul"]
            torch_level = 100 * mm["torch_matmul_gflops"] / mm["ceiling_gflops"]
            ax.axvline(100, color="grey", lw=0.8, ls="--")
            ax.axvline(
                torch_level,
                color="tab:orange",
                lw=0.8,
                ls=":",
                label=f"torch.matmul ({mm['torch_matmul_gflops']:.0f} GFLOP/s)",
            )
            ax.legend(loc="lower right", fontsize=7)
    left.set_yticks(y, labels, fontsize=8)
    left.invert_yaxis()
    left.legend(loc="lower right")
    m = payload["machine"]
    fig.suptitle(
        f"Encoders on {m['cpus']} CPUs: PyTorch eager ({m['torch_threads']} threads) vs "
        "ONNX Runtime (default threads)",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/encoders.json"))
    parser.add_argument(
        "--seconds",
        type=float,
        default=2.0,
        help="time spent per measurement (at least 3 calls each)",
    )
    parser.add_argument("--matmul-sizes", type=int, nargs="+", default=[1024, 2048, 4096])
    parser.add_argument("--matmul-repeats", type=int, default=5)
    parser.add_argument("--image-sizes", type=int, nargs="+", default=[224, 128])
    parser.add_argument("--image-batch", type=int, default=32)
    parser.add_argument("--text-batch", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--audio-batch", type=int, default=8)
    parser.add_argument("--clip-seconds", type=float, default=2.0)
    parser.add_argument("--only", nargs="*", help="registry names to run (default: all)")
    parser.add_argument(
        "--quiet-threshold",
        type=float,
        default=0.1,
        help="foreign CPU share (fraction of all CPUs) above which a timed block waits / is "
        "timed again",
    )
    parser.add_argument(
        "--quiet-budget",
        type=float,
        default=180.0,
        help="most seconds spent waiting for a quiet machine, in all",
    )
    parser.add_argument(
        "--cache",
        type=Path,
        default=None,
        help="ONNX cache folder to reuse (default: a fresh temporary one, so "
        "every export is timed)",
    )
    args = parser.parse_args()
    import onnxruntime as ort

    start = time.perf_counter()
    quiet = Quiet(args.quiet_threshold, budget=args.quiet_budget)
    matmul = matmul_ceiling(tuple(args.matmul_sizes), args.matmul_repeats, quiet)
    print("matmul", json.dumps(matmul), flush=True)
    ceiling = matmul["ceiling_gflops"]
    exports, results = [], []
    with tempfile.TemporaryDirectory() as tmp:
        cache = args.cache or Path(tmp)
        for case in cases(args):
            if args.only and case.model not in args.only:
                continue
            export, rows = measure(case, ceiling, cache, args.seconds, quiet)
            exports.append(export)
            gc.collect()  # the case's ORT session and its thread pool go
            results.extend(rows)
    payload = {
        "machine": {
            "cpus": os.cpu_count(),
            "processor": cpu_name(),
            "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
            "onnxruntime": ort.__version__,
            "onnxruntime_threads": "default (intra_op_num_threads=0)",
            "python": platform.python_version(),
        },
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "matmul": matmul,
        "quiet": quiet.report(),
        "exports": exports,
        "results": results,
        "total_seconds": round(time.perf_counter() - start, 1),
    }
    png = write_results(args.out, payload, plot)
    print(f"wrote {args.out} and {png} in {payload['total_seconds']} s")


if __name__ == "__main__":
    main()
