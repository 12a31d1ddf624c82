"""What the HTTP surface needs from whoever computes the answers: an executor.

:func:`~splitserve.gateway.app.create_app` defines routes, auth, limits, errors and response
models once; an executor plugs in behind it. Two exist: :class:`~splitserve.gateway.local.LocalExecutor`
(one process: a dynamic batcher over :class:`~splitserve.gateway.runtime.Runtime`) and
:class:`~splitserve.gateway.ray_app.RayExecutor` (decode in the Ray Serve ingress, heads in one
deployment per task). Both share the request side — :class:`Features` parses and checks payloads
and uploads in the app's process — so a request is refused for the same reason with the same words.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

from .metrics import GatewayMetrics
from .runtime import Features, Job, Served


class Executor(ABC):
    """Computes the answers for parsed requests (:class:`Job`)."""

    features: Features  # the request side: parse + checks, uploads, the encoder's identity
    served: Served  # the served plugins and their head configs
    metrics: GatewayMetrics
    broken: str | None = None  # set when the process can no longer answer: /healthz and /readyz turn 503

    async def start(self) -> None:
        """Before ``/readyz`` turns 200 (e.g. the warm-up)."""

    async def stop(self) -> None:
        """At shutdown."""

    @abstractmethod
    async def run(self, job: Job) -> list[dict[str, Any]]:
        """Per image of ``job``: {task name: answer (a response model, or its JSON)}. Raises the
        request's error (``PayloadError``, ``Unavailable``, ``TaskFailed``, …)."""
