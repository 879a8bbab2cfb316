"""Dynamic batching: items from concurrent requests -> one call of a batch function.

One asyncio queue feeds ``workers`` inference threads. A worker that is free takes what is
queued (up to ``max_batch``) and sends it at once, unless requests that have been admitted are
still on their way (their bodies being parsed): then it waits for them, up to ``max_wait_s``.
So a lone client never waits for a batch window, and a busy server forms its batches while the
model runs.

    batcher = MicroBatcher(engine.handle, max_batch=32, max_wait_s=0.005, max_queue=256)
    await batcher.start()
    with batcher.admit() as ticket:  # raises QueueFull when max_queue requests are waiting
        fields = parse(request)
        result = await ticket.submit(fields)

Why a small module of ours rather than LitServe or Ray Serve's ``@serve.batch``: the serving
issue's calibration on these 2-core machines found LitServe spending more CPU per request and
Ray Serve's processes too heavy for 2 cores (we did not re-run those); what matters here is that
the batch function runs in one long-lived thread that owns torch's OpenMP threads, and that
costs a few tens of microseconds per request in the server's own process. Measured with
``benchmarks/serve.py``; the numbers are in the README.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any


class QueueFull(Exception):
    """Backpressure: the server has ``max_queue`` requests waiting; retry after ``retry_after``."""

    def __init__(self, depth: int, retry_after: float) -> None:
        super().__init__(f"the server is busy ({depth} requests waiting); retry later")
        self.depth = depth
        self.retry_after = retry_after


class Closed(Exception):
    """The batcher is stopping and takes no new work."""


class Ticket:
    """A request's place in the batcher: counted as "decoding" until ``submit``."""

    def __init__(self, batcher: MicroBatcher) -> None:
        self.batcher = batcher
        self.decoding = True

    async def submit(self, item: Any) -> Any:
        """Queue ``item`` and wait for its result."""
        if self.decoding:
            self.decoding = False
            self.batcher._admitted -= 1
        return await self.batcher._enqueue(item)


@dataclass
class _Job:
    item: Any
    future: asyncio.Future
    queued_at: float = field(default_factory=time.perf_counter)


@dataclass
class BatchStats:
    batches: int = 0
    items: int = 0
    sizes: dict[int, int] = field(default_factory=dict)  # batch size -> how many batches
    busy_seconds: float = 0.0

    def record(self, size: int, seconds: float) -> None:
        self.batches += 1
        self.items += size
        self.sizes[size] = self.sizes.get(size, 0) + 1
        self.busy_seconds += seconds


class MicroBatcher:
    """``fn(list of items) -> list of results`` (same length, same order), run in worker threads.

    ``on_batch(size, seconds, queue_wait_seconds)`` is called after every batch (metrics).
    ``thread_init`` runs once in each worker thread (e.g. ``torch.set_num_threads``).
    """

    def __init__(
        self,
        fn: Callable[[list[Any]], list[Any]],
        max_batch: int = 32,
        max_wait_s: float = 0.005,
        max_queue: int = 256,
        workers: int = 1,
        on_batch: Callable[[int, float, float], None] | None = None,
        thread_init: Callable[[], None] | None = None,
    ) -> None:
        if max_batch < 1 or workers < 1 or max_queue < 1:
            raise ValueError("max_batch, workers and max_queue must be at least 1")
        self.fn = fn
        self.max_batch = max_batch
        self.max_wait_s = max(0.0, max_wait_s)
        self.max_queue = max_queue
        self.workers = workers
        self.on_batch = on_batch
        self.thread_init = thread_init
        self.stats = BatchStats()
        self._queue: asyncio.Queue[_Job] | None = None
        self._tasks: list[asyncio.Task] = []
        self._executors: list[concurrent.futures.ThreadPoolExecutor] = []
        self._admitted = 0  # admitted requests that have not submitted yet (decoding)
        self._running = 0  # items inside a running batch
        self._closed = False

    # -- state --------------------------------------------------------------------------------
    @property
    def depth(self) -> int:
        """Requests admitted and not finished: decoding, queued or in a running batch."""
        queued = self._queue.qsize() if self._queue is not None else 0
        return self._admitted + queued + self._running

    @property
    def queued(self) -> int:
        return self._queue.qsize() if self._queue is not None else 0

    # -- lifecycle ----------------------------------------------------------------------------
    async def start(self) -> None:
        self._queue = asyncio.Queue()
        self._closed = False
        for i in range(self.workers):
            executor = concurrent.futures.ThreadPoolExecutor(
                max_workers=1,
                thread_name_prefix=f"modalforge-infer-{i}",
                initializer=self.thread_init,
            )
            self._executors.append(executor)
            self._tasks.append(asyncio.create_task(self._worker(executor)))

    async def run_in_worker(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn()`` in the first inference thread (warm-up: its threads, its lazy state)."""
        if not self._executors:
            raise Closed("the batcher has not started")
        return await asyncio.get_running_loop().run_in_executor(self._executors[0], fn)

    async def stop(self, drain_timeout: float = 30.0) -> None:
        """Take no new work, finish what is queued (up to ``drain_timeout``), stop the threads."""
        self._closed = True
        deadline = time.monotonic() + drain_timeout
        while self.depth > 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        for worker in self._tasks:
            worker.cancel()
        for worker in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await worker
        while self._queue is not None and not self._queue.empty():
            job = self._queue.get_nowait()
            if not job.future.done():
                job.future.set_exception(Closed("the server is shutting down"))
        for executor in self._executors:
            executor.shutdown(wait=True)
        self._tasks, self._executors = [], []

    # -- requests -----------------------------------------------------------------------------
    @contextlib.contextmanager
    def admit(self) -> Iterator[Ticket]:
        """Reserve a place for one request (raises QueueFull / Closed); decode while holding it,
        then ``await ticket.submit(item)``."""
        if self._closed:
            raise Closed("the server is shutting down")
        depth = self.depth
        if depth >= self.max_queue:
            raise QueueFull(depth, self.retry_after())
        self._admitted += 1
        ticket = Ticket(self)
        try:
            yield ticket
        finally:
            if ticket.decoding:
                self._admitted -= 1

    def retry_after(self) -> float:
        """Seconds until the queue has likely drained: depth x observed seconds per item."""
        per_item = self.stats.busy_seconds / self.stats.items if self.stats.items else 0.05
        return max(1.0, self.depth * per_item / self.workers)

    async def _enqueue(self, item: Any) -> Any:
        if self._queue is None or self._closed:
            raise Closed("the server is shutting down")
        future = asyncio.get_running_loop().create_future()
        self._queue.put_nowait(_Job(item, future))
        return await future

    # -- the workers --------------------------------------------------------------------------
    async def _collect(self) -> list[_Job]:
        assert self._queue is not None
        loop = asyncio.get_running_loop()
        jobs: list[_Job] = []
        while not jobs:
            job = await self._queue.get()
            if not job.future.done():  # a request that timed out while queued is skipped
                jobs.append(job)
        deadline = loop.time() + self.max_wait_s
        while len(jobs) < self.max_batch:
            try:
                job = self._queue.get_nowait()
            except asyncio.QueueEmpty:
                remaining = deadline - loop.time()
                if self._admitted == 0 or remaining <= 0:  # nobody else is on the way
                    break
                try:
                    job = await asyncio.wait_for(self._queue.get(), remaining)
                except TimeoutError:
                    break
            if not job.future.done():
                jobs.append(job)
        return jobs

    async def _worker(self, executor: concurrent.futures.ThreadPoolExecutor) -> None:
        loop = asyncio.get_running_loop()
        while True:
            jobs = await self._collect()
            self._running += len(jobs)
            started = time.perf_counter()
            waited = sum(started - j.queued_at for j in jobs) / len(jobs)
            try:
                results = await loop.run_in_executor(executor, self.fn, [j.item for j in jobs])
                if len(results) != len(jobs):
                    raise RuntimeError(
                        f"batch function returned {len(results)} results for {len(jobs)} items"
                    )
            except Exception as err:
                for job in jobs:
                    if not job.future.done():
                        job.future.set_exception(err)
            else:
                for job, result in zip(jobs, results, strict=True):
                    if job.future.done():
                        continue
                    if isinstance(result, BaseException):  # this item failed, not the batch
                        job.future.set_exception(result)
                    else:
                        job.future.set_result(result)
            finally:
                seconds = time.perf_counter() - started
                self._running -= len(jobs)
                self.stats.record(len(jobs), seconds)
                if self.on_batch is not None:
                    self.on_batch(len(jobs), seconds, waited)
