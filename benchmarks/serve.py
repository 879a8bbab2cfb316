"""Serving under closed-loop load: `modalforge serve` (dynamic batching) vs one forward per request
vs the same model called in-process.

    .venv/bin/python benchmarks/serve.py --out benchmarks/results/serve.json
    .venv/bin/python benchmarks/serve.py --quick  # 1 and 32 clients, a few seconds each

Everything runs on 127.0.0.1, bounded in count and time:

* payloads: ``--samples`` rows of the manifest (seeded), each a pre-encoded multipart body with
  the image file, the text and the audio file (the bundle's input columns);
* servers under test, each a subprocess on a free port: ``modalforge serve BUNDLE`` (the micro-
  batcher), and two naive FastAPI apps defined here (``--naive-server``) with the same ``Engine``
  (``from_bundle`` + ``warmup``, so the same tuning), the same multipart parsing and uvicorn, but
  one forward per request: ``naive-serial`` (``engine.handle([fields])`` -- decode + one forward
  -- in one inference thread behind an ``asyncio.Lock``, exactly like the server minus batching;
  torch's OpenMP in that thread only, see ``OPENMP_NOTE``) and ``naive-threads`` (a plain
  ``def`` route: FastAPI's thread pool runs decode + forward of many requests at once, torch
  threads = cores; the model is not meant to be called concurrently, so failures are counted as
  errors);
* load: a separate process (``--load``, aiohttp, pre-encoded bodies) per level runs N closed-loop
  clients; a warm-up is left out, then it measures for ``--seconds`` or ``--max-requests``,
  whichever comes first: latencies, status codes, its own CPU, the server's CPU (``/proc``), the
  machine's CPU taken by other processes, and for the batching server the ``/metrics`` diff over
  the window (batches by exact size, model time, decode time, queue wait);
* ceiling: with the servers stopped, the same bundle is loaded in this process (torch threads =
  cores), the same samples pre-decoded, warmed up with the server's batch mix, and
  ``engine.predict`` timed over the batch sizes the server formed at each level -> samples/s.
  Also timed in-process: multipart parsing and ``engine.decode`` per request, beside the
  per-request overhead ``1/server - 1/ceiling`` (µs).

Targets (reported, not asserted): at 32 clients the server reaches >= 85% of the ceiling and
>= 1.8x the better naive server (0 errors, best throughput at 32 clients), with 0 errors.
Writes JSON, a PNG (throughput and latency vs clients) and a markdown table beside it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import os
import platform
import random
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from collections.abc import Callable
from pathlib import Path

# at module level: FastAPI resolves the naive routes' (string) annotations in these globals
from starlette.requests import Request

from _machine import busy_fraction, cpu_name, machine_jiffies, write_results

LOOPBACK = "127.0.0.1"
OPENMP_NOTE = (
    "torch's OpenMP runtime (libgomp) gives every thread that runs a parallel region its own "
    "team; once the teams hold more threads than there are CPUs, idle workers stop spinning "
    "and sleep between regions, and a 2-thread forward runs on ~1.25 cores. Loading the bundle "
    "in the main thread with its default threads and predicting in another thread does exactly "
    "that. `modalforge serve` and naive-serial avoid it (torch.set_num_threads(1) in the main "
    "thread before loading, warm-up, decoding and forwards in the one inference thread); the "
    "ceiling runs in one thread."
)
INPUT_TYPES = ("image", "text", "audio", "tabular")
NAIVE_VARIANTS = ("serial", "threads")


# --------------------------------------------------------------------------- payloads


def input_fields(bundle: Path) -> list[str]:
    """The bundle's input columns, from its metadata (no model loading)."""
    meta = json.loads((bundle / "modalforge.json").read_text())
    columns = meta["schema"]["columns"]
    return [name for name, c in columns.items() if c.get("type") in INPUT_TYPES]


def build_bodies(manifest: Path, fields: list[str], samples: int, seed: int
                 ) -> tuple[list[bytes], str, list[str]]:  # fmt: skip
    """``samples`` seeded rows of the manifest -> (multipart bodies, content type, row ids).
    A value that names a file next to the manifest is sent as a file part, else as text."""
    import csv

    root = manifest.parent
    with manifest.open(newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    rows = random.Random(seed).sample(rows, min(samples, len(rows)))
    boundary = f"modalforgebench{seed:08x}"
    bodies = []
    for row in rows:
        parts = []
        for name in fields:
            value = row.get(name) or ""
            path = root / value if value else None
            if path is not None and path.is_file():
                kind = {".png": "image/png", ".flac": "audio/flac", ".wav": "audio/wav"}.get(
                    path.suffix.lower(), "application/octet-stream"
                )
                head = (f'Content-Disposition: form-data; name="{name}"; filename="{path.name}"'
                        f"\r\nContent-Type: {kind}\r\n\r\n")  # fmt: skip
                data = path.read_bytes()
            else:
                head = f'Content-Disposition: form-data; name="{name}"\r\n\r\n'
                data = value.encode("utf-8")
            parts.append(f"--{boundary}\r\n{head}".encode() + data + b"\r\n")
        bodies.append(b"".join(parts) + f"--{boundary}--\r\n".encode())
    ids = [row.get("id") or str(i) for i, row in enumerate(rows)]
    return bodies, f"multipart/form-data; boundary={boundary}", ids


# --------------------------------------------------------------------------- CPU accounting


def process_seconds(pid: int) -> float | None:
    """User + system CPU seconds of a process (all its threads), from /proc/<pid>/stat."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def loadavg() -> list[float]:
    try:
        return [float(v) for v in Path("/proc/loadavg").read_text().split()[:3]]
    except (OSError, ValueError):
        return []


class Quiet:
    """The machine may be shared. Before each measured level, wait until the CPUs are idle (busy
    fraction under ``threshold``), at most ``max_wait`` seconds per level and ``budget`` in all.
    What other processes took during a level is measured (``foreign_cores``); a level where they
    took more than ``foreign_limit`` cores is measured again (``retries`` times in all, over the
    whole run) and the least disturbed attempt kept. Another torch process on the same cores can
    slow a forward many times over (spinning OpenMP workers), so this matters."""

    def __init__(self, threshold: float, max_wait: float, budget: float, foreign_limit: float,
                 retries: int) -> None:  # fmt: skip
        self.threshold, self.max_wait, self.budget = threshold, max_wait, budget
        self.foreign_limit, self.retries = foreign_limit, retries
        self.waited = 0.0
        self.gave_up = 0
        self.retried = 0
        self.kept_disturbed = 0

    def wait(self) -> None:
        start = time.perf_counter()
        limit = min(self.max_wait, max(0.0, self.budget - self.waited))
        while busy_fraction() > self.threshold:
            if time.perf_counter() - start >= limit:
                self.gave_up += 1
                break
            time.sleep(0.25)
        self.waited += time.perf_counter() - start

    def measure(self, fn: Callable[[], dict]) -> dict:
        """Run one measurement (a dict with ``foreign_cores``) under the guard."""
        attempts = []
        while True:
            self.wait()
            result = fn()
            attempts.append(result)
            if (result.get("foreign_cores") or 0.0) <= self.foreign_limit or self.retries <= 0:
                break
            self.retries -= 1
            self.retried += 1
        best = min(attempts, key=lambda r: r.get("foreign_cores") or 0.0)
        best["attempts"] = len(attempts)
        self.kept_disturbed += (best.get("foreign_cores") or 0.0) > self.foreign_limit
        return best

    def report(self) -> dict:
        return {"threshold": self.threshold, "waited_seconds": round(self.waited, 1),
                "levels_started_busy": self.gave_up, "foreign_limit_cores": self.foreign_limit,
                "levels_measured_again": self.retried,
                "levels_kept_while_disturbed": self.kept_disturbed}  # fmt: skip


# --------------------------------------------------------------------------- load generator


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text -> {'name{labels}': value} (comments skipped)."""
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            with contextlib.suppress(ValueError):
                out[key] = float(value)
    return out


def metrics_window(before: dict[str, float], after: dict[str, float], window: float) -> dict:
    """What the batching server did between two /metrics scrapes."""
    diff = {k: v - before.get(k, 0.0) for k, v in after.items()}
    sizes = {}
    for key, value in diff.items():
        if key.startswith('modalforge_batches_total{size="') and value > 0:
            sizes[int(key.split('"')[1])] = round(value)
    batches = sum(sizes.values())
    items = sum(s * c for s, c in sizes.items())

    def mean_ms(name: str) -> float | None:
        count = diff.get(f"{name}_count", 0.0)
        return round(1000 * diff.get(f"{name}_sum", 0.0) / count, 3) if count else None

    model_s = diff.get("modalforge_batch_seconds_sum", 0.0)
    return {
        "batches": batches,
        "batch_sizes": dict(sorted(sizes.items())),
        "mean_batch_size": round(items / batches, 2) if batches else None,
        "model_seconds": round(model_s, 3),
        "model_busy_fraction": round(model_s / window, 3) if window else None,
        "model_ms_per_sample": round(1000 * model_s / items, 3) if items else None,
        "decode_ms_mean": mean_ms("modalforge_decode_seconds"),
        "queue_wait_ms_mean": mean_ms("modalforge_queue_wait_seconds"),
    }


def percentile(ordered: list[float], q: float) -> float | None:
    """Linear interpolation between closest ranks; ``ordered`` sorted."""
    if not ordered:
        return None
    pos = (len(ordered) - 1) * q
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


async def run_load(args: argparse.Namespace) -> dict:
    from urllib.parse import urlsplit

    import aiohttp

    parts = urlsplit(args.load)
    if parts.hostname not in (LOOPBACK, "localhost", "::1"):
        raise SystemExit(f"--load: loopback only, got {parts.hostname!r}")
    base = f"{parts.scheme}://{parts.netloc}"
    bodies, ctype, _ = build_bodies(Path(args.manifest), args.fields.split(","), args.samples,
                                    args.seed)  # fmt: skip
    headers = {"Content-Type": ctype}
    n = len(bodies)
    clients = args.clients
    phase = {"measuring": False, "start": 0.0}
    records: list[tuple[float, int | str]] = []  # (latency s, status or exception name)
    errors: Counter[str] = Counter()
    full = asyncio.Event()
    stop = asyncio.Event()

    connector = aiohttp.TCPConnector(limit=clients + 2)
    timeout = aiohttp.ClientTimeout(total=args.timeout)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def client(i: int) -> None:
            k = i * max(1, n // clients)  # clients start spread over the samples
            while not stop.is_set():
                body = bodies[k % n]
                k += 1
                t0 = time.perf_counter()
                detail = ""
                try:
                    async with session.post(args.load, data=body, headers=headers) as resp:
                        payload = await resp.read()
                        status: int | str = resp.status
                        if status != 200:
                            detail = payload[:120].decode("utf-8", "replace")
                except Exception as err:  # timeouts, resets: errors, not crashes
                    status, detail = type(err).__name__, str(err)[:120]
                done = time.perf_counter()
                if phase["measuring"] and not stop.is_set():
                    records.append((done - t0, status))
                    if status != 200:
                        errors[f"{status}: {detail}".strip()] += 1
                    if len(records) >= args.max_requests:
                        full.set()

        async def scrape() -> dict[str, float]:
            if not args.metrics:
                return {}
            try:
                async with session.get(f"{base}/metrics") as resp:
                    return parse_metrics(await resp.text())
            except Exception:
                return {}

        def snapshot() -> tuple[float, float, float | None, tuple[int, int] | None]:
            return (time.perf_counter(), time.process_time(),
                    process_seconds(args.pid) if args.pid else None, machine_jiffies())  # fmt: skip

        tasks = [asyncio.create_task(client(i)) for i in range(clients)]
        await asyncio.sleep(args.warmup)
        m0 = await scrape()
        t0, c0, s0, j0 = snapshot()
        phase["measuring"] = True
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(full.wait(), args.seconds)
        t1, c1, s1, j1 = snapshot()
        stop.set()
        m1 = await scrape()
        # in-flight requests finish (so the next level starts on an idle server), uncounted
        _, pending = await asyncio.wait(tasks, timeout=args.timeout + 5)
        for task in pending:
            task.cancel()

    window = t1 - t0
    ok = sorted(lat for lat, status in records if status == 200)
    own = c1 - c0
    server = None if s0 is None or s1 is None else s1 - s0
    foreign = None
    if j0 is not None and j1 is not None:
        total = max(1, j1[0] - j0[0])
        cores = os.cpu_count() or 1
        ours = (own + (server or 0.0)) * os.sysconf("SC_CLK_TCK")
        foreign = round(max(0.0, (j1[1] - j0[1] - ours) / total) * cores, 2)

    def ms(v: float | None) -> float | None:
        return None if v is None else round(1000 * v, 2)

    result = {
        "clients": clients,
        "window_seconds": round(window, 3),
        "completed": len(records),
        "ok": len(ok),
        "errors": len(records) - len(ok),
        "error_kinds": dict(errors.most_common(5)),
        "throughput_rps": round(len(ok) / window, 2) if window else 0.0,
        "latency_ms": {
            "mean": ms(sum(ok) / len(ok)) if ok else None,
            "p50": ms(percentile(ok, 0.50)),
            "p95": ms(percentile(ok, 0.95)),
            "p99": ms(percentile(ok, 0.99)),
            "max": ms(ok[-1]) if ok else None,
        },
        "loadgen_cpu_seconds": round(own, 3),
        "loadgen_cores": round(own / window, 3) if window else None,
        "server_cpu_seconds": None if server is None else round(server, 3),
        "server_cores": None if server is None or not window else round(server / window, 3),
        "server_cpu_ms_per_request": (
            None if server is None or not ok else round(1000 * server / len(ok), 3)
        ),
        "foreign_cores": foreign,  # CPU other processes took during the window, in cores
        "loadavg": loadavg(),
    }
    if args.metrics:
        result["server_metrics"] = metrics_window(m0, m1, window) if m0 and m1 else None
    return result


# --------------------------------------------------------------------------- naive servers


def naive_app(bundle: str, variant: str):
    """The same Engine and parsing as ``modalforge serve``, one forward per request."""
    import concurrent.futures

    import torch
    from fastapi import Depends, FastAPI
    from fastapi.responses import JSONResponse

    from modalforge.errors import RequestError
    from modalforge.serve import Engine
    from modalforge.serve.requests import multipart_fields

    cores = os.cpu_count() or 1
    # serial: only the inference thread runs torch's OpenMP (see OPENMP_NOTE); threads: every
    # request thread does, with cores threads each, as a plain sync route gets
    torch.set_num_threads(1 if variant == "serial" else cores)
    engine = Engine.from_bundle(bundle)
    columns = {c.name: c for c in engine.inputs}

    def envelope(result: dict) -> dict:
        return {"model": engine.name, "version": engine.version, **result}

    if variant == "serial":
        infer = concurrent.futures.ThreadPoolExecutor(
            1, "naive-infer", initializer=lambda: torch.set_num_threads(cores)
        )
        lock = asyncio.Lock()

        @contextlib.asynccontextmanager
        async def lifespan(app: FastAPI):
            await asyncio.get_running_loop().run_in_executor(infer, engine.warmup, 32)
            yield
            infer.shutdown()

        app = FastAPI(lifespan=lifespan)

        @app.post("/v1/predict")
        async def predict(request: Request):
            body = await request.body()
            fields = multipart_fields(body, request.headers["content-type"], columns)
            async with lock:  # decode + one forward, in the inference thread, like the server
                loop = asyncio.get_running_loop()
                (result,) = await loop.run_in_executor(infer, engine.handle, [fields])
            if isinstance(result, RequestError):
                raise result
            return envelope(result)

    elif variant == "threads":
        engine.warmup(32)
        app = FastAPI()

        async def raw_body(request: Request) -> bytes:
            return await request.body()

        @app.post("/v1/predict")
        def predict(request: Request, body: bytes = Depends(raw_body)):  # FastAPI's thread pool
            fields = multipart_fields(body, request.headers["content-type"], columns)
            return envelope(engine.predict([engine.decode(fields)])[0])

    else:
        raise SystemExit(f"unknown naive variant {variant!r}")

    @app.exception_handler(RequestError)
    async def _request_error(request: Request, err: RequestError):
        return JSONResponse({"error": err.message}, err.status)

    @app.exception_handler(Exception)
    async def _server_error(request: Request, err: Exception):
        return JSONResponse({"error": f"{type(err).__name__}: {err}"}, 500)

    @app.get("/readyz")
    async def readyz():
        return {"status": "ready", "tuning": engine.tuning}

    return app


def run_naive_server(args: argparse.Namespace) -> None:
    import uvicorn

    app = naive_app(args.naive_server, args.variant)
    uvicorn.run(app, host=LOOPBACK, port=args.port, log_level="warning")


# --------------------------------------------------------------------------- orchestration


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def subprocess_env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("HF_HUB_OFFLINE", "1")  # the weights are local; loopback only
    env.setdefault("TRANSFORMERS_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


class Server:
    """A server subprocess on a free loopback port, ready when ``/readyz`` answers 200."""

    def __init__(self, kind: str, command: list[str], port: int, logs: Path) -> None:
        self.kind, self.port = kind, port
        self.url = f"http://{LOOPBACK}:{port}"
        self.log = logs / f"{kind}.log"
        self._log = self.log.open("wb")
        started = time.perf_counter()
        self.proc = subprocess.Popen(command, stdout=self._log, stderr=subprocess.STDOUT,
                                     env=subprocess_env())  # fmt: skip
        self.ready_seconds = self._wait_ready(started)

    def _wait_ready(self, started: float, timeout: float = 300.0) -> float:
        while time.perf_counter() - started < timeout:
            if self.proc.poll() is not None:
                tail = self.log.read_text(errors="replace")[-3000:]
                raise RuntimeError(f"{self.kind} server exited ({self.proc.returncode}):\n{tail}")
            try:
                with urllib.request.urlopen(f"{self.url}/readyz", timeout=2) as resp:
                    if resp.status == 200:
                        return round(time.perf_counter() - started, 1)
            except OSError:
                pass
            time.sleep(0.25)
        raise RuntimeError(f"{self.kind} server not ready after {timeout:.0f} s (log: {self.log})")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._log.close()


def start_server(kind: str, args: argparse.Namespace, logs: Path) -> Server:
    port = free_port()
    if kind == "server":
        command = [sys.executable, "-m", "modalforge.cli", "serve", str(args.bundle),
                   "--host", LOOPBACK, "--port", str(port), "--max-batch", str(args.max_batch),
                   "--log-level", "warning"]  # fmt: skip
    else:
        variant = kind.removeprefix("naive-")
        command = [sys.executable, str(Path(__file__).resolve()), "--naive-server",
                   str(args.bundle), "--variant", variant, "--port", str(port)]  # fmt: skip
    return Server(kind, command, port, logs)


def run_level(server: Server, clients: int, args: argparse.Namespace, logs: Path) -> dict:
    out = logs / f"{server.kind}-{clients}.json"
    command = [sys.executable, str(Path(__file__).resolve()),
               "--load", f"{server.url}/v1/predict", "--clients", str(clients),
               "--seconds", str(args.seconds), "--warmup", str(args.warmup),
               "--max-requests", str(args.max_requests), "--timeout", str(args.timeout),
               "--manifest", str(args.manifest), "--fields", ",".join(args.fields),
               "--samples", str(args.samples), "--seed", str(args.seed),
               "--pid", str(server.proc.pid), "--out", str(out)]  # fmt: skip
    if server.kind == "server":
        command.append("--metrics")
    limit = args.warmup + args.seconds + args.timeout + 60
    subprocess.run(command, check=True, timeout=limit, env=subprocess_env())
    return json.loads(out.read_text())


def measure_servers(kinds: list[str], args: argparse.Namespace, quiet: Quiet, logs: Path
                    ) -> dict[str, dict]:  # fmt: skip
    results = {}
    for kind in kinds:
        server = None
        try:
            server = start_server(kind, args, logs)
            print(f"{kind}: ready in {server.ready_seconds} s", flush=True)
            levels = []
            for clients in args.clients:
                level = quiet.measure(lambda s=server, c=clients: run_level(s, c, args, logs))
                levels.append(level)
                print(f"  {clients:>3} clients: {summary(level)}", flush=True)
            results[kind] = {"ready_seconds": server.ready_seconds, "levels": levels}
        finally:
            if server is not None:
                server.stop()
    return results


def summary(level: dict) -> str:
    lat = level["latency_ms"]
    text = (f"{level['throughput_rps']:.1f} req/s, p50 {lat['p50']} ms, p99 {lat['p99']} ms, "
            f"{level['errors']} errors, server {level['server_cores']} cores, "
            f"loadgen {level['loadgen_cores']} cores")  # fmt: skip
    sm = level.get("server_metrics")
    if sm:
        text += f", mean batch {sm['mean_batch_size']}"
    return text


def measure_ceiling(server_levels: list[dict], args: argparse.Namespace, quiet: Quiet) -> dict:
    """The same model in this process, over the batch sizes the server formed at each level."""
    import torch

    from modalforge.serve import Engine
    from modalforge.serve.requests import multipart_fields

    cores = os.cpu_count() or 1
    torch.set_num_threads(cores)
    t0 = time.perf_counter()
    engine = Engine.from_bundle(args.bundle)
    engine.warmup(args.max_batch)
    load_s = time.perf_counter() - t0
    columns = {c.name: c for c in engine.inputs}
    bodies, ctype, _ = build_bodies(args.manifest, args.fields, args.samples, args.seed)

    # per request, in-process: multipart parsing and decoding (best of 3 passes over the samples)
    parse_t, decode_t = [], []
    for _ in range(3):
        start = time.perf_counter()
        fields = [multipart_fields(b, ctype, columns) for b in bodies]
        parse_t.append((time.perf_counter() - start) / len(bodies))
        start = time.perf_counter()
        samples = [engine.decode(f) for f in fields]
        decode_t.append((time.perf_counter() - start) / len(bodies))

    rng = random.Random(args.seed)
    cursor = [0]

    def batch(size: int) -> list:
        i = cursor[0]
        cursor[0] = (i + size) % len(samples)
        return [samples[(i + j) % len(samples)] for j in range(size)]

    mixes = []
    for level in server_levels:
        sizes = (level.get("server_metrics") or {}).get("batch_sizes") or {}
        mix = [int(s) for s, count in sizes.items() for _ in range(count)]
        rng.shuffle(mix)
        mixes.append(mix)
    # warm up with the server's batch mix: every size it formed (and the full batches), twice
    full = {min(lv["clients"], args.max_batch) for lv in server_levels}
    for size in sorted({s for mix in mixes for s in mix} | full):
        for _ in range(2):
            engine.predict(batch(size))

    def timed(sizes: list[int], limit: float) -> dict:
        done = calls = 0
        j0, c0 = machine_jiffies(), time.process_time()
        start = time.perf_counter()
        for size in sizes:
            engine.predict(batch(size))
            done += size
            calls += 1
            if time.perf_counter() - start >= limit:
                break
        seconds = time.perf_counter() - start
        cpu = time.process_time() - c0
        j1 = machine_jiffies()
        foreign = None
        if j0 is not None and j1 is not None:
            ours = cpu * os.sysconf("SC_CLK_TCK")
            foreign = round(max(0.0, (j1[1] - j0[1] - ours) / max(1, j1[0] - j0[0])) * cores, 2)
        return {
            "samples_per_s": round(done / seconds, 2),
            "ms_per_sample": round(1000 * seconds / done, 3),
            "samples": done,
            "model_calls": calls,
            "of_mix": round(calls / len(sizes), 3),
            "seconds": round(seconds, 2),
            "cores": round(cpu / seconds, 3),
            "cpu_ms_per_sample": round(1000 * cpu / done, 3),
            "foreign_cores": foreign,
            "loadavg": loadavg(),
        }

    levels = []
    for level, mix in zip(server_levels, mixes, strict=True):
        if not mix:
            levels.append({"clients": level["clients"], "samples_per_s": None})
            continue
        result = {"clients": level["clients"],
                  **quiet.measure(lambda mix=mix: timed(mix, args.ceiling_seconds))}  # fmt: skip
        # for reference: every batch full (min(clients, max batch)), as a closed loop allows
        size = min(level["clients"], args.max_batch)
        even = timed([size] * 10_000, args.ceiling_seconds / 2)
        result["full_batches"] = {"batch_size": size, "samples_per_s": even["samples_per_s"],
                                  "ms_per_sample": even["ms_per_sample"],
                                  "foreign_cores": even["foreign_cores"]}  # fmt: skip
        levels.append(result)
        print(f"  ceiling at {level['clients']:>3} clients' batch mix: "
              f"{result['samples_per_s']} samples/s (batches of {size}: "
              f"{even['samples_per_s']})", flush=True)  # fmt: skip
    return {
        "load_and_warmup_seconds": round(load_s, 1),
        "tuning": engine.tuning,
        "torch_threads": torch.get_num_threads(),
        "multipart_parse_us": round(1e6 * min(parse_t), 1),
        "decode_us": round(1e6 * min(decode_t), 1),
        "levels": levels,
    }


def compare(payload: dict, ref_clients: int) -> dict:
    """Ratios per level, the best naive variant, the per-request overhead and the targets."""
    servers = payload["servers"]
    batching = servers.get("server", {}).get("levels", [])
    ceiling = {c["clients"]: c for c in payload["ceiling"].get("levels", [])}
    naive = {k: v for k, v in servers.items() if k.startswith("naive-")}

    def at(levels: list[dict], clients: int) -> dict | None:
        return next((lv for lv in levels if lv["clients"] == clients), None)

    best, best_rps = None, -1.0
    for kind, result in naive.items():
        level = at(result["levels"], ref_clients)
        if level and level["errors"] == 0 and level["throughput_rps"] > best_rps:
            best, best_rps = kind, level["throughput_rps"]
    if best is None and naive:  # every variant failed somewhere: the fastest, flagged below
        best = max(naive, key=lambda k: (at(naive[k]["levels"], ref_clients) or {}).get(
            "throughput_rps", 0.0))  # fmt: skip

    rows = []
    decode_us = payload["ceiling"].get("decode_us")
    for level in batching:
        c = level["clients"]
        rps = level["throughput_rps"]
        ceil = (ceiling.get(c) or {}).get("samples_per_s")
        nv = at(naive[best]["levels"], c) if best else None
        sm = level.get("server_metrics") or {}
        ceil_cpu = (ceiling.get(c) or {}).get("cpu_ms_per_sample")
        full = ((ceiling.get(c) or {}).get("full_batches") or {}).get("samples_per_s")
        server_cpu = level.get("server_cpu_ms_per_request")
        rows.append({
            "clients": c,
            "server_rps": rps,
            "ceiling_samples_per_s": ceil,
            "best_naive_rps": nv["throughput_rps"] if nv else None,
            "server_over_ceiling": round(rps / ceil, 3) if ceil and rps else None,
            "server_over_full_batch_ceiling": round(rps / full, 3) if full and rps else None,
            "server_over_best_naive": (
                round(rps / nv["throughput_rps"], 3) if nv and nv["throughput_rps"] else None
            ),
            "overhead_us_per_request": (
                round(1e6 * (1 / rps - 1 / ceil), 1) if ceil and rps else None
            ),
            "decode_us_in_process": decode_us,
            "decode_us_in_server": (
                round(1000 * sm["decode_ms_mean"], 1) if sm.get("decode_ms_mean") else None
            ),
            # where the time goes: the model's own time per sample in the server vs in-process
            # (contention), how busy the server kept it (batching gaps), CPU per request
            "model_ms_per_sample_in_server": sm.get("model_ms_per_sample"),
            "model_ms_per_sample_in_process": (ceiling.get(c) or {}).get("ms_per_sample"),
            "model_busy_fraction": sm.get("model_busy_fraction"),
            "server_cpu_ms_per_request": server_cpu,
            "ceiling_cpu_ms_per_sample": ceil_cpu,
            "extra_cpu_us_per_request": (
                round(1000 * (server_cpu - ceil_cpu), 1) if server_cpu and ceil_cpu else None
            ),
            "errors": level["errors"],
        })  # fmt: skip
    ref = next((r for r in rows if r["clients"] == ref_clients), None)
    target = None
    if ref is not None:
        over_ceiling, over_naive = ref["server_over_ceiling"], ref["server_over_best_naive"]
        naive_ref = at(naive[best]["levels"], ref_clients) if best else None
        target = {
            "clients": ref_clients,
            "server_over_ceiling": over_ceiling,
            "server_over_ceiling_min": 0.85,
            "server_over_best_naive": over_naive,
            "server_over_best_naive_min": 1.8,
            "server_errors": ref["errors"],
            "best_naive_errors": naive_ref["errors"] if naive_ref else None,
            "overhead_us_per_request": ref["overhead_us_per_request"],
            "decode_us_in_process": decode_us,
            "met": bool(
                over_ceiling is not None
                and over_ceiling >= 0.85
                and over_naive is not None
                and over_naive >= 1.8
                and ref["errors"] == 0
            ),
        }
    return {"best_naive": best, "reference_clients": ref_clients, "levels": rows,
            "target": target}  # fmt: skip


# --------------------------------------------------------------------------- report


def table(payload: dict) -> str:
    lines = ["| server | clients | req/s | p50 ms | p95 ms | p99 ms | errors | mean batch "
             "| server cores | loadgen cores | foreign cores |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for kind, result in payload["servers"].items():
        for lv in result["levels"]:
            lat = lv["latency_ms"]
            batch = (lv.get("server_metrics") or {}).get("mean_batch_size", "")
            lines.append(f"| {kind} | {lv['clients']} | {lv['throughput_rps']:.1f} | {lat['p50']} "
                         f"| {lat['p95']} | {lat['p99']} | {lv['errors']} | {batch} "
                         f"| {lv['server_cores']} | {lv['loadgen_cores']} "
                         f"| {lv['foreign_cores']} |")  # fmt: skip
    for c in payload["ceiling"].get("levels", []):
        if c.get("samples_per_s"):
            lines.append(f"| ceiling (in-process, server's batch mix) | {c['clients']} "
                         f"| {c['samples_per_s']:.1f} | | | | | | {c['cores']} | "
                         f"| {c['foreign_cores']} |")  # fmt: skip
    for c in payload["ceiling"].get("levels", []):
        full = c.get("full_batches")
        if full:
            lines.append(f"| ceiling (in-process, full batches) | {c['clients']} "
                         f"| {full['samples_per_s']:.1f} | | | | | {full['batch_size']} | "
                         f"| | {full['foreign_cores']} |")  # fmt: skip
    cmp = payload["comparison"]
    lines += ["", f"best naive variant: {cmp['best_naive']}", "",
              "| clients | server / ceiling | server / best naive | overhead µs/request "
              "| decode µs (in-process) | decode µs (in server) | model ms/sample server "
              "/ in-process | model busy | extra CPU µs/request |",
              "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for r in cmp["levels"]:
        lines.append(f"| {r['clients']} | {r['server_over_ceiling']} "
                     f"| {r['server_over_best_naive']} | {r['overhead_us_per_request']} "
                     f"| {r['decode_us_in_process']} | {r['decode_us_in_server']} "
                     f"| {r['model_ms_per_sample_in_server']} / "
                     f"{r['model_ms_per_sample_in_process']} | {r['model_busy_fraction']} "
                     f"| {r['extra_cpu_us_per_request']} |")  # fmt: skip
    t = cmp["target"]
    if t:
        lines += ["", f"target at {t['clients']} clients (>= 0.85 of the ceiling, >= 1.8x the best "
                  f"naive, 0 errors): {'met' if t['met'] else 'NOT met'} "
                  f"({t['server_over_ceiling']}, {t['server_over_best_naive']}x, "
                  f"{t['server_errors']} errors)"]  # fmt: skip
    return "\n".join(lines)


def plot(payload: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"server": "tab:blue", "naive-serial": "tab:orange", "naive-threads": "tab:green"}
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    clients = payload["settings"]["clients"]
    for kind, result in payload["servers"].items():
        levels = result["levels"]
        x = [lv["clients"] for lv in levels]
        color = colors.get(kind)
        label = kind if kind != "server" else "modalforge serve (batching)"
        left.plot(x, [lv["throughput_rps"] for lv in levels], "o-", color=color, label=label)
        right.plot(x, [lv["latency_ms"]["p50"] for lv in levels], "o-", color=color,
                   label=f"{kind} p50")  # fmt: skip
        right.plot(x, [lv["latency_ms"]["p99"] for lv in levels], "s--", color=color,
                   label=f"{kind} p99", alpha=0.7)  # fmt: skip
    ceiling = [c for c in payload["ceiling"].get("levels", []) if c.get("samples_per_s")]
    if ceiling:
        left.plot([c["clients"] for c in ceiling], [c["samples_per_s"] for c in ceiling], "k:",
                  marker="^", label="ceiling: in-process at the server's batch sizes")  # fmt: skip
        full = [c for c in ceiling if c.get("full_batches")]
        left.plot([c["clients"] for c in full],
                  [c["full_batches"]["samples_per_s"] for c in full], ":", color="grey",
                  marker="v", label="in-process, full batches")  # fmt: skip
    for ax in (left, right):
        ax.set_xscale("log", base=2)
        ax.set_xticks(clients, [str(c) for c in clients])
        ax.set_xlabel("concurrent closed-loop clients")
        ax.grid(alpha=0.3)
    left.set_ylabel("requests / s")
    left.set_ylim(bottom=0)
    left.legend(fontsize=7, loc="upper left")
    right.set_yscale("log")
    right.set_ylabel("latency, ms (log)")
    right.legend(fontsize=6, ncol=2)
    m = payload["machine"]
    fig.suptitle(f"Serving {Path(payload['settings']['bundle']).parent.name} on {m['cpus']} CPUs "
                 f"({m['processor']}), loopback", fontsize=10)  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("torch", "fastapi", "starlette", "uvicorn", "aiohttp", "uvloop", "httptools"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def settings(args: argparse.Namespace) -> dict:
    internal = ("load", "naive_server", "variant", "port", "pid", "metrics", "clients_given")
    kept = {k: v for k, v in vars(args).items() if k not in internal}
    return {k: str(v) if isinstance(v, Path) else v for k, v in kept.items()}


def main_benchmark(args: argparse.Namespace) -> None:
    if args.quick:
        args.clients = args.clients if args.clients_given else [1, 32]
        args.seconds, args.warmup = min(args.seconds, 4.0), min(args.warmup, 1.0)
        args.ceiling_seconds = min(args.ceiling_seconds, 3.0)
        args.quiet_wait = min(args.quiet_wait, 2.0)
    args.fields = input_fields(args.bundle)
    naive = [f"naive-{v}" for v in args.naive.split(",") if v]
    for kind in naive:
        if kind.removeprefix("naive-") not in NAIVE_VARIANTS:
            raise SystemExit(f"--naive: variants are {', '.join(NAIVE_VARIANTS)}")
    ref = 32 if 32 in args.clients else max(args.clients)
    quiet = Quiet(args.quiet_threshold, args.quiet_wait, args.quiet_budget, args.foreign_limit,
                  args.retries)  # fmt: skip
    start = time.perf_counter()
    load_before = loadavg()
    with tempfile.TemporaryDirectory(prefix="modalforge-serve-bench-") as tmp:
        logs = Path(tmp)
        servers = measure_servers(["server"], args, quiet, logs)
        # back to back with the batching server, the servers stopped
        print("ceiling (in-process)", flush=True)
        ceiling = measure_ceiling(servers["server"]["levels"], args, quiet)
        gc.collect()  # the in-process engine goes before the naive servers load theirs
        servers.update(measure_servers(naive, args, quiet, logs))
    import torch

    payload = {
        "machine": {
            "cpus": os.cpu_count(),
            "processor": cpu_name(),
            "python": platform.python_version(),
            "versions": versions(),
            "torch_threads": torch.get_num_threads(),
            "loadavg_before": load_before,
            "loadavg_after": loadavg(),
        },
        "settings": settings(args),
        "notes": {"openmp": OPENMP_NOTE},
        "quiet": quiet.report(),
        "servers": servers,
        "ceiling": ceiling,
    }
    payload["comparison"] = compare(payload, ref)
    payload["total_seconds"] = round(time.perf_counter() - start, 1)
    write_results(args.out, payload, plot)
    text = table(payload)
    args.out.with_suffix(".md").write_text(
        f"# Serving benchmark ({os.cpu_count()} CPUs, {payload['total_seconds']} s)\n\n{text}\n"
    )
    print(text)
    print(f"wrote {args.out}, {args.out.with_suffix('.png')} and {args.out.with_suffix('.md')} "
          f"in {payload['total_seconds']} s")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, default=Path("runs/demo/bundle"))
    parser.add_argument("--manifest", type=Path, default=Path("data/emoji/manifest.csv"))
    parser.add_argument("--samples", type=int, default=64, help="distinct request bodies")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--clients", default=None, help="client counts (default 1,8,32,64)")
    parser.add_argument("--seconds", type=float, default=12.0, help="measured seconds per level")
    parser.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds per level")
    parser.add_argument("--max-requests", type=int, default=2000,
                        help="a level stops after this many measured requests")  # fmt: skip
    parser.add_argument("--timeout", type=float, default=60.0, help="per request, seconds")
    parser.add_argument("--max-batch", type=int, default=32, help="the server's --max-batch")
    parser.add_argument("--naive", default=",".join(NAIVE_VARIANTS),
                        help="naive variants to run (serial,threads; empty: none)")  # fmt: skip
    parser.add_argument("--ceiling-seconds", type=float, default=8.0,
                        help="most seconds timing the ceiling per level")  # fmt: skip
    parser.add_argument("--quiet-threshold", type=float, default=0.15,
                        help="busy fraction of all CPUs under which a level may start")  # fmt: skip
    parser.add_argument("--quiet-wait", type=float, default=10.0,
                        help="most seconds waiting for a quiet machine per level")  # fmt: skip
    parser.add_argument("--quiet-budget", type=float, default=60.0,
                        help="most seconds waiting for a quiet machine, in all")  # fmt: skip
    parser.add_argument("--foreign-limit", type=float, default=0.25,
                        help="CPU cores other processes may take during a level before it is "
                        "measured again")  # fmt: skip
    parser.add_argument("--retries", type=int, default=4,
                        help="levels measured again for other processes' load, in all")  # fmt: skip
    parser.add_argument("--quick", action="store_true",
                        help="1 and 32 clients (unless --clients), 4 s per level")  # fmt: skip
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/serve.json"))
    # internal modes: the load generator and the naive server run as their own processes
    parser.add_argument("--load", metavar="URL", help=argparse.SUPPRESS)
    parser.add_argument("--fields", default="image,text,audio", help=argparse.SUPPRESS)
    parser.add_argument("--pid", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--metrics", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--naive-server", metavar="BUNDLE", help=argparse.SUPPRESS)
    parser.add_argument("--variant", choices=NAIVE_VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.naive_server:
        run_naive_server(args)
        return
    args.clients_given = args.clients is not None
    args.clients = [int(c) for c in (args.clients or "1,8,32,64").split(",")]
    if args.load:
        if len(args.clients) != 1:
            raise SystemExit("--load takes one --clients count")
        args.clients = args.clients[0]
        result = asyncio.run(run_load(args))
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
        return
    main_benchmark(args)


if __name__ == "__main__":
    main()
