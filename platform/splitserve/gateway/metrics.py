"""Prometheus metrics, one registry per app so several gateways can live in one process (tests)."""

from __future__ import annotations

import time
from contextlib import contextmanager

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


class GatewayMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("splitserve_requests", "Inference requests by task and HTTP status",
                                ["task", "status"], registry=r)
        self.request_seconds = Histogram("splitserve_request_seconds", "End-to-end /infer latency",
                                         buckets=_LATENCY_BUCKETS, registry=r)
        self.stage_seconds = Histogram("splitserve_stage_seconds",
                                       "Time per pipeline stage and batch (parse, entropy_decode, "
                                       "feature_decode, image_encode, task:<name>)",
                                       ["stage"], buckets=_LATENCY_BUCKETS, registry=r)
        self.batch_images = Histogram("splitserve_batch_images", "Images per decode batch",
                                      buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256), registry=r)
        self.batch_requests = Histogram("splitserve_batch_requests", "Requests merged into one decode batch",
                                        buckets=(1, 2, 4, 8, 16, 32, 64), registry=r)
        self.payload_bytes = Histogram("splitserve_payload_bytes", "Request body size in bytes",
                                       ["kind"], buckets=(64, 128, 256, 512, 1024, 4096, 16384, 65536,
                                                          262144, 1048576, 8388608), registry=r)
        self.queue_images = Gauge("splitserve_queue_images", "Images waiting for a batch", registry=r)
        self.rejected = Counter("splitserve_rejected", "Requests refused because the queue was full",
                                registry=r)

    @contextmanager
    def stage(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.stage_seconds.labels(stage=name).observe(time.perf_counter() - start)
