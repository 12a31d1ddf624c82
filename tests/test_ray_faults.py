"""Ray Serve under a fault, on a real local Ray instance: a task replica's process is killed
(SIGKILL) while requests are in flight. No request may turn into a 500 or hang: each is answered
200 (asked again on the replica Serve starts instead) or 503 with Retry-After; answers are normal
again within 30 s, and the ingress never restarts. The load goes on until answers have been normal
for ``SETTLE_S`` after the kill (or ``LOAD_CAP_S`` in all). Run with ``-s`` to see the figures."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest

from .conftest import texture

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::pydantic.warnings.PydanticDeprecatedSince20")]
PAYLOAD = {"Content-Type": "application/x-splitserve"}
# the default task deadline (30 s: longer than a replica restart here, so requests wait for the new
# replica) and a short one (4 s: requests that outwait it get 503 + Retry-After instead)
TASK_TIMEOUT_S = {"patient": 30.0, "impatient": 4.0}
KILL_AT_S = 2.0  # into the load
SETTLE_S = 5.0  # the load stops once every answer of the last SETTLE_S seconds (at least 4) was normal...
LOAD_CAP_S = 40.0  # ...or after this long: past the 30 s recovery the test asks for


def _pids(title: str) -> list[int]:
    """Processes whose title (Ray sets ``ray::ServeReplica:<app>:<deployment>``) contains ``title``."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if title in (entry / "cmdline").read_bytes().decode(errors="replace"):
                    pids.append(int(entry.name))
            except OSError:
                continue
    return pids


@pytest.fixture(scope="module")
def ray_url(local_ray, bundle_dir):
    """Two applications on the local Ray instance the Ray test modules share (conftest.py)."""
    from ray import serve

    from splitserve.gateway.config import ServerConfig
    from splitserve.gateway.ray_app import build_app

    url = local_ray.start()
    for name, timeout in TASK_TIMEOUT_S.items():
        # one replica per deployment: a killed one has no sibling to take over (the worst case)
        serve.run(build_app(str(bundle_dir), ["cls"], config=ServerConfig(threads=1, task_timeout_s=timeout),
                            autoscaling_config={"min_replicas": 1, "max_replicas": 1}),
                  name=name, route_prefix=f"/{name}")
    yield url
    for name in TASK_TIMEOUT_S:
        serve.delete(name)


@pytest.mark.parametrize("app", list(TASK_TIMEOUT_S))
def test_a_killed_task_replica_gives_no_500_and_no_hang(ray_url, edge, app):
    url, deadline = f"{ray_url}/{app}", TASK_TIMEOUT_S[app]
    body = edge.encode(texture("coffee", (64, 64))).data
    reference = httpx.post(url + "/infer", params={"tasks": "cls"}, content=body, headers=PAYLOAD, timeout=60)
    assert reference.status_code == 200, reference.text
    (replica,) = _pids(f"ServeReplica:{app}:task-classification")
    (ingress,) = _pids(f"ServeReplica:{app}:ingress")
    records: list[tuple[float, float, object, str | None, bool]] = []  # sent, done, status, Retry-After, correct
    start = time.monotonic()
    kill_at = KILL_AT_S

    def normal(record) -> bool:  # a correct answer within 2 s
        return record[2] == 200 and record[4] and record[1] - record[0] <= 2.0

    def loading() -> bool:
        now = time.monotonic() - start
        if now < kill_at + SETTLE_S:
            return True
        # answers of the last SETTLE_S seconds, all after the kill: none is normal while the only replica is down
        recent = [r for r in records if r[1] > now - SETTLE_S]
        return now < LOAD_CAP_S and (len(recent) < 4 or not all(map(normal, recent)))

    async def client(c: httpx.AsyncClient):
        while loading():
            sent = time.monotonic() - start
            try:
                r = await c.post("/infer", params={"tasks": "cls"}, content=body, headers=PAYLOAD)
                status, retry, correct = r.status_code, r.headers.get("retry-after"), r.json() == reference.json()
                if status == 503:
                    assert r.json()["detail"].startswith("server busy"), r.text
            except httpx.HTTPError as e:  # a hang (client timeout) or a dropped connection
                status, retry, correct = type(e).__name__, None, False
            records.append((sent, time.monotonic() - start, status, retry, correct))

    async def load():
        async with httpx.AsyncClient(base_url=url, timeout=deadline + 10) as c:
            clients = [asyncio.ensure_future(client(c)) for _ in range(4)]
            await asyncio.sleep(kill_at)
            os.kill(replica, signal.SIGKILL)
            await asyncio.gather(*clients)

    asyncio.run(load())
    statuses = Counter(r[2] for r in records)
    in_flight = [r for r in records if r[0] < kill_at < r[1]]
    abnormal = [r for r in records if not normal(r)]
    recovery = max((r[1] for r in abnormal), default=kill_at) - kill_at
    latency = max(r[1] - r[0] for r in records)
    (new_replica,) = _pids(f"ServeReplica:{app}:task-classification")
    print(f"\nray fault ({app}: task deadline {deadline:g} s): {len(records)} requests, 4 concurrent, "
          f"task-classification replica SIGKILLed at {kill_at:g} s "
          f"with {len(in_flight)} in flight; statuses {dict(statuses)}; normal answers again {recovery:.1f} s after "
          f"the kill; slowest request {latency:.1f} s; ingress pid {ingress} unchanged: "
          f"{_pids(f'ServeReplica:{app}:ingress') == [ingress]}")
    assert in_flight, "the kill must catch requests in flight"
    assert set(statuses) <= {200, 503}, statuses  # no 500, no dropped connection, no client timeout
    assert all(r[3] is not None and int(r[3]) >= 1 for r in records if r[2] == 503), "503 without Retry-After"
    assert all(r[4] for r in records if r[2] == 200), "a 200 with another answer"
    assert latency <= deadline + 5, "a request hung past the task deadline"
    assert recovery <= 30.0
    assert records[-1][2] == 200 and records[-1][4]
    assert _pids(f"ServeReplica:{app}:ingress") == [ingress], "the ingress restarted"
    assert new_replica != replica, "Serve started a new task replica"
