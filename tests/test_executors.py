"""The local executor's generic dynamic batcher (``handle(list) -> list``): requests that arrive
together share one call, a full queue refuses with Retry-After, a failure stays with the request
that caused it (a MemoryError included), and the out-of-memory hook runs only after every request
of the batch has its answer."""

from __future__ import annotations

import asyncio

import pytest

from splitserve.gateway.batching import DynamicBatcher, QueueFull, isolate


def square(items: list[int]) -> list[int]:
    """A batch handler: one answer per item; a negative item is a bad request, a huge one
    exhausts memory (a real failed allocation: 2**62 bytes), and so do several large ones together."""
    calls.append(list(items))
    if sum(items) > 10**5 and all(0 <= x <= 10**5 for x in items):
        bytearray(2**62)
    for x in items:
        if x < 0:
            raise ValueError(f"bad item {x}")
        if x > 10**6:
            bytearray(2**62)
    return [x * x for x in items]


calls: list[list[int]] = []


@pytest.fixture(autouse=True)
def _fresh_calls():
    calls.clear()


def test_isolate_retries_a_failed_batch_item_by_item():
    results, error = isolate(square, [2, -1, 3])
    assert results[0] == 4 and results[2] == 9
    assert isinstance(results[1], ValueError) and str(results[1]) == "bad item -1"
    assert isinstance(error, ValueError)
    assert calls == [[2, -1, 3], [2], [-1], [3]]
    assert isolate(square, [5, 6]) == ([25, 36], None) and calls[-1] == [5, 6]


async def _run(items: list[int], batcher: DynamicBatcher) -> list:
    batcher.start()
    try:
        return await asyncio.gather(*[batcher.submit(x) for x in items], return_exceptions=True)
    finally:
        await batcher.stop()


def test_requests_arriving_together_share_one_call_and_failures_stay_alone():
    batcher = DynamicBatcher(square, max_batch=8, max_wait_ms=200, max_queue=64)
    answers = asyncio.run(_run([1, 2, -3, 4], batcher))
    assert answers[:2] == [1, 4] and answers[3] == 16
    assert isinstance(answers[2], ValueError)
    assert calls[0] == [1, 2, -3, 4]  # one batch, then each alone
    assert calls[1:] == [[1], [2], [-3], [4]]


def test_a_memory_error_spares_its_batch_mates_and_the_hook_runs_after_them():
    seen: list = []

    async def scenario():
        futures: list[asyncio.Future] = []
        loop = asyncio.get_running_loop()

        def hook(reason: str) -> None:  # after the requests that were answered before it resume
            loop.call_soon(lambda: seen.append((reason, [f.done() for f in futures])))

        batcher = DynamicBatcher(square, max_batch=8, max_wait_ms=200, max_queue=64, on_out_of_memory=hook)
        batcher.start()
        try:
            futures += [asyncio.ensure_future(batcher.submit(x)) for x in (3, 10**9, 5)]
            return await asyncio.gather(*futures, return_exceptions=True)
        finally:
            await batcher.stop()

    answers = asyncio.run(scenario())
    assert answers[0] == 9 and answers[2] == 25
    assert isinstance(answers[1], MemoryError)
    assert calls == [[3, 10**9, 5], [3], [10**9], [5]]
    # every request has its answer before the hook (which stops the process) runs
    assert seen == [("out of memory in a batch of 3 requests", [True, True, True])]


def test_a_batch_that_runs_out_of_memory_as_a_whole_is_answered_alone_then_stops_the_process():
    """Each request fits alone; together they did not. They are answered, and the process still
    restarts: a failed allocation may have left it fragmented or half-updated."""
    seen: list[str] = []
    batcher = DynamicBatcher(square, max_batch=8, max_wait_ms=200, max_queue=64, on_out_of_memory=seen.append)
    assert asyncio.run(_run([60_000, 50_000], batcher)) == [60_000**2, 50_000**2]
    assert calls == [[60_000, 50_000], [60_000], [50_000]]
    assert seen == ["out of memory in a batch of 2 requests"]


def test_a_full_queue_refuses_with_retry_after():
    async def scenario():
        batcher = DynamicBatcher(square, max_batch=1, max_wait_ms=0, max_queue=3, size=lambda x: 2)
        batcher.start()
        try:
            first = asyncio.ensure_future(batcher.submit(1))  # 2 units waiting
            await asyncio.sleep(0)
            with pytest.raises(QueueFull) as refused:
                await batcher.submit(2)  # 2 + 2 > 3
            return await first, refused.value
        finally:
            await batcher.stop()

    answer, refused = asyncio.run(scenario())
    assert answer == 1
    assert refused.retry_after >= 1 and str(refused) == f"server busy: queue is full, retry in {refused.retry_after} s"
