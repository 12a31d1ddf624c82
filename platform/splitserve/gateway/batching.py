"""Dynamic batching with a bounded queue: requests that arrive within ``max_wait`` of each other
share one decode; when ``max_queue`` images are already waiting, new work is refused (503)
instead of growing memory without bound."""

from __future__ import annotations

import asyncio
import os
import signal
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from .metrics import GatewayMetrics
from .runtime import Job, Runtime

log = logging.getLogger("splitserve.gateway")


class QueueFull(Exception):
    """Too many images waiting; the client should retry after ``retry_after`` seconds."""

    def __init__(self, retry_after: int):
        super().__init__(f"server busy: queue is full, retry in {retry_after} s")
        self.retry_after = retry_after


@dataclass
class _Pending:
    job: Job
    future: asyncio.Future


class DynamicBatcher:
    def __init__(self, runtime: Runtime, metrics: GatewayMetrics, *, max_batch: int, max_wait_ms: float,
                 max_queue: int):
        self.runtime = runtime
        self.metrics = metrics
        self.max_batch = max_batch
        self.max_wait = max_wait_ms / 1000
        self.max_queue = max_queue
        self._queue: asyncio.Queue[_Pending] = asyncio.Queue()
        self._waiting = 0  # images queued, not yet taken into a batch
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

    broken: str | None = None

    def break_down(self, reason: str) -> None:
        """Mark the gateway unhealthy (/healthz and /readyz answer 503) and stop the process
        gracefully, so its supervisor (Kubernetes, systemd, Compose) starts a fresh one."""
        if self.broken is None:
            self.broken = reason
            log.error("gateway broken (%s): shutting down for a restart", reason)
            asyncio.get_running_loop().call_later(0.5, os.kill, os.getpid(), signal.SIGTERM)

    @staticmethod
    def _fail(pending, error: BaseException) -> None:
        for p in pending:
            if not p.future.done():
                p.future.set_exception(error)

    async def run_in_worker(self, fn, *args):
        """Run ``fn`` on the batch worker thread (e.g. the warm-up), in order with the batches."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def submit(self, job: Job):
        if self._waiting + job.num_images > self.max_queue:
            self.metrics.rejected.inc()
            raise QueueFull(retry_after=max(1, round(self._last_batch_seconds * 2)))
        future = asyncio.get_running_loop().create_future()
        self._waiting += job.num_images
        self.metrics.queue_images.set(self._waiting)
        await self._queue.put(_Pending(job, future))
        return await future

    async def _next_batch(self) -> list[_Pending]:
        first = await self._queue.get()
        batch, images = [first], first.job.num_images
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.max_wait
        while images < self.max_batch:
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
            images += item.job.num_images
        return batch

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._next_batch()
            self._waiting -= sum(p.job.num_images for p in batch)
            self.metrics.queue_images.set(self._waiting)
            live = [p for p in batch if not p.future.cancelled()]  # client gone: skip its work
            if not live:
                continue
            self.metrics.batch_requests.observe(len(live))
            self.metrics.batch_images.observe(sum(p.job.num_images for p in live))
            start = loop.time()
            try:
                results = await loop.run_in_executor(self._executor, self.runtime.run, [p.job for p in live])
            except MemoryError as e:  # this process may be unable to answer anything now: say so, restart
                self._fail(live, e)
                self.break_down(f"MemoryError in a batch of {len(live)} requests")
                continue
            except Exception as e:  # noqa: BLE001 — one bad request must not fail its batch-mates
                if len(live) == 1:
                    log.exception("request failed")
                    self._fail(live, e)
                    continue
                log.warning("batch of %d requests failed (%s); retrying them one by one", len(live), e)
                results = []
                for p in live:
                    try:
                        results.append((await loop.run_in_executor(self._executor, self.runtime.run, [p.job]))[0])
                    except MemoryError as err:
                        self.break_down("MemoryError")
                        results.append(err)
                    except Exception as err:  # noqa: BLE001
                        log.exception("request failed")
                        results.append(err)
            self._last_batch_seconds = loop.time() - start
            for p, r in zip(live, results):
                if not p.future.done():  # a request whose bitstream failed to decode fails alone
                    p.future.set_exception(r) if isinstance(r, BaseException) else p.future.set_result(r)
