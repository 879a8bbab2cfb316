"""`modalforge serve` vs the same app on Ray Serve (``--ray``), under closed-loop load.

    .venv/bin/python benchmarks/scale_serve.py --seconds 10            # a toy bundle, trained here
    .venv/bin/python benchmarks/scale_serve.py --bundle runs/demo/bundle \\
        --manifest data/emoji/manifest.csv --out benchmarks/results/scale_serve.json

``measure(bundle, seconds, clients=32)`` runs each variant in turn on this machine's CPUs and
returns throughput and latency percentiles (the load generator of ``benchmarks/serve.py``: a
separate process, aiohttp, pre-encoded multipart bodies posted to ``/v1/predict``):

* ``plain``: ``modalforge serve`` in a subprocess (torch threads = the machine's cores);
* ``ray-1``: 1 replica with every CPU (``--replica-cpus`` = cores);
* ``ray-2``: 2 replicas of half the CPUs each (the default 2-CPU machine: 1 each);
* ``ray-1-ongoing5``: as ray-1 with Ray's default ``max_ongoing_requests=5`` (what the
  ``2 x max_batch`` default is measured against);
* ``ray-2-serve-batch``: as ray-2 but batched by Ray's ``@serve.batch`` instead of the
  replica's own micro-batcher (``ServeBatchReplica``: the app's batcher queue replaced by a
  ``@serve.batch`` method running the same ``engine.handle`` in the same inference thread).

Ray variants share one local Ray (``num_cpus`` = cores, ``_machine.local_ray``: nothing
written to the home folder). Server CPU is measured for the plain server only (Ray's replicas
are other processes). Writes JSON beside a printed table.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent), str(HERE.parent / "src")]

import serve as serve_bench  # noqa: E402  (benchmarks/serve.py: the load generator)
from _machine import local_ray  # noqa: E402
from modalforge.serve.ray_serve import Replica  # noqa: E402

VARIANTS = ("plain", "ray-1", "ray-2", "ray-1-ongoing5", "ray-2-serve-batch")


class ServeBatchReplica(Replica):
    """A replica batched by Ray's ``@serve.batch``: the app's micro-batcher still admits
    requests (429s, depth), but what it queues goes to a ``@serve.batch`` method that runs the
    same ``engine.handle`` in the same inference thread."""

    async def __serve_build_asgi_app__(self):
        from ray import serve

        web = await super().__serve_build_asgi_app__()
        batcher, config = web.state.batcher, self.config

        @serve.batch(max_batch_size=config.max_batch,
                     batch_wait_timeout_s=config.batch_timeout_ms / 1000)  # fmt: skip
        async def batched(items):
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(batcher._executors[0], batcher.fn, items)

        async def enqueue(item):
            result = await batched(item)
            if isinstance(result, BaseException):
                raise result
            return result

        batcher._enqueue = enqueue
        return web


def _fields(bundle: Path) -> list[str]:
    return [f for f in serve_bench.input_fields(bundle) if f in ("image", "text", "audio")]


def _load_args(manifest: Path, fields: list[str], seconds: float, clients: int):
    return argparse.Namespace(seconds=seconds, warmup=2.0, max_requests=10**6, timeout=60.0,
                              manifest=manifest, fields=fields, samples=64, seed=0,
                              clients=[clients])  # fmt: skip


def _summary(level: dict) -> dict:
    keep = ("clients", "throughput_rps", "latency_ms", "ok", "errors", "error_kinds",
            "server_cores", "loadgen_cores", "foreign_cores")  # fmt: skip
    return {k: level.get(k) for k in keep}


def _ray_variant(variant: str, bundle: Path, args, logs: Path, cores: int) -> dict:
    from ray import serve

    from modalforge.serve.app import ServeConfig
    from modalforge.serve.ray_serve import DEPLOYMENT, RayOptions, application

    replicas = 2 if variant.startswith("ray-2") else 1
    options = RayOptions(replicas=replicas, replica_cpus=max(1, cores // replicas),
                         max_ongoing_requests=5 if "ongoing5" in variant else None)  # fmt: skip
    replica = ServeBatchReplica if "serve-batch" in variant else Replica
    if replica.__module__ != "__main__":  # imported (not run): its replicas cannot import it
        import ray.cloudpickle

        ray.cloudpickle.register_pickle_by_value(sys.modules[replica.__module__])
    port = serve_bench.free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    started = time.perf_counter()
    try:
        serve.run(application(bundle, ServeConfig(max_batch=32), options, replica=replica),
                  name=DEPLOYMENT, route_prefix="/")  # fmt: skip
        ready = round(time.perf_counter() - started, 1)
        server = SimpleNamespace(kind=variant, url=f"http://127.0.0.1:{port}",
                                 proc=SimpleNamespace(pid=0))  # fmt: skip
        level = serve_bench.run_level(server, args.clients[0], args, logs)
    finally:
        serve.shutdown()
    return {**_summary(level), "ready_seconds": ready, "replicas": replicas,
            "replica_cpus": options.replica_cpus,
            "max_ongoing_requests": options.deployment_options(ServeConfig())[
                "max_ongoing_requests"]}  # fmt: skip


def measure(bundle: Path, seconds: float, clients: int = 32, manifest: Path | None = None,
            variants: tuple[str, ...] = VARIANTS) -> dict:  # fmt: skip
    """Each variant under ``clients`` closed-loop clients for ``seconds`` (after a 2 s warm-up)
    -> {variant: {throughput_rps, latency_ms {mean, p50, p95, p99, max}, errors, ...}}.
    ``manifest``: rows to send (default: the tests' toy manifest, written to a temporary
    folder); only its image, text and audio columns that the bundle reads are sent."""
    bundle = Path(bundle).resolve()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    work = Path(tempfile.mkdtemp(prefix="scale-serve-"))
    if manifest is None:
        from tests.conftest import write_toy_manifest

        manifest = write_toy_manifest(work, tuple(_fields(bundle)))
    args = _load_args(Path(manifest), _fields(bundle), seconds, clients)
    args.bundle, args.max_batch = bundle, 32
    results: dict[str, dict] = {}
    if "plain" in variants:
        server = serve_bench.start_server("server", args, work)
        try:
            results["plain"] = {**_summary(serve_bench.run_level(server, clients, args, work)),
                                "ready_seconds": server.ready_seconds}  # fmt: skip
        finally:
            server.stop()
    ray_variants = [v for v in variants if v.startswith("ray-")]
    if ray_variants:
        with local_ray(cores, object_store_memory=256 * 2**20):
            for variant in ray_variants:
                results[variant] = _ray_variant(variant, bundle, args, work, cores)
    return {"bundle": str(bundle), "clients": clients, "seconds": seconds, "cores": cores,
            "variants": results}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, help="default: the tests' toy classifier, "
                        "trained into a temporary folder")  # fmt: skip
    parser.add_argument("--manifest", type=Path)
    parser.add_argument("--seconds", type=float, default=20.0, help="measured seconds each")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--out", type=Path, default=HERE / "results" / "scale_serve.json")
    args = parser.parse_args()
    os.environ["PYTHONPATH"] = os.pathsep.join(
        [str(HERE.parent / "src"), str(HERE.parent), os.environ.get("PYTHONPATH", "")]
    )
    bundle = args.bundle
    if bundle is None:
        from tests.serving import train_toy_bundle

        bundle = train_toy_bundle(Path(tempfile.mkdtemp(prefix="scale-serve-toy-")))
    variants = tuple(v for v in args.variants.split(",") if v)
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        raise SystemExit(f"--variants: unknown {unknown}; expected some of {list(VARIANTS)}")
    payload = measure(bundle, args.seconds, args.clients, args.manifest, variants)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"{'variant':<20} {'req/s':>8} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} {'errors':>6}")
    for name, r in payload["variants"].items():
        lat = r["latency_ms"]
        print(f"{name:<20} {r['throughput_rps']:>8} {lat['p50']!s:>8} {lat['p95']!s:>8} "
              f"{lat['p99']!s:>8} {r['errors']:>6}")  # fmt: skip
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
