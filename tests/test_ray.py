"""The Ray Serve application on a real local Ray instance gives the FastAPI gateway's answers and
errors for the same payloads."""

from __future__ import annotations

import os

import httpx
import pytest

from splitserve.defaults import build_untrained_bundle
from splitserve.edge import EdgeEncoder
from splitserve.gateway.process import GatewayProcess, free_port

from .conftest import texture
from .helpers import informative

pytestmark = pytest.mark.slow
HEADERS = {"Content-Type": "application/x-splitserve"}


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    root = tmp_path_factory.mktemp("ray")
    main = build_untrained_bundle(root / "main", input_size=(64, 64), tasks=["classification", "segmentation"])
    informative(main)
    other = build_untrained_bundle(root / "other", input_size=(64, 64), tasks=["classification"], seed=1)
    return main, other


@pytest.fixture(scope="module")
def ray_url(bundles):
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    import ray
    from ray import serve

    from splitserve.gateway.ray_app import build_app

    port = free_port()
    ray.init(num_cpus=2, object_store_memory=200 * 2**20, include_dashboard=False, _node_ip_address="127.0.0.1",
             log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app(str(bundles[0])), name="splitserve")
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


def _post(url: str, body: bytes, tasks: str | None = "cls,seg", headers=HEADERS):
    return httpx.post(url + "/infer", params={"tasks": tasks} if tasks else None, content=body, headers=headers,
                      timeout=120)


def test_ray_answers_and_errors_equal_the_fastapi_gateways(ray_url, bundles):
    main, other = bundles
    edge = EdgeEncoder.from_bundle(main)
    payloads = [edge.encode([texture("astronaut", (90, 70)), texture("coffee", (90, 70))]).data,
                edge.encode([texture("rocket", (50, 80))]).data]
    bad = [
        (payloads[0][:-7], "cls"),                                              # truncated
        (payloads[0], "cls,pose"),                                              # unknown task
        (EdgeEncoder.from_bundle(other).encode([texture("brick", (64, 64))]).data, "cls"),  # another encoder
    ]
    with GatewayProcess("--bundle", str(main), "--max-wait-ms", "0") as fastapi:
        for body in payloads:
            r, f = _post(ray_url, body), _post(fastapi.url, body)
            assert r.status_code == f.status_code == 200
            got, want = r.json(), f.json()
            assert got["fingerprint"] == want["fingerprint"] and got["tasks"] == want["tasks"]
            for g, w in zip(got["results"], want["results"], strict=True):
                assert g["original_size"] == w["original_size"]
                assert [c["index"] for c in g["tasks"]["classification"]["top"]] == \
                    [c["index"] for c in w["tasks"]["classification"]["top"]]
                assert [c["probability"] for c in g["tasks"]["classification"]["top"]] == pytest.approx(
                    [c["probability"] for c in w["tasks"]["classification"]["top"]], rel=1e-4, abs=1e-6)
                seg_g, seg_w = g["tasks"]["segmentation"], w["tasks"]["segmentation"]
                assert (seg_g["width"], seg_g["height"]) == (seg_w["width"], seg_w["height"])
                assert {c["index"] for c in seg_g["classes"]} == {c["index"] for c in seg_w["classes"]}
        for body, tasks in bad:
            r, f = _post(ray_url, body, tasks), _post(fastapi.url, body, tasks)
            assert r.status_code == f.status_code and r.status_code in (400, 409), (tasks, r.status_code, f.status_code)
            assert r.json()["detail"] == f.json()["detail"]
        r = _post(ray_url, payloads[0], headers={"Content-Type": "text/plain"})
        f = _post(fastapi.url, payloads[0], headers={"Content-Type": "text/plain"})
        assert r.status_code == f.status_code == 415 and r.json()["detail"] == f.json()["detail"]
