"""A generic dynamic batcher with a bounded queue, and per-request isolation.

Items that arrive within ``max_wait`` of each other go to one ``handle(items) -> results`` call on
a worker thread (for the gateway: one decode for many requests). When ``max_queue`` units of work
are already waiting, new items are refused (:class:`QueueFull`, 503 + Retry-After) instead of
growing memory without bound. A failing batch is retried item by item (:func:`isolate`), so one
bad request cannot fail its batch-mates — a ``MemoryError`` included.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from .metrics import GatewayMetrics

log = logging.getLogger("splitserve.gateway")

T = TypeVar("T")
Handle = Callable[[list[Any]], Sequence[Any]]


class Unavailable(Exception):
    """The gateway cannot take this request now; retry after ``retry_after`` seconds (503)."""

    def __init__(self, reason: str, retry_after: int):
        super().__init__(f"server busy: {reason}, retry in {retry_after} s")
        self.retry_after = retry_after


class QueueFull(Unavailable):
    def __init__(self, retry_after: int):
        super().__init__("queue is full", retry_after)


def out_of_memory(error: BaseException) -> bool:
    """A failed allocation: Python's ``MemoryError``, or torch's CPU allocator, which raises a
    plain ``RuntimeError``. Either may leave the process unable to answer anything."""
    return isinstance(error, MemoryError) or (
        isinstance(error, RuntimeError) and "can't allocate memory" in str(error))


def isolate(handle: Handle, items: list[Any]) -> tuple[list[Any], BaseException | None]:
    """``handle(items)``; if that raises, each item again alone, so a failure stays with the item
    that caused it. Returns one result or exception per item, and the batch's own exception."""
    try:
        return list(handle(items)), None
    except Exception as e:  # noqa: BLE001 — the batch's failure is sorted out item by item
        if len(items) == 1:
            log.error("request failed", exc_info=e)
            return [e], e
        log.warning("batch of %d requests failed (%s: %s); retrying them one by one", len(items),
                    type(e).__name__, e)
        results = []
        for item in items:
            try:
                results.append(handle([item])[0])
            except Exception as alone:  # noqa: BLE001
                log.error("request failed", exc_info=alone)
                results.append(alone)
        return results, e


@dataclass
class _Pending(Generic[T]):
    item: T
    size: int
    future: asyncio.Future


class DynamicBatcher(Generic[T]):
    """Batches ``submit(item)`` calls into ``handle(items)`` on one worker thread.

    ``handle`` returns one result per item, or an exception instance for an item that failed
    alone. ``size(item)`` counts an item's work (images) against ``max_batch`` and ``max_queue``.
    ``on_out_of_memory`` runs once a batch's failures are sorted out, after every item is answered.
    """

    def __init__(self, handle: Handle, *, max_batch: int, max_wait_ms: float, max_queue: int,
                 size: Callable[[T], int] = lambda item: 1, metrics: GatewayMetrics | None = None,
                 on_out_of_memory: Callable[[str], None] | None = None):
        self.handle, self.size = handle, size
        self.max_batch = max_batch
        self.max_wait = max_wait_ms / 1000
        self.max_queue = max_queue
        self.metrics = metrics or GatewayMetrics()
        self.on_out_of_memory = on_out_of_memory
        self._queue: asyncio.Queue[_Pending[T]] = asyncio.Queue()
        self._waiting = 0  # work queued, not yet taken into a batch
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="splitserve-batch")
        self._task: asyncio.Task | None = None
        self._last_batch_seconds = 0.05

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="splitserve-batcher")

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def run_in_worker(self, fn, *args):
        """Run ``fn`` on the batch worker thread (e.g. the warm-up), in order with the batches."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def submit(self, item: T):
        size = self.size(item)
        if self._waiting + size > self.max_queue:
            self.metrics.rejected.inc()
            raise QueueFull(retry_after=max(1, round(self._last_batch_seconds * 2)))
        future = asyncio.get_running_loop().create_future()
        self._waiting += size
        self.metrics.queue_images.set(self._waiting)
        await self._queue.put(_Pending(item, size, future))
        return await future

    async def _next_batch(self) -> list[_Pending[T]]:
        first = await self._queue.get()
        batch, size = [first], first.size
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.max_wait
        while size < self.max_batch:
            if self._queue.empty():
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                try:
                    item = await asyncio.wait_for(self._queue.get(), remaining)
                except asyncio.TimeoutError:
                    break
            else:
                item = self._queue.get_nowait()
            batch.append(item)
            size += item.size
        return batch

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._next_batch()
            self._waiting -= sum(p.size for p in batch)
            self.metrics.queue_images.set(self._waiting)
            live = [p for p in batch if not p.future.cancelled()]  # client gone: skip its work
            if not live:
                continue
            self.metrics.batch_requests.observe(len(live))
            self.metrics.batch_images.observe(sum(p.size for p in live))
            start = loop.time()
            results, error = await self.run_in_worker(isolate, self.handle, [p.item for p in live])
            self._last_batch_seconds = loop.time() - start
            for p, r in zip(live, results, strict=True):
                if not p.future.done():
                    p.future.set_exception(r) if isinstance(r, BaseException) else p.future.set_result(r)
            failures = [error, *results]
            if self.on_out_of_memory and any(isinstance(e, BaseException) and out_of_memory(e) for e in failures):
                self.on_out_of_memory(f"out of memory in a batch of {len(live)} requests")
