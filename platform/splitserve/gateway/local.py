"""The local executor: one process, requests batched across clients, decode once per batch."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from typing import Any

from ..plugins import PluginRegistry
from .batching import DynamicBatcher
from .config import ServerConfig
from .executor import Executor
from .metrics import GatewayMetrics
from .runtime import Job, Runtime

log = logging.getLogger("splitserve.gateway")


class LocalExecutor(Executor):
    """:class:`Runtime` behind a :class:`DynamicBatcher`. After an out-of-memory failure the batch's
    requests are answered one by one, then the process stops for its supervisor to restart it."""

    def __init__(self, runtime: Runtime, config: ServerConfig):
        self.runtime, self.features, self.served = runtime, runtime.features, runtime.served
        self.metrics = runtime.metrics
        self.warmup = config.warmup
        self.batcher: DynamicBatcher[Job] = DynamicBatcher(
            runtime.run, max_batch=config.max_batch, max_wait_ms=config.max_wait_ms, max_queue=config.max_queue,
            size=lambda job: job.num_images, metrics=self.metrics, on_out_of_memory=self.break_down)

    @classmethod
    def from_config(cls, config: ServerConfig, registry: PluginRegistry | None = None) -> "LocalExecutor":
        from ..defaults import resolve_bundle

        config.apply_threads()
        runtime = Runtime(resolve_bundle(config.bundle), registry or PluginRegistry.discover(), config.tasks,
                          GatewayMetrics(), config.payload_limits(), device=config.device)
        return cls(runtime, config)

    async def start(self) -> None:
        self.batcher.start()
        if self.warmup:
            await self.batcher.run_in_worker(self.runtime.warmup)

    async def stop(self) -> None:
        await self.batcher.stop()

    async def run(self, job: Job) -> list[dict[str, Any]]:
        return await self.batcher.submit(job)

    def break_down(self, reason: str) -> None:
        """Mark the gateway unhealthy (/healthz and /readyz answer 503) and stop the process
        gracefully, so its supervisor (Kubernetes, systemd, Compose) starts a fresh one."""
        if self.broken is None:
            self.broken = reason
            log.error("gateway broken (%s): shutting down for a restart", reason)
            asyncio.get_running_loop().call_later(0.5, os.kill, os.getpid(), signal.SIGTERM)
