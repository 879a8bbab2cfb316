"""Batch predict of a large manifest: in-process streaming vs Ray Data, rows per second.

    .venv/bin/python benchmarks/scale_batch.py --rows 20000   # writes benchmarks/results/

The manifest of ``--rows`` rows is the given manifest's rows repeated (written as one Parquet
file beside it, so its relative paths resolve, and deleted afterwards), with an ``id`` column.
Without ``--bundle`` / ``--manifest``, the serving tests' toy classifier (image + text + audio,
``tests/serving.py``) is trained first into the work folder, on its 60-row manifest.

Both runs go through ``runtime.batch.predict_manifest`` with the same ``--batch-size``:

* in-process: the manifest streamed ``batch-size`` rows at a time, torch's default threads;
  resident memory sampled through the run (``RssSampler``) says whether it stays flat;
* Ray Data: a local Ray of ``--ray-cpus`` CPUs (default: this machine's), started before the
  timer (``ray_start_seconds``, reported apart), the actor pool sized by ``plan_pool`` (or
  ``--actors``); the time includes starting the actors and loading an engine in each.

Each run's outputs are compared by id (labels equal, largest probability difference). The
machine may be shared: the busy fraction of its CPUs just before each run is recorded. Writes
JSON and a PNG (rows per second) beside it.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import busy_fraction, cpu_name, local_ray, write_results


def big_manifest(manifest: Path, rows: int) -> Path:
    """``manifest``'s rows repeated to ``rows`` rows, with ids, as Parquet beside it."""
    from modalforge.data.manifest import read_manifest

    frame = read_manifest(manifest).frame
    repeated = frame.iloc[np.arange(rows) % len(frame)].reset_index(drop=True)
    ids = [f"r{i}" for i in range(rows)]  # unique, replacing a manifest's own (repeated) ids
    repeated = repeated.drop(columns=["id"], errors="ignore")
    repeated.insert(0, "id", ids)
    path = manifest.with_name(f".scale_batch-{rows}-{os.getpid()}.parquet")
    repeated.to_parquet(path, index=False)
    return path


def _compare(a: Path, b: Path) -> dict:
    x = pd.read_parquet(a).set_index("id")
    y = pd.read_parquet(b).set_index("id").loc[x.index]
    probs = [c for c in x if c.startswith("p:")]
    return {
        "same_ids": bool(len(x) == len(y)),
        "same_labels": bool((x["label"].fillna("") == y["label"].fillna("")).all()),
        "same_errors": bool((x["error"].fillna("") == y["error"].fillna("")).all()),
        "max_abs_prob_diff": float(np.nanmax(np.abs(x[probs].to_numpy() - y[probs].to_numpy()))),
    }


def measure(bundle: Path, manifest: Path, rows: int, work: Path, *, batch_size: int = 64,
            actors: tuple[int | None, ...] = (None,),
            ray_cpus: int | None = None) -> dict:  # fmt: skip
    """Time in-process and Ray Data batch predict of ``rows`` rows (``manifest``'s, repeated)
    with ``bundle``, once per pool size in ``actors`` (None: ``plan_pool``'s default); outputs
    under ``work``. -> a JSON-safe dict of every run."""
    from modalforge.runtime.batch import predict_manifest

    work.mkdir(parents=True, exist_ok=True)
    big = big_manifest(Path(manifest), rows)
    runs, same = {}, {}
    try:
        busy = busy_fraction()
        with RssSampler() as rss:
            s = predict_manifest(bundle, big, work / "inproc.parquet", batch_size=batch_size,
                                 progress=False)  # fmt: skip
        runs["in-process"] = {**_run(s), "busy_before": round(busy, 3), **rss.summary()}
        t0 = time.perf_counter()
        with local_ray(ray_cpus) as ray:
            started = time.perf_counter() - t0
            cpus = ray.cluster_resources().get("CPU", 0.0)
            for n in actors:
                name = "ray" if n is None else f"ray-{n}-actors"
                busy = busy_fraction()
                s = predict_manifest(bundle, big, work / f"{name}.parquet", ray=True, actors=n,
                                     batch_size=batch_size, progress=False)  # fmt: skip
                runs[name] = {**_run(s), "busy_before": round(busy, 3), "cluster_cpus": cpus,
                              "ray_start_seconds": round(started, 2)}  # fmt: skip
                same[name] = _compare(work / "inproc.parquet", work / f"{name}.parquet")
    finally:
        big.unlink(missing_ok=True)
    return {"rows": rows, "batch_size": batch_size, "bundle": str(bundle),
            "manifest": str(manifest), "runs": runs, "outputs_agree": same}  # fmt: skip


class RssSampler:
    """This process's resident memory (``VmRSS``) every 0.5 s while the block runs: the
    in-process run's memory should stay flat once the engine is loaded and warm."""

    def __enter__(self):
        import threading

        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(0.5):
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    self.samples.append(int(line.split()[1]) / 1024)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def summary(self) -> dict:
        """RSS at a tenth of the run (engine loaded, first shards scored), at its end, peak."""
        if len(self.samples) < 10:
            return {}
        early, end = self.samples[len(self.samples) // 10], self.samples[-1]
        return {"rss_mb_at_10pct": round(early, 1), "rss_mb_at_end": round(end, 1),
                "rss_mb_peak": round(max(self.samples), 1),
                "rss_growth_after_10pct": round(end / early - 1, 4)}  # fmt: skip


def _run(s) -> dict:
    keys = ("rows", "failed", "shards", "actors", "cpus_per_actor", "torch_threads", "blocks",
            "rows_per_actor")  # fmt: skip
    return {"seconds": round(s.seconds, 2), "rows_per_second": round(s.rows_per_second, 1),
            **{k: getattr(s, k) for k in keys}}  # fmt: skip


def plot(payload: dict, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = payload["result"]["runs"]
    names = list(runs)
    labels = [n if not runs[n].get("actors") else f"ray ({runs[n]['actors']} actors × "
              f"{runs[n]['cpus_per_actor']:g} CPU)" for n in names]  # fmt: skip
    fig, ax = plt.subplots(figsize=(6, 2.4))
    ax.barh(labels, [runs[n]["rows_per_second"] for n in names])
    ax.set_xlabel(f"rows per second, {payload['result']['rows']:,} rows "
                  f"({payload['machine']['cpus']} CPUs)")  # fmt: skip
    fig.tight_layout()
    fig.savefig(png, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, help="default: train the toy classifier")
    parser.add_argument("--manifest", type=Path, help="rows to repeat (default: the toy's)")
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--actors", type=int, help="default: plan_pool's choice")
    parser.add_argument("--ray-cpus", type=int, help="default: this machine's CPUs")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/scale_batch.json"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        bundle, manifest = args.bundle, args.manifest
        if bundle is None:
            sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
            from tests.serving import train_toy_bundle

            (work / "toy").mkdir()
            bundle = train_toy_bundle(work / "toy")
            manifest = manifest or work / "toy" / "manifest.csv"
        if manifest is None:
            parser.error("--bundle needs --manifest (the rows to repeat)")
        result = measure(bundle, manifest, args.rows, work / "out", batch_size=args.batch_size,
                         actors=(args.actors,), ray_cpus=args.ray_cpus)  # fmt: skip
    payload = {"machine": {"cpus": os.cpu_count(), "cpu": cpu_name()}, "result": result}
    png = write_results(args.out, payload, plot)
    runs = result["runs"]
    for name, r in runs.items():
        print(f"{name:>10}: {r['rows']} rows in {r['seconds']} s = {r['rows_per_second']} rows/s"
              + (f" ({r['actors']} actors x {r['cpus_per_actor']} CPU, {r['blocks']} blocks, "
                 f"rows per actor {r['rows_per_actor']})" if r.get("actors") else ""))  # fmt: skip
    print(f"outputs agree: {result['outputs_agree']}\n{args.out}, {png}")


if __name__ == "__main__":
    main()
