"""What the benchmarks share: what they read about the machine (CPU time of the whole machine
from /proc/stat, how busy the CPUs are, the processor's name), how they write their results, and
the local Ray the scale-out ones run on. Imported by the scripts beside it."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import secrets
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any


def machine_jiffies() -> tuple[int, int] | None:
    """(total, busy) CPU jiffies of the whole machine, from /proc/stat; None off Linux."""
    try:
        with open("/proc/stat") as f:
            values = [int(v) for v in f.readline().split()[1:9]]
    except (OSError, ValueError):
        return None
    return sum(values), sum(values) - values[3] - values[4]  # idle and iowait are not busy


def busy_fraction(interval: float = 0.25) -> float:
    """Busy fraction of all CPUs over ``interval`` seconds (this process sleeping)."""
    first = machine_jiffies()
    time.sleep(interval)
    last = machine_jiffies()
    if first is None or last is None:
        return 0.0
    return (last[1] - first[1]) / max(1, last[0] - first[0])


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def write_results(
    out: Path,
    payload: dict[str, Any],
    plot: Callable[[dict[str, Any], Path], None] | None = None,
    ensure_ascii: bool = True,
) -> Path | None:
    """``payload`` as indented JSON at ``out`` (folders made), then ``plot(payload, png)`` beside
    it with the same stem -> that PNG's path (None without ``plot``)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(payload, indent=2, ensure_ascii=ensure_ascii) + "\n")
    if plot is None:
        return None
    png = out.with_suffix(".png")
    plot(payload, png)
    return png


@contextlib.contextmanager
def local_ray(cpus: int | None, object_store_memory: int | None = None):
    """A local Ray for a benchmark, writing nothing into the home folder (as ``tests/conftest``:
    a token in the environment, set before ray is imported, usage stats off, session files in a
    temporary folder), shut down after; the running Ray if this process has one."""
    os.environ.setdefault("RAY_AUTH_MODE", "token")
    os.environ.setdefault("RAY_AUTH_TOKEN", secrets.token_hex(16))
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    if ray.is_initialized():
        yield ray
        return
    temp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")
    ray.init(num_cpus=cpus, include_dashboard=False, _temp_dir=temp, log_to_driver=False,
             object_store_memory=object_store_memory)  # fmt: skip
    try:
        yield ray
    finally:
        ray.shutdown()
        shutil.rmtree(temp, ignore_errors=True)
