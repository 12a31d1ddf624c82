"""A request that runs the gateway out of memory fails alone: its batch-mates are retried one by one
and answered correctly, and only then does the process stop for its supervisor.

The gateway runs in a subprocess under a real address-space limit (``RLIMIT_AS``), serving a
classification plugin whose work grows with the original size a payload declares — as the
segmentation masks of the reliability issue did — so the failure is a real failed allocation.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time

import httpx
import pytest

from splitserve.gateway.process import free_port
from splitserve_edge.payload import Payload

from .conftest import texture

pytestmark = pytest.mark.slow
PAYLOAD = {"Content-Type": "application/x-splitserve"}

SERVER = """
import logging, resource, sys
import numpy as np
from splitserve.gateway.app import create_app
from splitserve.gateway.config import ServerConfig
from splitserve.gateway.local import LocalExecutor
from splitserve.gateway.server import serve
from splitserve.plugins import PluginRegistry, TaskPlugin

base = PluginRegistry.discover().get("classification")

class Hungry(TaskPlugin):
    '''Classification that first builds a float map of the image the device had.'''
    name, aliases, response_model = base.name, base.aliases, base.response_model
    def resolve_config(self, backbone, stored):
        return base.resolve_config(backbone, stored)
    def build_head(self, backbone, config):
        return base.build_head(backbone, config)
    def predict(self, head, features, metas, config):
        for meta in metas:
            np.ones(meta.original_size, np.float32)  # touches every page: fails only above the limit
        return base.predict(head, features, metas, config)

logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
config = ServerConfig(bundle=sys.argv[1], port=int(sys.argv[2]), max_image_side=65535, max_wait_ms=1000,
                      threads=1, log_level="warning")
app = create_app(config, LocalExecutor.from_config(config, PluginRegistry([Hungry()])))
vsize = next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmSize"))
limit = vsize + 2 * 2**30  # 2 GiB of address space above the loaded models
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
serve(config, app)
"""


def test_a_memory_error_fails_only_its_own_request_before_the_process_stops(bundle_dir, edge):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, "-c", SERVER, str(bundle_dir), str(port)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read() if proc.poll() else "slow"
            try:
                if httpx.get(url + "/readyz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.3)
        real = edge.encode(texture("coffee", (64, 64))).payload
        honest = real.to_bytes()
        hostile = Payload(real.fingerprint, real.latent_shape, ((60_000, 60_000),), real.strings).to_bytes()  # 14 GB

        async def scenario():
            async with httpx.AsyncClient(base_url=url, timeout=60) as c:
                alone = await c.post("/infer", params={"tasks": "cls"}, content=honest, headers=PAYLOAD)
                # both arrive within one batching window (1 s): one batch of two requests
                bad, good = await asyncio.gather(
                    c.post("/infer", params={"tasks": "cls"}, content=hostile, headers=PAYLOAD),
                    c.post("/infer", params={"tasks": "cls"}, content=honest, headers=PAYLOAD))
                health = await c.get("/healthz")
                return alone, bad, good, health

        alone, bad, good, health = asyncio.run(scenario())
        assert alone.status_code == 200, alone.text
        assert good.status_code == 200, good.text
        assert good.json() == alone.json()  # answered, and correctly: the same answer as alone
        assert bad.status_code == 500 and bad.headers["content-type"] == "application/json"
        assert bad.json() == {"detail": "the server ran out of memory on this request; it restarts"}
        assert health.status_code == 503 and health.json()["status"].startswith("broken: out of memory")
        # then it stops by itself, gracefully (uvicorn re-raises the SIGTERM it handled), for its supervisor
        assert proc.wait(30) in (0, -signal.SIGTERM)
        log = proc.stdout.read()
        assert "batch of 2 requests failed (MemoryError: Unable to allocate" in log, log[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
