"""Prometheus metrics of one server, in its own registry (two apps in one process never mix)."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class ServerMetrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter(
            "modalforge_requests",
            "HTTP requests by route and status",
            ["route", "status"],
            registry=r,
        )
        self.latency = Histogram(
            "modalforge_request_seconds",
            "HTTP request latency",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.errors = Counter(
            "modalforge_errors", "Refused or failed requests by kind", ["route", "kind"], registry=r
        )
        self.batch_size = Histogram(
            "modalforge_batch_size", "Samples per model call", buckets=BATCH_BUCKETS, registry=r
        )
        self.batches = Counter(
            "modalforge_batches", "Model calls by exact batch size", ["size"], registry=r
        )
        self.batch_seconds = Histogram(
            "modalforge_batch_seconds", "Model time per batch", buckets=LATENCY_BUCKETS, registry=r
        )
        self.queue_wait = Histogram(
            "modalforge_queue_wait_seconds",
            "Time a sample waited in the queue before its batch ran",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.decode_seconds = Histogram(
            "modalforge_decode_seconds",
            "Request decoding + preprocessing time per sample",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_depth = Gauge(
            "modalforge_queue_depth",
            "Requests admitted and not finished (decoding, queued, running)",
            registry=r,
        )
        self.limited = Counter(
            "modalforge_rate_limited",
            "Requests refused 429 by a per-client limit, by reason (rate, concurrency)",
            ["reason"],
            registry=r,
        )
        for reason in ("rate", "concurrency"):
            self.limited.labels(reason)

    def track_queue(self, depth: Callable[[], int]) -> None:
        self.queue_depth.set_function(depth)

    def observe_request(self, route: str, status: int, seconds: float) -> None:
        self.requests.labels(route, str(status)).inc()
        self.latency.labels(route).observe(seconds)

    def error(self, route: str, kind: str) -> None:
        self.errors.labels(route, kind).inc()

    def rate_limited(self, reason: str) -> None:
        self.limited.labels(reason).inc()

    def observe_batch(self, size: int, seconds: float, queue_wait: float) -> None:
        self.batch_size.observe(size)
        self.batches.labels(str(size)).inc()
        self.batch_seconds.observe(seconds)
        self.queue_wait.observe(queue_wait)

    def render(self) -> bytes:
        return generate_latest(self.registry)
