"""Ray Serve: the same app as ``modalforge serve`` (``create_app``: every route, the playground,
``/metrics``) in N replicas behind Ray's HTTP proxy (``modalforge serve BUNDLE --ray``, or
``serve run configs/ray-serve.yaml`` with the builder ``app`` below on a running cluster).

Each replica loads the bundle itself (``Engine.from_bundle``; nothing is pickled from the driver)
and builds the app in ``Replica.__serve_build_asgi_app__``, which Ray 2.60's ``@serve.ingress()``
calls after the constructor; Ray then runs the app's lifespan (batcher start, warm-up) before the
replica takes requests, and its shutdown when the replica stops. Each replica has its own
micro-batcher (measured against Ray's ``@serve.batch``: ``benchmarks/scale_serve.py``).

What a replica adds to the plain app, through ``serve.app.Hooks``:

* torch threads = the CPUs Ray gave the replica (``--replica-cpus``), not the machine's cores;
* one tuning for all: the first replica to warm up runs ``Engine.tune`` and publishes it on the
  deployment's board (a Serve deployment-scoped actor, ``Board``); the others wait for it and
  ``Engine.apply_tuning`` it, so every replica chunks and pads alike;
* ``/metrics``: every replica's own exposition, labelled ``replica="..."``, merged into one
  (``merge_metrics``); each replica pushes its own to the board every ``PUSH_EVERY_S`` and on a
  scrape; a replica silent for ``STALE_AFTER_S`` is dropped;
* ``/readyz``: the answering replica's status plus every replica's (status, queue depth,
  tuning, seconds since it reported); Serve's health check
  (``check_health``) fails unless the replica's engine is ready.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from modalforge.serve.app import Hooks, ServeConfig

log = logging.getLogger("modalforge.serve")

DEPLOYMENT = "modalforge"
BOARD = "board"
PUSH_EVERY_S = 2.0  # a replica's metrics and status go to the board this often
STALE_AFTER_S = 10.0  # a replica that has not reported for this long is left out
TUNING_LEASE_S = 300.0  # a replica that claimed the tuning and published nothing by then: retake


@dataclass
class RayOptions:
    """How many replicas and what each gets (``modalforge serve --ray`` flags / builder args).

    ``max_ongoing_requests``: requests Ray's proxy lets into one replica at once; None:
    ``2 x max_batch`` (one batch running, the next one filling; Ray's default 5 caps every batch
    at 5). ``min_replicas`` / ``max_replicas`` turn on Serve's autoscaling (``replicas`` is then
    the initial count), aiming at ``target_ongoing_requests`` per replica (None: ``max_batch``).
    """

    replicas: int = 1
    replica_cpus: float = 1.0
    max_ongoing_requests: int | None = None
    min_replicas: int | None = None
    max_replicas: int | None = None
    target_ongoing_requests: float | None = None

    def check(self) -> None:
        if self.replicas < 1:
            raise ValueError(f"replicas must be at least 1, not {self.replicas}")
        if not (0 < self.replica_cpus < math.inf):
            raise ValueError(f"replica CPUs must be a positive number, not {self.replica_cpus}")
        if self.max_ongoing_requests is not None and self.max_ongoing_requests < 1:
            raise ValueError("max ongoing requests must be at least 1")
        lo, hi = self.min_replicas, self.max_replicas
        if (lo is None) != (hi is None):
            raise ValueError("autoscaling takes both min replicas and max replicas")
        if lo is not None and hi is not None and not (0 <= lo <= hi and hi >= 1):
            raise ValueError(f"replicas must satisfy 0 <= min ({lo}) <= max ({hi}), max >= 1")
        if self.target_ongoing_requests is not None and not self.target_ongoing_requests > 0:
            raise ValueError("target ongoing requests must be positive")

    def deployment_options(self, config: ServeConfig) -> dict[str, Any]:
        """``serve.deployment(...)`` keyword arguments for replicas serving with ``config``."""
        self.check()
        ongoing = self.max_ongoing_requests or 2 * config.max_batch * config.workers
        options: dict[str, Any] = {
            "ray_actor_options": {"num_cpus": self.replica_cpus},
            "max_ongoing_requests": ongoing,
            # more than a replica's admission queue waiting at the proxy: Ray answers 503
            "max_queued_requests": config.max_queue,
            "graceful_shutdown_timeout_s": config.drain_timeout_s,
        }
        if self.min_replicas is None:
            options["num_replicas"] = self.replicas
        else:
            target = self.target_ongoing_requests or float(config.max_batch)
            options["autoscaling_config"] = {
                "min_replicas": self.min_replicas,
                "max_replicas": self.max_replicas,
                "initial_replicas": min(max(self.replicas, self.min_replicas), self.max_replicas),
                "target_ongoing_requests": target,
            }
        return options


class Board:
    """What one deployment's replicas share (a Serve deployment-scoped actor, 0 CPUs): the
    tuning, and each replica's last report (status, queue depth, tuning, metrics)."""

    def __init__(self) -> None:
        self.tuning: dict[str, Any] | None = None
        self.tuned_by: str | None = None
        self.claim: tuple[str, float] | None = None  # (replica, when)
        self.reports: dict[str, dict[str, Any]] = {}

    def claim_tuning(self, replica: str) -> tuple[str, dict[str, Any] | None]:
        """-> ("apply", tuning) once published; ("tune", None) to the replica that should tune
        (the first to ask, or anyone once its claim is ``TUNING_LEASE_S`` old); else
        ("wait", None)."""
        if self.tuning is not None:
            return "apply", self.tuning
        now = time.monotonic()
        if self.claim is None or self.claim[0] == replica or now - self.claim[1] > TUNING_LEASE_S:
            self.claim = (replica, now)
            return "tune", None
        return "wait", None

    def publish_tuning(self, replica: str, tuning: dict[str, Any]) -> dict[str, Any]:
        """Keep the first tuning published; -> the one kept."""
        if self.tuning is None:
            self.tuning, self.tuned_by = tuning, replica
        return self.tuning

    def report(self, replica: str, report: dict[str, Any]) -> None:
        self.reports[replica] = {**report, "seen": time.monotonic()}

    def leave(self, replica: str) -> None:
        self.reports.pop(replica, None)

    def view(self) -> dict[str, Any]:
        """Replicas heard from within ``STALE_AFTER_S`` (older reports are dropped)."""
        now = time.monotonic()
        for replica in [r for r, v in self.reports.items() if now - v["seen"] > STALE_AFTER_S]:
            del self.reports[replica]
        reports = {}
        for replica, report in self.reports.items():
            entry = {k: v for k, v in report.items() if k != "seen"}
            reports[replica] = {**entry, "age_s": round(now - report["seen"], 3)}
        return {"tuned_by": self.tuned_by, "replicas": reports}


def merge_metrics(by_replica: dict[str, bytes]) -> bytes:
    """Prometheus expositions of several replicas -> one: every sample labelled with its
    ``replica``, one HELP / TYPE per metric family."""
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.metrics_core import Metric
    from prometheus_client.parser import text_string_to_metric_families
    from prometheus_client.samples import Sample

    families: dict[str, Metric] = {}
    for replica in sorted(by_replica):
        for family in text_string_to_metric_families(by_replica[replica].decode()):
            merged = families.get(family.name)
            if merged is None:
                merged = families[family.name] = Metric(
                    family.name, family.documentation, family.type, family.unit
                )
            for s in family.samples:
                labels = {**s.labels, "replica": replica}
                merged.samples.append(Sample(s.name, labels, s.value, s.timestamp, s.exemplar))

    class Merged:
        def collect(self):
            return list(families.values())

    registry = CollectorRegistry(auto_describe=False)
    registry.register(Merged())
    return generate_latest(registry)


def _replica_threads(workers: int) -> int:
    """Torch threads per inference thread: the CPUs Ray assigned this replica, split between its
    inference threads (at least 1)."""
    import ray

    cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1.0)
    return max(1, int(cpus) // max(1, workers))


class Replica:
    """One Ray Serve replica of ``modalforge serve``: its own engine, batcher and app. Made a
    deployment by ``application`` (``serve.ingress()`` + ``serve.deployment``)."""

    def __init__(self, bundle: str, config: dict[str, Any], name: str | None = None,
                 variant: str = "pytorch", index: str | None = None) -> None:  # fmt: skip
        self.bundle, self.name, self.variant, self.index = bundle, name, variant, index
        config = {**config, "allow_urls": tuple(config.get("allow_urls") or ())}
        self.config = ServeConfig(**config)
        self.web: Any = None  # the app (not ``self.app``: Ray's wrapper owns that name)
        self._pusher: asyncio.Task | None = None

    async def __serve_build_asgi_app__(self):
        import torch
        from ray import serve

        from modalforge.index import EmbeddingIndex
        from modalforge.runtime.engine import Engine
        from modalforge.serve.app import create_app

        self.replica = serve.get_replica_context().replica_tag
        self.board = serve.get_deployment_actor(BOARD)
        threads = _replica_threads(self.config.workers)
        config = dataclasses.replace(self.config, torch_threads=threads)
        # load single-threaded; the inference thread sets its own threads (see cli/serve.py)
        torch.set_num_threads(1)
        engine = Engine.from_bundle(self.bundle, name=self.name, variant=self.variant)
        found = EmbeddingIndex.load(self.index) if self.index else None
        hooks = Hooks(warmup=self._warmup, started=self._started, stopping=self._stopping,
                      metrics=self._metrics, readiness=self._readiness)  # fmt: skip
        self.web = create_app(engine, config, index=found, hooks=hooks)
        log.info("modalforge: replica %s of %s, %d torch thread(s)", self.replica, engine.name,
                 threads)  # fmt: skip
        return self.web

    # -- Serve's hooks ----------------------------------------------------------------------------
    async def check_health(self) -> None:
        """Serve calls this periodically: the replica is healthy while its engine is ready."""
        status = self._status()
        if status != "ready":
            raise RuntimeError(f"replica {self.replica}: the engine is {status}")

    # -- the app's hooks --------------------------------------------------------------------------
    def _warmup(self, engine, max_batch: int) -> None:
        """In the inference thread: warm up, then tune (the first replica) or wait for the first
        replica's tuning and apply it (the others)."""
        import ray

        engine.warmup(max_batch, tune=False)
        while True:
            verdict, tuning = ray.get(self.board.claim_tuning.remote(self.replica))
            if verdict == "tune":
                mine = engine.tune(max_batch)
                tuning = ray.get(self.board.publish_tuning.remote(self.replica, mine))
            if tuning is not None:
                engine.apply_tuning(tuning)
                return
            time.sleep(0.2)

    async def _started(self) -> None:
        await self._push()
        self._pusher = asyncio.create_task(self._push_every())

    async def _stopping(self) -> None:
        if self._pusher is not None:
            self._pusher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._pusher
        with contextlib.suppress(Exception):  # the board may be gone already (shutdown)
            await self.board.leave.remote(self.replica)

    async def _metrics(self, own: bytes) -> bytes:
        reports = await self._push(own)
        texts = {r: v["metrics"] for r, v in reports["replicas"].items() if "metrics" in v}
        return merge_metrics({**texts, self.replica: own})

    async def _readiness(self, body: dict[str, Any]) -> dict[str, Any]:
        reports = await self._push()
        replicas = {r: {k: v[k] for k in ("status", "queue_depth", "tuning", "age_s")}
                    for r, v in reports["replicas"].items()}  # fmt: skip
        replicas[self.replica] = {**body, "tuning": self.web.state.engine.tuning, "age_s": 0.0}
        ready = sum(v["status"] == "ready" for v in replicas.values())
        return {**body, "replica": self.replica, "ready_replicas": ready,
                "tuned_by": reports["tuned_by"], "replicas": replicas}  # fmt: skip

    # -- reporting --------------------------------------------------------------------------------
    def _status(self) -> str:
        return self.web.state.context.state["status"] if self.web is not None else "starting"

    async def _push(self, metrics: bytes | None = None) -> dict[str, Any]:
        """Report this replica to the board; -> the board's view of every replica."""
        app = self.web.state
        report = {"status": self._status(), "queue_depth": app.batcher.depth,
                  "tuning": app.engine.tuning,
                  "metrics": metrics if metrics is not None else app.metrics.render()}  # fmt: skip
        await self.board.report.remote(self.replica, report)
        return await self.board.view.remote()

    async def _push_every(self) -> None:
        while True:
            await asyncio.sleep(PUSH_EVERY_S)
            try:
                await self._push()
            except Exception as err:  # the board restarting: report again next time
                log.warning("modalforge: replica %s could not report: %r", self.replica, err)


def application(bundle: str | Path, config: ServeConfig | None = None,
                options: RayOptions | None = None, name: str | None = None,
                variant: str = "pytorch", index: str | Path | None = None,
                replica: type = Replica):  # fmt: skip
    """A Ray Serve application of ``bundle``: ``options.replicas`` replicas of ``replica`` (a
    ``Replica`` subclass, for benchmarks) serving with ``config``; run it with ``serve.run``.
    The bundle (and index) path must be readable by every node that runs a replica."""
    import ray
    from ray import serve
    from ray.serve.config import DeploymentActorConfig

    config = config or ServeConfig()
    options = options or RayOptions()
    board = DeploymentActorConfig(name=BOARD, actor_class=ray.remote(Board),
                                  actor_options={"num_cpus": 0})  # fmt: skip
    deployment = serve.deployment(
        serve.ingress()(replica),
        name=DEPLOYMENT,
        deployment_actors=[board],
        **options.deployment_options(config),
    )
    fields = dataclasses.asdict(config)
    return deployment.bind(str(Path(bundle).resolve()), fields, name, variant,
                           str(Path(index).resolve()) if index is not None else None)  # fmt: skip


_OPTIONS = {f.name for f in dataclasses.fields(RayOptions)}
_CONFIG = {f.name for f in dataclasses.fields(ServeConfig)} - {"torch_threads"}


def app(args: dict[str, Any]):
    """The builder ``serve run`` calls (``import_path: modalforge.serve.ray_serve:app``):
    ``args`` = ``bundle`` (required), ``name``, ``variant``, ``index``, any ``RayOptions``
    field (``replicas``, ``replica_cpus``, ``max_ongoing_requests``, ``min_replicas``,
    ``max_replicas``, ``target_ongoing_requests``) and any ``ServeConfig`` field
    (``max_batch``, ``api_key``, ...) -> the Application."""
    args = dict(args)
    if "bundle" not in args:
        raise ValueError("modalforge.serve.ray_serve:app needs args: {bundle: PATH, ...}")
    bundle = args.pop("bundle")
    named = {k: args.pop(k) for k in ("name", "variant", "index") if k in args}
    unknown = sorted(set(args) - _OPTIONS - _CONFIG)
    if unknown:
        raise ValueError(f"unknown args {unknown}; expected bundle, name, variant, index, "
                         f"{sorted(_OPTIONS)} or {sorted(_CONFIG)}")  # fmt: skip
    options = RayOptions(**{k: v for k, v in args.items() if k in _OPTIONS})
    config = ServeConfig(**{k: v for k, v in args.items() if k in _CONFIG})
    return application(bundle, config, options, **named)


__all__ = ["BOARD", "Board", "RayOptions", "Replica", "app", "application", "merge_metrics"]
