"""Serving benchmark on loopback against real gateway processes.

1. Decode once: one ``tasks=cls,det,seg`` request vs three single-task requests, same payload.
2. Dynamic batching: throughput at a fixed concurrency with ``--max-batch N`` vs ``--max-batch 1``.
Both comparisons run side by side in one invocation, so their ratios are meaningful on a noisy
shared machine; absolute numbers are reported with the machine named.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
from tqdm import tqdm

from ..edge import EdgeEncoder
from ..gateway.process import GatewayProcess

HEADERS = {"Content-Type": "application/x-splitserve"}


@dataclass
class LatencyResult:
    combined_ms: list[float]
    separate_ms: list[float]

    @property
    def ratio(self) -> float:
        return statistics.median(self.separate_ms) / statistics.median(self.combined_ms)


@dataclass
class ThroughputResult:
    max_batch: int
    requests: int
    seconds: float
    latencies_ms: list[float]
    mean_batch: float

    @property
    def rps(self) -> float:
        return self.requests / self.seconds


def sample_payload(encoder: EdgeEncoder) -> bytes:
    """A real photo from scikit-image's wheel, encoded like a device would."""
    from PIL import Image
    from skimage import data

    return encoder.encode(Image.fromarray(data.astronaut())).data


def measure_latency(url: str, payload: bytes, rounds: int) -> LatencyResult:
    combined, separate = [], []
    with httpx.Client(base_url=url, timeout=120) as c:
        def post(tasks: str) -> None:
            r = c.post("/infer", params={"tasks": tasks}, content=payload, headers=HEADERS)
            r.raise_for_status()

        for _ in range(2):  # warm connections and caches
            post("cls,det,seg")
        for _ in tqdm(range(rounds), desc="latency", unit="round"):
            t = time.perf_counter()
            post("cls,det,seg")
            combined.append((time.perf_counter() - t) * 1000)
            t = time.perf_counter()
            for task in ("cls", "det", "seg"):
                post(task)
            separate.append((time.perf_counter() - t) * 1000)
    return LatencyResult(combined, separate)


async def _load(url: str, payload: bytes, concurrency: int, per_client: int, tasks: str) -> tuple[float, list[float]]:
    latencies: list[float] = []

    async def client(c: httpx.AsyncClient) -> None:
        for _ in range(per_client):
            t = time.perf_counter()
            r = await c.post("/infer", params={"tasks": tasks}, content=payload, headers=HEADERS)
            r.raise_for_status()
            latencies.append((time.perf_counter() - t) * 1000)

    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as c:
        await asyncio.gather(*[client(c) for _ in range(min(concurrency, 2))])  # warm-up
        latencies.clear()
        start = time.perf_counter()
        await asyncio.gather(*[client(c) for _ in range(concurrency)])
        return time.perf_counter() - start, latencies


def _samples(url: str, name: str) -> dict[tuple, float]:
    """Samples of one metric family from the gateway's Prometheus exposition, by (sample name, labels)."""
    from prometheus_client.parser import text_string_to_metric_families

    out = {}
    for family in text_string_to_metric_families(httpx.get(url + "/metrics").text):
        if family.name == name:
            for s in family.samples:
                out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def _mean_batch(url: str) -> tuple[float, float]:
    """(sum, count) of the batch-size histogram, from the gateway's own Prometheus metrics."""
    m = _samples(url, "splitserve_batch_requests")
    return m.get(("splitserve_batch_requests_sum", ()), 0.0), m.get(("splitserve_batch_requests_count", ()), 0.0)


def stage_means(url: str) -> dict[str, float]:
    """Mean milliseconds per observation of each pipeline stage (parse, entropy_decode, …)."""
    m = _samples(url, "splitserve_stage_seconds")
    out = {}
    for (name, labels), value in m.items():
        if name.endswith("_sum"):
            count = m[(name[:-4] + "_count", labels)]
            out[dict(labels)["stage"]] = 1000 * value / count if count else 0.0
    order = ["parse", "image_decode", "entropy_decode", "image_encode", "feature_decode"]
    return dict(sorted(out.items(), key=lambda kv: (order.index(kv[0]) if kv[0] in order else len(order), kv[0])))


def measure_throughput(bundle: Path, payload: bytes, *, max_batch: int, concurrency: int, per_client: int,
                       tasks: str, max_wait_ms: float, threads: int | None) -> ThroughputResult:
    args = ["--bundle", str(bundle), "--max-batch", str(max_batch), "--max-wait-ms", str(max_wait_ms),
            "--max-queue", str(concurrency * 4)]
    if threads:
        args += ["--threads", str(threads)]
    with GatewayProcess(*args) as server:
        s0, n0 = _mean_batch(server.url)
        seconds, lat = asyncio.run(_load(server.url, payload, concurrency, per_client, tasks))
        s1, n1 = _mean_batch(server.url)
    mean_batch = (s1 - s0) / max(n1 - n0, 1)
    return ThroughputResult(max_batch, concurrency * per_client, seconds, lat, mean_batch)


def _backbone(bundle: Path) -> str:
    from ..bundle import read_manifest

    return read_manifest(bundle).backbone


def _pct(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100)[int(q) - 1] if len(values) > 1 else values[0]


def run(bundle: Path, *, rounds: int, concurrency: int, per_client: int, max_batch: int, max_wait_ms: float,
        tasks: str, threads: int | None) -> str:
    """Run both comparisons and return the Markdown report."""
    from .report import machine

    encoder = EdgeEncoder.from_bundle(bundle)
    payload = sample_payload(encoder)
    args = ["--bundle", str(bundle)] + (["--threads", str(threads)] if threads else [])
    with GatewayProcess(*args) as server:
        latency = measure_latency(server.url, payload, rounds)
        stages = stage_means(server.url)
    results = [
        measure_throughput(bundle, payload, max_batch=mb, concurrency=concurrency, per_client=per_client,
                           tasks=tasks, max_wait_ms=max_wait_ms if mb > 1 else 0, threads=threads)
        for mb in tqdm((max_batch, 1), desc="throughput", unit="config")
    ]
    med = statistics.median
    lines = [
        "## Serving (`platform bench serve`)",
        "",
        f"Machine: {machine()}.",
        f"Bundle: `{bundle.name}` ({encoder.codec.family}, {_backbone(bundle)}, preprocessing {encoder.preprocessing.describe()}); "
        f"payload {len(payload)} bytes (one real photo). Loopback HTTP, real uvicorn processes.",
        "",
        "### Decode once: one 3-task request vs three single-task requests",
        "",
        "| | median ms | p90 ms |",
        "|---|---:|---:|",
        f"| `tasks=cls,det,seg` (one request) | {med(latency.combined_ms):.1f} | {_pct(latency.combined_ms, 90):.1f} |",
        f"| `cls`, `det`, `seg` (three requests) | {med(latency.separate_ms):.1f} | {_pct(latency.separate_ms, 90):.1f} |",
        "",
        f"Three separate requests take **{latency.ratio:.2f}×** as long as one combined request "
        f"({rounds} rounds, interleaved).",
        "",
        "Where the time goes (mean ms per batch, from the gateway's own `splitserve_stage_seconds`; the "
        "shared stages run once per request whatever the number of tasks):",
        "",
        "| stage | " + " | ".join(stages) + " |",
        "|---|" + "---:|" * len(stages),
        "| ms | " + " | ".join(f"{v:.1f}" for v in stages.values()) + " |",
        "",
        f"### Dynamic batching: throughput at concurrency {concurrency} (`tasks={tasks}`)",
        "",
        "| server | requests/s | mean batch | median ms | p90 ms |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in results:
        label = f"`--max-batch {r.max_batch} --max-wait-ms {max_wait_ms if r.max_batch > 1 else 0:g}`"
        lines.append(f"| {label} | {r.rps:.1f} | {r.mean_batch:.1f} | {med(r.latencies_ms):.0f} | "
                     f"{_pct(r.latencies_ms, 90):.0f} |")
    lines += ["", f"Dynamic batching gives **{results[0].rps / results[1].rps:.2f}×** the throughput of "
                  f"batch size 1 ({results[0].requests} requests each)."]
    return "\n".join(lines)
