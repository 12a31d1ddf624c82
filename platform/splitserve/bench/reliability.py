"""Reliability figures from a live gateway on loopback: a load run, a fault run, a fuzz run.

Each run starts a real gateway process, records its resident memory before and after, and counts
responses by status, latency quantiles and process restarts (a dead process counts as one and is
started again). ``platform bench reliability --output docs/reliability.md`` rewrites the report.
"""

from __future__ import annotations

import asyncio
import io
import random
import socket
import statistics
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from PIL import Image

from splitserve_edge.payload import Payload

from ..edge import EdgeEncoder
from ..gateway.process import GatewayProcess

HEADERS = {"Content-Type": "application/x-splitserve"}


@dataclass
class RunResult:
    name: str
    sent: int = 0
    statuses: Counter = field(default_factory=Counter)
    latencies_ms: list[float] = field(default_factory=list)
    rss_before_mb: float = 0.0
    rss_after_mb: float = 0.0
    restarts: int = 0
    seconds: float = 0.0

    def row(self) -> str:
        q = statistics.quantiles(self.latencies_ms, n=100) if len(self.latencies_ms) > 2 else [0.0] * 99
        codes = ", ".join(f"{k}: {v}" for k, v in sorted(self.statuses.items()))
        return (f"| {self.name} | {self.sent} | {codes} | {q[49]:.0f} | {q[94]:.0f} | {q[98]:.0f} | "
                f"{self.rss_before_mb:.0f} → {self.rss_after_mb:.0f} | {self.restarts} | {self.seconds:.0f} |")


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


class _Server:
    """A gateway process that is started again if it dies (counting restarts)."""

    def __init__(self, *args: str):
        self.args = args
        self.restarts = 0
        self.proc = GatewayProcess(*args).start()

    @property
    def url(self) -> str:
        return self.proc.url

    def check(self) -> None:
        if self.proc.proc.poll() is not None:
            self.restarts += 1
            self.proc = GatewayProcess(*self.args).start()

    def stop(self) -> None:
        self.proc.stop()


async def _send(client: httpx.AsyncClient, result: RunResult, body: bytes, headers=HEADERS, params=None) -> None:
    t = time.perf_counter()
    try:
        r = await client.post("/infer", content=body, headers=headers, params=params)
        result.statuses[r.status_code] += 1
    except httpx.HTTPError as e:
        result.statuses[type(e).__name__] += 1
    result.latencies_ms.append((time.perf_counter() - t) * 1000)
    result.sent += 1


def load_run(server: _Server, payloads: list[bytes], requests: int, concurrency: int) -> RunResult:
    result = RunResult(f"load: {requests} requests, {concurrency} concurrent (cls,det,seg)")

    async def go():
        sem = asyncio.Semaphore(concurrency)
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as c:
            async def one(i):
                async with sem:
                    await _send(c, result, payloads[i % len(payloads)], params={"tasks": "cls,det,seg"})
            await asyncio.gather(*[one(i) for i in range(requests)])

    return _timed(server, result, go)


def fault_run(server: _Server, real: Payload, rounds: int) -> RunResult:
    """The attacks of the reliability issue, interleaved with honest requests."""
    result = RunResult(f"fault: the issue's attacks × {rounds}, each followed by an honest request")
    c, h, w = real.latent_shape
    bomb = io.BytesIO()
    Image.new("1", (8000, 8000)).save(bomb, format="PNG")
    attacks = [
        (Payload(real.fingerprint, (c, 512, 512), real.original_sizes, (b"\x22\x00\x00\x00",)).to_bytes(), HEADERS),
        (Payload(real.fingerprint, real.latent_shape, ((65535, 65535),), real.strings).to_bytes(), HEADERS),
        (Payload(real.fingerprint, real.latent_shape, real.original_sizes * 160, real.strings * 160).to_bytes(), HEADERS),
        (bomb.getvalue(), {"Content-Type": "image/png"}),
        (bytes.fromhex("53530159c07ca6d5c5eb73188008800801e001e0010101d0d43928"), HEADERS),
        (real.to_bytes(), {"Content-Type": "a/" + "b" * 100_000}),
    ]

    async def go():
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
            for _ in range(rounds):
                for body, headers in attacks:
                    await _send(client, result, body, headers)
                    await _send(client, result, real.to_bytes())
        _slow_body(server.url)

    return _timed(server, result, go)


def _slow_body(url: str) -> None:
    host, port = url.rsplit("//", 1)[1].split(":")
    with socket.create_connection((host, int(port)), timeout=30) as s:
        s.sendall(b"POST /infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-splitserve\r\n"
                  b"Content-Length: 5000000\r\n\r\n" + b"\0" * 1024)
        s.recv(4096)  # the server answers 408 after its body timeout


def fuzz_run(server: _Server, real: Payload, count: int, seed: int = 0) -> RunResult:
    """Forged payloads: valid header and fingerprint with random bitstreams, bit flips and cuts."""
    result = RunResult(f"fuzz: {count} forged payloads (bitstreams, flips, truncations)")
    rng = random.Random(seed)
    data = real.to_bytes()

    def forged() -> bytes:
        kind = rng.randrange(3)
        if kind == 0:
            return Payload(real.fingerprint, real.latent_shape, real.original_sizes,
                           (rng.randbytes(rng.randrange(1, 400)),)).to_bytes()
        if kind == 1:
            b = bytearray(data)
            for _ in range(rng.randrange(1, 8)):
                b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
            return bytes(b)
        return data[: rng.randrange(len(data))]

    async def go():
        sem = asyncio.Semaphore(8)
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
            async def one():
                async with sem:
                    await _send(client, result, forged())
            await asyncio.gather(*[one() for _ in range(count)])

    return _timed(server, result, go)


def _timed(server: _Server, result: RunResult, go) -> RunResult:
    result.rss_before_mb = _rss_mb(server.proc.proc.pid)
    t = time.perf_counter()
    asyncio.run(go())
    result.seconds = time.perf_counter() - t
    before = server.restarts
    server.check()
    result.restarts = server.restarts - before
    result.rss_after_mb = _rss_mb(server.proc.proc.pid)
    return result


def run(bundle: Path, requests: int = 400, concurrency: int = 16, fuzz: int = 2000, rounds: int = 5) -> str:
    from skimage import data

    from .report import machine

    edge = EdgeEncoder.from_bundle(bundle)
    photos = [Image.fromarray(getattr(data, n)()) for n in ("astronaut", "coffee", "chelsea", "rocket")]
    payloads = [edge.encode([p]).data for p in photos]
    real = Payload.from_bytes(payloads[0])
    server = _Server("--bundle", str(bundle), "--max-queue", "64", "--body-timeout-s", "2", "--max-image-pixels",
                     "16000000")
    try:
        results = [load_run(server, payloads, requests, concurrency), fault_run(server, real, rounds),
                   fuzz_run(server, real, fuzz)]
    finally:
        server.stop()
    lines = [
        "## Reliability (`platform bench reliability`)", "",
        f"Machine: {machine()}. Bundle `{bundle.name}`; one live gateway process on loopback "
        "(`--max-queue 64 --body-timeout-s 2`), clients in the same machine. Latencies are client-side.", "",
        "| run | requests | responses by status | p50 ms | p95 ms | p99 ms | RSS MB before → after | restarts | seconds |",
        "|---|---:|---|---:|---:|---:|---|---:|---:|",
        *[r.row() for r in results],
    ]
    return "\n".join(lines)
