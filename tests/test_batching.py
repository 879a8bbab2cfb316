"""The micro-batcher on its own: batches form under load, a lone request never waits for a
window, backpressure, timeouts, errors and draining."""

import asyncio
import threading
import time

import pytest

from modalforge.serve.batching import Closed, MicroBatcher, QueueFull


def slow_double(delay: float = 0.02, calls: list | None = None):
    def fn(items):
        if calls is not None:
            calls.append(len(items))
        time.sleep(delay)
        return [2 * x for x in items]

    return fn


async def request(batcher: MicroBatcher, x, decode_s: float = 0.0):
    with batcher.admit() as ticket:
        if decode_s:
            await asyncio.sleep(decode_s)
        return await ticket.submit(x)


def test_concurrent_requests_share_batches_and_results_stay_in_order():
    calls = []

    async def main():
        b = MicroBatcher(slow_double(0.02, calls), max_batch=8, max_wait_s=0.005)
        await b.start()
        results = await asyncio.gather(*(request(b, i) for i in range(40)))
        await b.stop()
        return results, b

    results, b = asyncio.run(main())
    assert results == [2 * i for i in range(40)]
    assert sum(calls) == 40 and max(calls) == 8 and len(calls) <= 10
    assert b.stats.items == 40 and b.stats.sizes == {s: calls.count(s) for s in set(calls)}


def test_a_lone_request_does_not_wait_for_the_batch_window():
    async def main():
        b = MicroBatcher(slow_double(0.0), max_batch=32, max_wait_s=0.5)
        await b.start()
        await request(b, 1)  # warm the thread
        t0 = time.perf_counter()
        for i in range(5):
            assert await request(b, i) == 2 * i
        elapsed = (time.perf_counter() - t0) / 5
        await b.stop()
        return elapsed

    assert asyncio.run(main()) < 0.25  # far below the 0.5 s window: nobody else was on the way


def test_requests_still_decoding_are_waited_for_up_to_the_window():
    calls = []

    async def main():
        b = MicroBatcher(slow_double(0.0, calls), max_batch=8, max_wait_s=1.0)
        await b.start()
        # four requests admitted together; their decoding takes 0-60 ms
        await asyncio.gather(*(request(b, i, decode_s=0.02 * i) for i in range(4)))
        await b.stop()

    asyncio.run(main())
    assert calls == [4]


def test_backpressure_raises_queue_full_with_a_retry_hint():
    async def main():
        b = MicroBatcher(slow_double(0.2), max_batch=1, max_queue=2)
        await b.start()
        first = [asyncio.create_task(request(b, i)) for i in range(2)]
        await asyncio.sleep(0.05)
        with pytest.raises(QueueFull) as info:
            await request(b, 99)
        assert info.value.depth == 2 and info.value.retry_after >= 1
        assert [await t for t in first] == [0, 2]
        assert b.depth == 0
        await b.stop()

    asyncio.run(main())


def test_errors_reach_every_request_of_the_batch_and_the_worker_survives():
    def fn(items):
        if -1 in items:
            raise RuntimeError("model failed")
        return items

    async def main():
        b = MicroBatcher(fn, max_batch=4, max_wait_s=0.01)
        await b.start()
        results = await asyncio.gather(request(b, -1), request(b, 5), return_exceptions=True)
        assert all(isinstance(r, RuntimeError) for r in results)
        assert await request(b, 7) == 7  # the worker is still there
        await b.stop()

    asyncio.run(main())


def test_a_request_that_timed_out_in_the_queue_is_skipped():
    seen = []

    def fn(items):
        seen.extend(items)
        time.sleep(0.1)
        return items

    async def main():
        b = MicroBatcher(fn, max_batch=1)
        await b.start()
        busy = asyncio.create_task(request(b, "first"))
        await asyncio.sleep(0.02)
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(request(b, "late"), 0.03)
        assert await busy == "first"
        await asyncio.sleep(0.05)
        await b.stop()

    asyncio.run(main())
    assert seen == ["first"]


def test_stop_drains_queued_work_and_refuses_new_requests():
    async def main():
        b = MicroBatcher(slow_double(0.05), max_batch=2)
        await b.start()
        tasks = [asyncio.create_task(request(b, i)) for i in range(6)]
        await asyncio.sleep(0.01)
        await b.stop(drain_timeout=5)
        assert [t.result() for t in tasks] == [0, 2, 4, 6, 8, 10]
        with pytest.raises(Closed):
            await request(b, 1)

    asyncio.run(main())


def test_each_worker_thread_runs_the_initializer():
    names = set()

    async def main():
        b = MicroBatcher(
            lambda items: items,
            workers=2,
            thread_init=lambda: names.add(threading.current_thread().name),
        )
        await b.start()
        await asyncio.gather(*(request(b, i) for i in range(20)))
        await b.stop()

    asyncio.run(main())
    assert names and all(n.startswith("modalforge-infer-") for n in names)


def test_an_item_that_fails_alone_fails_alone():
    def fn(items):
        return [ValueError(f"bad {x}") if x < 0 else x for x in items]

    async def main():
        b = MicroBatcher(fn, max_batch=4, max_wait_s=0.01)
        await b.start()
        results = await asyncio.gather(request(b, -1), request(b, 5), return_exceptions=True)
        await b.stop()
        return results

    bad, good = asyncio.run(main())
    assert isinstance(bad, ValueError) and str(bad) == "bad -1" and good == 5
