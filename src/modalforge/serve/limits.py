"""Per-client abuse limits of the server: a token bucket (requests per second, with a burst) and
a cap on requests in flight, for each client.

A client is its API key when the server checks one (the key is verified before a limit is
looked up, so a made-up key never buys a fresh bucket), else its peer address; an IPv6 client is
its /64, the block one host is usually given. ``ClientLimits`` keeps at most ``max_clients``
entries: an entry whose bucket has refilled and that has nothing in flight says nothing a new
entry would not, so those are dropped first (oldest first), and past the cap the least recently
seen entry goes even if it has not refilled (that client gets a fresh burst, never a wrong
refusal). Entries with requests in flight are kept: they are bounded by the open connections.
"""

from __future__ import annotations

import hashlib
import ipaddress
import math
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

#: what ``ClientLimits.acquire`` answers when a client is over a limit: ``rate`` or ``concurrency``
RATE, CONCURRENCY = "rate", "concurrency"


@dataclass
class Refusal:
    reason: str  # RATE or CONCURRENCY
    retry_after: float  # seconds until a retry can succeed (an estimate for CONCURRENCY)
    message: str


@dataclass
class _Entry:
    tokens: float
    updated: float
    in_flight: int = 0


def client_id(scope: dict, api_key: bytes | None) -> str:
    """Who sent this request: ``key:<hash>`` for a verified API key (the key itself is not kept),
    else ``ip:<address>`` (an IPv6 address as its /64), ``unknown`` without a peer address."""
    if api_key is not None:
        return "key:" + hashlib.sha256(api_key).hexdigest()[:16]
    client = scope.get("client")
    host = client[0] if client else None
    if not host:
        return "unknown"
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:  # a unix socket path, or a test client's made-up name
        return f"ip:{host}"
    if ip.version == 6:
        if ip.ipv4_mapped is not None:
            return f"ip:{ip.ipv4_mapped}"
        return f"ip:{ipaddress.ip_network(f'{ip}/64', strict=False)}"
    return f"ip:{ip}"


class ClientLimits:
    """``rate`` requests per second per client with bursts of up to ``burst`` (``None``: no rate
    limit), and at most ``max_concurrency`` requests in flight per client (``None``: no cap).

    ``acquire(client)`` -> ``None`` (admitted: call ``release(client)`` when the request is done)
    or a ``Refusal``. Not thread-safe: the server calls it from its event loop only."""

    def __init__(
        self,
        rate: float | None = None,
        burst: int = 20,
        max_concurrency: int | None = None,
        max_clients: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if rate is not None and not (rate > 0 and math.isfinite(rate)):
            raise ValueError(f"rate_limit must be a positive number of requests/s, not {rate}")
        if burst < 1:
            raise ValueError(f"rate_burst must be at least 1, not {burst}")
        if max_concurrency is not None and max_concurrency < 1:
            raise ValueError(f"max_client_concurrency must be at least 1, not {max_concurrency}")
        if max_clients < 1:
            raise ValueError(f"max_clients must be at least 1, not {max_clients}")
        self.rate, self.burst = rate, burst
        self.max_concurrency = max_concurrency
        self.max_clients = max_clients
        self.clock = clock
        self.entries: OrderedDict[str, _Entry] = OrderedDict()  # least recently seen first

    @property
    def enabled(self) -> bool:
        return self.rate is not None or self.max_concurrency is not None

    def acquire(self, client: str) -> Refusal | None:
        now = self.clock()
        entry = self.entries.get(client)
        if entry is None:
            entry = self.entries[client] = _Entry(tokens=float(self.burst), updated=now)
            self._evict(now)
        else:
            self.entries.move_to_end(client)
            self._refill(entry, now)
        if self.max_concurrency is not None and entry.in_flight >= self.max_concurrency:
            return Refusal(CONCURRENCY, 1.0,
                           f"too many requests in flight from this client: at most "
                           f"{self.max_concurrency} at once")  # fmt: skip
        if self.rate is not None:
            if entry.tokens < 1:
                wait = (1 - entry.tokens) / self.rate
                return Refusal(RATE, wait,
                               f"rate limit of {self.rate:g} requests/s (bursts of {self.burst}) "
                               f"reached for this client; retry in {wait:.2f} s")  # fmt: skip
            entry.tokens -= 1
        entry.in_flight += 1
        return None

    def release(self, client: str) -> None:
        entry = self.entries.get(client)
        if entry is not None and entry.in_flight > 0:
            entry.in_flight -= 1

    def _refill(self, entry: _Entry, now: float) -> None:
        if self.rate is not None:
            entry.tokens = min(self.burst, entry.tokens + (now - entry.updated) * self.rate)
        entry.updated = now

    def _idle(self, entry: _Entry, now: float) -> bool:
        if entry.in_flight:
            return False
        return self.rate is None or entry.tokens + (now - entry.updated) * self.rate >= self.burst

    def _evict(self, now: float) -> None:
        """Drop the idle entries at the old end, then, past ``max_clients``, the oldest ones
        without requests in flight (each entry is looked at once at most)."""
        while len(self.entries) > 1:
            oldest = next(iter(self.entries.values()))
            if not self._idle(oldest, now):
                break
            self.entries.popitem(last=False)
        for _ in range(len(self.entries)):
            if len(self.entries) <= self.max_clients:
                break
            key, oldest = self.entries.popitem(last=False)
            if oldest.in_flight:
                self.entries[key] = oldest  # kept, now at the new end
