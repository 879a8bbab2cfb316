"""Scale-out on this machine: Ray Serve replicas vs the plain server, Ray Data vs in-process batch
predict, Lightning DDP on 2 processes vs 1 -- one JSON, one plot, and a cost model from them.

    .venv/bin/modalforge data build emoji --out data/emoji
    .venv/bin/modalforge train --config configs/demo-emoji.yaml        # runs/demo/bundle
    PYTHONPATH=src .venv/bin/python benchmarks/scale.py                 # ~20 min on 2 cores

Three parts, run one after another on an otherwise idle machine (each records how busy the
CPUs were before it):

* **serving** (``scale_serve.measure``): 32 closed-loop clients posting the emoji rows'
  image + name + spoken name to ``/v1/predict`` of the demo classifier (EfficientNet-Lite0,
  MiniLM, Whisper tiny.en, attention fusion): ``modalforge serve`` vs Ray Serve with 1 replica
  of every CPU vs 2 replicas of 1 CPU each, plus Ray's default ``max_ongoing_requests=5`` and
  Ray's ``@serve.batch`` in place of the replica's own micro-batcher (the choice it backs);
* **batch** (``scale_batch.measure``): ``--rows`` (20,000) emoji rows through
  ``runtime.batch.predict_manifest``, in-process streaming vs Ray Data on a local Ray of the
  machine's CPUs (actor pool as ``plan_pool`` sizes it), outputs compared by id;
* **ddp**: ``modalforge train`` of a from-scratch emoji classifier (a CNN on the images, a bag
  of embeddings on the names: nothing cached, every epoch computes) with ``--devices 1`` vs
  ``--devices 2 --strategy ddp`` (gloo), time per epoch from the run's history.

The cost model turns the measured per-row and per-request figures into CPU-hours for a million
rows / requests (``cost``), with the core count each was measured on.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent), str(HERE.parent / "src")]

from _machine import busy_fraction, cpu_name, write_results  # noqa: E402

ROOT = HERE.parent


def ddp(manifest: Path, work: Path, epochs: int) -> dict:
    """``modalforge train`` on 1 process and on 2 (DDP, gloo) -> time per epoch of each."""
    config = {
        "manifest": str(manifest.resolve()), "label": "category",
        "columns": ["image", "text"],
        "encoders": {"image": "cnn", "text": "bag_of_embeddings"},
        "encoder_kwargs": {"image": {"widths": [16, 32, 64], "image_size": 64},
                           "text": {"embed_dim": 64}},
        "epochs": epochs, "patience": 100, "batch_size": 32, "lr": 0.003, "seed": 0,
    }  # fmt: skip
    env = {**os.environ, "MODALFORGE_CACHE": str(work / "cache")}
    runs = {}
    for processes in (1, 2):
        out = work / f"ddp-{processes}"
        (work / f"ddp-{processes}.yaml").write_text(yaml.safe_dump({**config, "out": str(out)}))
        extra = ["--devices", "2", "--strategy", "ddp"] if processes == 2 else ["--devices", "1"]
        busy = busy_fraction()
        t0 = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, "-m", "modalforge.cli", "train", "--config",
             str(work / f"ddp-{processes}.yaml"), "--accelerator", "cpu", *extra],
            capture_output=True, text=True, env=env, timeout=3600,
        )  # fmt: skip
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            raise SystemExit(f"ddp with {processes} process(es) failed:\n{proc.stderr[-3000:]}")
        summary = json.loads((out / "summary.json").read_text())
        history = summary["history"]
        runs[str(processes)] = {
            "processes": processes,
            "epochs": history["epochs_run"],
            "train_seconds": history["train_seconds"],
            "seconds_per_epoch": round(history["train_seconds"] / history["epochs_run"], 2),
            "train_rows": history["rows"]["train"],
            "wall_seconds": round(wall, 1),
            "test_accuracy": summary["headline"]["accuracy"],
            "busy_before": round(busy, 3),
        }
    one, two = runs["1"]["seconds_per_epoch"], runs["2"]["seconds_per_epoch"]
    return {"config": config, "runs": runs, "speedup": round(one / two, 3)}


def cost(result: dict, cores: int) -> dict:
    """CPU-hours per million rows / requests from the measured rates (rate on ``cores`` CPUs:
    CPU-seconds per item = cores / rate)."""

    def per_million(rate: float) -> float:
        return round(cores / rate * 1e6 / 3600, 2) if rate else float("nan")

    out = {"cores": cores}
    batch = result.get("batch", {}).get("runs", {})
    for name, run in batch.items():
        out[f"batch_{name}_cpu_hours_per_million_rows"] = per_million(run["rows_per_second"])
    for name, run in result.get("serving", {}).get("variants", {}).items():
        out[f"serve_{name}_cpu_hours_per_million_requests"] = per_million(run["throughput_rps"])
    if "ddp" in result:
        runs = result["ddp"]["runs"]
        for name, run in runs.items():
            # CPU-seconds per training row per epoch, on all the cores either way
            out[f"ddp_{name}_cpu_ms_per_row_epoch"] = round(
                1000 * cores * run["seconds_per_epoch"] / run["train_rows"], 3
            )
    return out


def plot(payload: dict, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    result = payload["result"]
    parts = [p for p in ("serving", "batch", "ddp") if p in result]
    fig, axes = plt.subplots(1, len(parts), figsize=(5 * len(parts), 3.2), squeeze=False)
    for ax, part in zip(axes[0], parts, strict=True):
        if part == "serving":
            variants = result["serving"]["variants"]
            names = list(variants)
            ax.barh(names, [variants[n]["throughput_rps"] for n in names], color="tab:blue")
            for i, n in enumerate(names):
                p50 = variants[n]["latency_ms"]["p50"]
                ax.text(variants[n]["throughput_rps"], i, f" p50 {p50:.0f} ms", va="center",
                        fontsize=8)  # fmt: skip
            ax.set_xlabel(f"requests/s, {result['serving']['clients']} clients")
            ax.set_title("serving /v1/predict")
        elif part == "batch":
            runs = result["batch"]["runs"]
            names = list(runs)
            labels = [n if not runs[n].get("actors") else f"ray data ({runs[n]['actors']} x "
                      f"{runs[n]['cpus_per_actor']:g} CPU)" for n in names]  # fmt: skip
            ax.barh(labels, [runs[n]["rows_per_second"] for n in names], color="tab:green")
            ax.set_xlabel(f"rows/s, {result['batch']['rows']:,} rows")
            ax.set_title("batch predict")
        else:
            runs = result["ddp"]["runs"]
            names = [f"{r['processes']} process(es)" for r in runs.values()]
            ax.barh(names, [r["seconds_per_epoch"] for r in runs.values()], color="tab:orange")
            ax.set_xlabel("seconds per epoch (lower is better)")
            ax.set_title("DDP training")
    fig.suptitle(f"{payload['machine']['cpus']} CPUs ({payload['machine']['cpu']})", fontsize=9)
    fig.tight_layout()
    fig.savefig(png, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, default=ROOT / "runs" / "demo" / "bundle")
    parser.add_argument("--manifest", type=Path, default=ROOT / "data" / "emoji" / "manifest.csv")
    parser.add_argument("--seconds", type=float, default=20.0, help="serving: seconds measured")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--rows", type=int, default=20_000, help="batch: manifest rows")
    parser.add_argument("--epochs", type=int, default=3, help="ddp: epochs per run")
    parser.add_argument("--parts", default="serving,batch,ddp")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "scale.json")
    parser.add_argument("--update", action="store_true",
                        help="keep the parts of --out not run this time (each part records "
                        "its own command and time)")  # fmt: skip
    args = parser.parse_args()
    needs = {args.manifest: "modalforge data build emoji --out data/emoji",
             args.bundle: "modalforge train --config configs/demo-emoji.yaml"}  # fmt: skip
    for path, how in needs.items():
        if not path.exists():
            raise SystemExit(f"{path} not found: make it first with `{how}`")
    os.environ["PYTHONPATH"] = os.pathsep.join(
        [str(ROOT / "src"), str(ROOT), os.environ.get("PYTHONPATH", "")]
    )
    parts = [p for p in args.parts.split(",") if p]
    cores = len(os.sched_getaffinity(0))
    result: dict = {}
    took: dict[str, float] = {}
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="scale-") as tmp:
        work = Path(tmp)
        if "serving" in parts:
            import scale_serve

            result["serving"] = scale_serve.measure(args.bundle, args.seconds, args.clients,
                                                    args.manifest)  # fmt: skip
            took["serving"] = round(time.perf_counter() - t0, 1)
            print(json.dumps(result["serving"]["variants"], indent=1)[:3000], flush=True)
        if "batch" in parts:
            import scale_batch

            # Ray's default pool (a CPU left free for Ray Data) and 2 actors sharing the rest
            result["batch"] = scale_batch.measure(args.bundle, args.manifest, args.rows,
                                                  work / "batch", actors=(None, 2))  # fmt: skip
            took["batch"] = round(time.perf_counter() - t0 - sum(took.values()), 1)
            print(json.dumps(result["batch"]["runs"], indent=1), flush=True)
        if "ddp" in parts:
            result["ddp"] = ddp(args.manifest, work, args.epochs)
            took["ddp"] = round(time.perf_counter() - t0 - sum(took.values()), 1)
            print(json.dumps(result["ddp"]["runs"], indent=1), flush=True)
    command = "PYTHONPATH=src .venv/bin/python benchmarks/scale.py " + " ".join(sys.argv[1:])
    when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    for name, part in result.items():
        part.update(command=command, measured_at=when, part_seconds=took[name])
    if args.update and args.out.is_file():
        result = {**json.loads(args.out.read_text())["result"], **result}
    payload = {
        "machine": {"cpus": cores, "cpu": cpu_name()},
        "result": result,
        "cost": cost(result, cores),
    }
    png = write_results(args.out, payload, plot)
    print(json.dumps(payload["cost"], indent=1))
    print(f"{args.out}, {png}")


if __name__ == "__main__":
    main()
