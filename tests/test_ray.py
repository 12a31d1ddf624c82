"""One HTTP surface, two executors: the same FastAPI app (``create_app``) over the local executor
(``platform serve``, uvicorn) and over the Ray executor (mounted with ``@serve.ingress`` on a real
local Ray instance) gives the same answers and errors for the same requests: the same JSON, value
for value, the same statuses and details, and the same OpenAPI document.

Two applications run on the local Ray instance the Ray test modules share (``local_ray`` in
conftest.py): ``plain`` (every head with its own layer2..4) and ``shared`` (heads on one shared trunk,
which the ingress runs once and hands to the heads that use it; the dilated segmentation head only
ties its weights to it). Each is compared with a FastAPI gateway process serving the same bundle.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from splitserve.edge import EdgeEncoder
from splitserve.gateway.process import GatewayProcess, free_port
from splitserve_edge.payload import Payload

from .conftest import jpeg_bytes, texture
from .helpers import informative

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::pydantic.warnings.PydanticDeprecatedSince20")]
PAYLOAD = {"Content-Type": "application/x-splitserve"}
PREFIX = {"plain": "", "shared": "/shared"}


@pytest.fixture(scope="module")
def bundles(tmp_path_factory, bundle_dir, other_bundle_dir):
    from splitserve.bench.serve import shared_trunk_variant

    root = tmp_path_factory.mktemp("ray")
    plain = Path(shutil.copytree(bundle_dir, root / "plain"))  # the session's bundle: every built-in head
    informative(plain)  # latents depend on the image, so equal answers prove something
    return {"plain": plain, "shared": shared_trunk_variant(plain, root / "shared"), "other": other_bundle_dir}


def test_platform_ray_serves_and_stops_on_sigterm(bundles, local_ray):
    """`platform ray` on its own local Ray instance: the shared one must not run beside it (it starts
    after this test, which runs first)."""
    local_ray.stop()
    port = free_port()
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "SPLITSERVE_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "splitserve", "ray", "--bundle", str(bundles["plain"]), "--tasks",
                             "cls", "--port", str(port), "--num-cpus", "1", "--object-store-mb", "100",
                             "--max-replicas", "1"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            assert proc.poll() is None, proc.stdout.read()
            try:
                if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        payload = EdgeEncoder.from_bundle(bundles["plain"]).encode([texture("coffee", (90, 70))]).data
        r = _post(url, payload, None)
        assert r.status_code == 200, r.text
        assert r.json()["tasks"] == ["classification"] and r.json()["results"][0]["tasks"]["classification"]["top"]
        assert _post(url, payload, "det").json()["detail"].startswith("unknown task")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def ray_url(local_ray, bundles):
    from ray import serve

    from splitserve.gateway.config import ServerConfig
    from splitserve.gateway.ray_app import app, build_app

    url = local_ray.start()
    # 8 replicas of 0.25 CPU (2 applications × ingress + 3 tasks) on the 2-CPU loopback node
    serve.run(build_app(str(bundles["plain"]), config=ServerConfig(threads=1)), name="plain", route_prefix="/")
    serve.run(app({"bundle": str(bundles["shared"]), "threads": "1"}), name="shared", route_prefix="/shared")
    yield url
    for name in PREFIX:
        serve.delete(name)


def _post(url: str, body: bytes, tasks: str | None = "cls,det,seg", headers=PAYLOAD) -> httpx.Response:
    return httpx.post(url + "/infer", params={"tasks": tasks} if tasks is not None else None, content=body,
                      headers=headers, timeout=120)


@pytest.mark.parametrize("which", ["plain", "shared"])
def test_ray_answers_and_errors_equal_the_fastapi_gateways(ray_url, bundles, which):
    ray = ray_url + PREFIX[which]
    edge = EdgeEncoder.from_bundle(bundles[which])
    payloads = [edge.encode([texture("astronaut", (90, 70)), texture("coffee", (90, 70))]).data,
                edge.encode([texture("rocket", (50, 80))]).data,
                edge.encode([texture("chelsea", (64, 64)), texture("camera", (120, 40)),
                             texture("brick", (64, 64))]).data]
    good = [(p, "cls,det,seg") for p in payloads] + [(payloads[0], "seg,cls"), (payloads[2], None)]
    forged = bytearray(payloads[1])
    forged[:2] = b"XX"
    real = Payload.from_bytes(payloads[1])
    bad_bitstream = Payload(real.fingerprint, real.latent_shape, real.original_sizes, (b"\x22\x00\x00\x00",))
    bad = [
        (payloads[0][:-7], "cls", PAYLOAD),                                          # truncated
        (bytes(forged), "cls", PAYLOAD),                                             # bad magic
        (bad_bitstream.to_bytes(), "cls", PAYLOAD),                                  # forged bitstream
        (payloads[0], "cls,pose", PAYLOAD),                                          # unknown task
        (payloads[0], "", PAYLOAD),                                                  # no task
        (EdgeEncoder.from_bundle(bundles["other"]).encode([texture("brick", (64, 64))]).data, "cls", PAYLOAD),
        (payloads[0], "cls", {"Content-Type": "text/plain"}),                        # 415
        (b"\0" * (8 * 2**20 + 1), "cls", PAYLOAD),                                   # 413
        (b"not an image", "cls", {"Content-Type": "image/png"}),                     # unreadable upload
        (payloads[0], "cls" + "," * 10_000, PAYLOAD),                                # 431: head above 16 kB
    ]
    with GatewayProcess("--bundle", str(bundles[which]), "--max-wait-ms", "0", "--threads", "1") as fastapi:
        answers = []
        for body, tasks in good:
            r, f = _post(ray, body, tasks), _post(fastapi.url, body, tasks)
            assert r.status_code == f.status_code == 200, (r.text[:300], f.text[:300])
            assert r.json() == f.json()
            answers.append(r.json())
        first, second = answers[0]["results"]
        assert first["tasks"]["classification"] != second["tasks"]["classification"]  # image-dependent answers
        assert first["tasks"]["segmentation"] != second["tasks"]["segmentation"]
        assert answers[3]["results"][0]["tasks"]["detection"] is None

        upload = jpeg_bytes(texture("coffee", (333, 217)))  # full offloading: the server encodes
        r, f = (_post(u, upload, "cls,seg", {"Content-Type": "image/jpeg"}) for u in (ray, fastapi.url))
        assert r.status_code == f.status_code == 200 and r.json() == f.json()

        statuses = []
        for body, tasks, headers in bad:
            r, f = _post(ray, body, tasks, headers), _post(fastapi.url, body, tasks, headers)
            assert (r.status_code, r.json()) == (f.status_code, f.json()), tasks
            statuses.append(r.status_code)
        assert statuses == [400, 400, 400, 400, 400, 409, 415, 413, 400, 431]

        for path in ("/v1/encoder", "/v1/tasks", "/healthz", "/readyz"):
            r, f = httpx.get(ray + path), httpx.get(fastapi.url + path)
            assert (r.status_code, r.json()) == (f.status_code, f.json()) == (200, f.json()), path
        r, f = httpx.get(ray + "/openapi.json"), httpx.get(fastapi.url + "/openapi.json")
        assert r.json().pop("servers", [{"url": PREFIX[which]}]) == [{"url": PREFIX[which]}]  # the route prefix
        assert {k: v for k, v in r.json().items() if k != "servers"} == f.json()  # one app, one contract
        assert httpx.get(ray + "/metrics").status_code == 200
        for method, path in (("GET", "/infer"), ("GET", "/nope")):
            r, f = httpx.request(method, ray + path), httpx.request(method, fastapi.url + path)
            assert (r.status_code, r.json()) == (f.status_code, f.json()), path

    async def concurrently():  # batched across requests in the task deployments, split back correctly
        async with httpx.AsyncClient(timeout=120) as client:
            return await asyncio.gather(*[client.post(ray + "/infer", params={"tasks": "cls,det,seg"}, content=p,
                                                      headers=PAYLOAD) for p in payloads * 3])

    replies = asyncio.run(concurrently())
    for reply, alone in zip(replies, answers[:3] * 3, strict=True):
        _assert_close(reply.json(), alone)  # a batch of another size may move float32 results by ~1 ulp


def _assert_close(got, want, path="$"):
    """Equal structure, strings and integers; floats to float32 precision."""
    if isinstance(want, dict):
        assert isinstance(got, dict) and got.keys() == want.keys(), path
        for k in want:
            _assert_close(got[k], want[k], f"{path}.{k}")
    elif isinstance(want, list):
        assert isinstance(got, list) and len(got) == len(want), path
        for i, (g, w) in enumerate(zip(got, want)):
            _assert_close(g, w, f"{path}[{i}]")
    elif isinstance(want, float):
        assert got == pytest.approx(want, rel=1e-5, abs=1e-7), path
    else:
        assert got == want, path


def test_serve_config_names_the_application_and_its_deployments():
    import yaml
    from ray.serve.schema import ServeDeploySchema

    config = yaml.safe_load((Path(__file__).parents[1] / "deploy" / "ray" / "serve_config.yaml").read_text())
    ServeDeploySchema.parse_obj(config)  # Ray's own schema for `serve deploy` / `serve run`
    (application,) = config["applications"]
    assert application["import_path"] == "splitserve.gateway.ray_app:app"
    names = {d["name"] for d in application["deployments"]}
    assert names <= {"ingress", "task-classification", "task-detection", "task-segmentation"}

