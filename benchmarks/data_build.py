"""Time the built-in dataset builds: first build, idempotent re-run, full validation.

    .venv/bin/python benchmarks/data_build.py --out benchmarks/results/data_build.json

Each dataset is built into a fresh temporary folder (the npm tarball may come from the cache,
which is what a second `make demo` sees; pass --cold to empty the cache first). Writes JSON and
a bar chart PNG beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

from modalforge.data.catalog import build_dataset
from modalforge.data.infer import infer_schema
from modalforge.data.manifest import read_manifest
from modalforge.data.validate import validate_manifest
from modalforge.files import cache_dir


def measure(name: str, root: Path) -> dict:
    out = root / name
    t0 = time.perf_counter()
    first = build_dataset(name, out)
    build_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    second = build_dataset(name, out)
    rerun_s = time.perf_counter() - t0
    m = read_manifest(first.manifest)
    t0 = time.perf_counter()
    report = validate_manifest(m, infer_schema(m))
    validate_s = time.perf_counter() - t0
    return {
        "dataset": name,
        "rows": first.n_rows,
        "build_seconds": round(build_s, 2),
        "rerun_seconds": round(rerun_s, 3),
        "rerun_did_nothing": second.reused,
        "validate_seconds": round(validate_s, 2),
        "validate_rows_per_second": round(len(m) / validate_s, 1),
        "bad_rows": len(report.bad_rows),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", default="emoji,avdigits")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/data_build.json"))
    parser.add_argument("--cold", action="store_true", help="empty the npm tarball cache first")
    args = parser.parse_args()
    if args.cold:
        shutil.rmtree(cache_dir() / "npm", ignore_errors=True)
    with tempfile.TemporaryDirectory() as tmp:
        results = [measure(n, Path(tmp)) for n in args.datasets.split(",")]
    payload = {
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "cold_cache": args.cold,
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(payload, indent=2))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3))
    names = [r["dataset"] for r in results]
    ax.barh(names, [r["build_seconds"] for r in results], label="first build")
    ax.barh(names, [r["validate_seconds"] for r in results], label="validate all rows", alpha=0.7)
    ax.set_xlabel(f"seconds ({os.cpu_count()} CPUs)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.out.with_suffix(".png"), dpi=120)
    print(json.dumps(payload, indent=2))


if __name__ == "__main__":
    main()
