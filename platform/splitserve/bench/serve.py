"""Serving benchmark on loopback against real gateway processes.

1. Decode once: one ``tasks=cls,det,seg`` request vs three single-task requests, same payload,
   for the bundle as it is (each head with its own layer2..4) and for the same heads on one
   shared trunk (trunk once per batch), both servers up and measured in interleaved rounds.
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


def measure_latency(urls: list[str], payload: bytes, rounds: int) -> list[LatencyResult]:
    """Per server: one 3-task request vs three single-task requests, in rounds that interleave
    the servers (so machine noise hits every configuration alike)."""
    results = [LatencyResult([], []) for _ in urls]
    clients = [httpx.Client(base_url=url, timeout=120) for url in urls]
    try:
        def post(c: httpx.Client, tasks: str) -> None:
            r = c.post("/infer", params={"tasks": tasks}, content=payload, headers=HEADERS)
            r.raise_for_status()

        for c in clients:
            for _ in range(2):  # warm connections and caches
                post(c, "cls,det,seg")
        for _ in tqdm(range(rounds), desc="latency", unit="round"):
            for c, res in zip(clients, results):
                t = time.perf_counter()
                post(c, "cls,det,seg")
                res.combined_ms.append((time.perf_counter() - t) * 1000)
                t = time.perf_counter()
                for task in ("cls", "det", "seg"):
                    post(c, task)
                res.separate_ms.append((time.perf_counter() - t) * 1000)
    finally:
        for c in clients:
            c.close()
    return results


def shared_trunk_variant(bundle: Path, out: Path) -> Path:
    """The bundle's heads moved onto one shared layer2..4 (the classification head's), for timing.

    The other heads' own layer2..4 are replaced, so their *answers* change: this variant measures
    speed only. A real shared-trunk bundle comes from ``platform finetune --shared-trunk``.
    """
    from ..bundle import load_codec, load_head, load_trunk, read_manifest, save_bundle
    from ..plugins import PluginRegistry

    manifest = read_manifest(bundle)
    registry = PluginRegistry.discover()
    trunk = load_trunk(bundle, manifest)
    heads = {}
    for task, entry in manifest.tasks.items():
        plugin = registry.get(task)
        config = plugin.resolve_config(manifest.backbone, entry.config)
        heads[task] = (load_head(bundle, task, plugin.build_head(manifest.backbone, config), manifest, trunk), config)
    # the bundle's own trunk, else the classification head's (else the first head's) layer2..4
    shared_tail = trunk.tail if trunk is not None else heads.get("classification", next(iter(heads.values())))[0].tail
    save_bundle(out, load_codec(bundle, manifest=manifest), backbone=manifest.backbone,
                preprocessing=manifest.policy, heads=heads, trunk=shared_tail, shared_tasks=set(heads),
                provenance={"note": f"benchmark variant of {bundle}: heads on one shared trunk (speed only)"})
    return out


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


def _stage_table(rows: dict[str, dict[str, float]]) -> list[str]:
    names = list(dict.fromkeys(k for r in rows.values() for k in r))
    return ["| heads | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names),
            *[f"| {label} | " + " | ".join(f"{r[n]:.1f}" if n in r else "—" for n in names) + " |"
              for label, r in rows.items()]]


def _backbone(bundle: Path) -> str:
    from ..bundle import read_manifest

    return read_manifest(bundle).backbone


def _pct(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100)[int(q) - 1] if len(values) > 1 else values[0]


def run(bundle: Path, *, rounds: int, concurrency: int, per_client: int, max_batch: int, max_wait_ms: float,
        tasks: str, threads: int | None) -> str:
    """Run both comparisons and return the Markdown report."""
    from .report import machine

    import tempfile

    encoder = EdgeEncoder.from_bundle(bundle)
    payload = sample_payload(encoder)
    extra = ["--threads", str(threads)] if threads else []
    with tempfile.TemporaryDirectory() as tmp:
        shared = shared_trunk_variant(bundle, Path(tmp) / "shared")
        with GatewayProcess("--bundle", str(bundle), *extra) as own_server, \
                GatewayProcess("--bundle", str(shared), *extra) as shared_server:
            latency, shared_latency = measure_latency([own_server.url, shared_server.url], payload, rounds)
            stages = stage_means(own_server.url)
            shared_stages = stage_means(shared_server.url)
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
        "### Decode once, trunk once: one 3-task request vs three single-task requests",
        "",
        "| heads | `tasks=cls,det,seg` (one request), median ms | p90 ms | `cls`, `det`, `seg` (three requests), median ms | p90 ms | ratio |",
        "|---|---:|---:|---:|---:|---:|",
        *[f"| {label} | {med(r.combined_ms):.1f} | {_pct(r.combined_ms, 90):.1f} | {med(r.separate_ms):.1f} | "
          f"{_pct(r.separate_ms, 90):.1f} | **{r.ratio:.2f}×** |"
          for label, r in (("each with its own layer2..4", latency), ("on one shared trunk", shared_latency))],
        "",
        f"Ratio: three separate requests' time over one combined request's ({rounds} rounds, both servers "
        "up, interleaved). With a shared trunk, the combined request decodes once *and* runs layer2..4 once; "
        "the shared variant moves the bundle's heads onto the classification head's layer2..4, so it measures "
        "speed, not accuracy.",
        "",
        "Where the time goes (mean ms per batch, from the gateway's own `splitserve_stage_seconds`):",
        "",
        *_stage_table({"own layer2..4": stages, "shared trunk": shared_stages}),
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
