"""The gateway as users meet it: a real uvicorn process on loopback and a real httpx client."""

import asyncio
import random
import subprocess
import sys

import httpx
import pytest

from splitserve.client import AsyncClient, Client, ServerError

from splitserve.gateway.process import GatewayProcess, free_port

from .conftest import texture

pytestmark = pytest.mark.slow


def metric(text: str, name: str, **labels) -> float:
    """Value of one sample in Prometheus text exposition (0 if absent), via prometheus-client's parser."""
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return sample.value
    return 0.0


def scrape(server) -> str:
    r = httpx.get(server.url + "/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    return r.text


def test_health_ready_encoder_tasks(server, edge):
    assert httpx.get(server.url + "/healthz").json() == {"status": "ok"}
    assert httpx.get(server.url + "/readyz").json() == {"status": "ready"}
    with Client(server.url) as c:
        info = c.encoder()
        assert info["fingerprint"] == edge.fingerprint
        assert info["family"] == "entropic_student" and info["input_size"] == [64, 64]
        tasks = {t["name"]: t for t in c.tasks()}
        assert set(tasks) == {"classification", "detection", "segmentation"}
        assert tasks["detection"]["aliases"] == ["det"]
        assert "properties" in tasks["classification"]["response_schema"]
        c.check_encoder(edge.fingerprint)


def test_three_tasks_in_one_request(server, edge):
    images = [texture("brick", (120, 90)), texture("coffee", (64, 48))]
    encoded = edge.encode(images)
    with Client(server.url) as c:
        answer = c.infer(encoded.data, "cls,det,seg")
    assert answer["bytes_received"] == encoded.num_bytes
    assert answer["fingerprint"] == edge.fingerprint and answer["input"] == "payload"
    assert answer["tasks"] == ["classification", "detection", "segmentation"]
    assert [r["original_size"] for r in answer["results"]] == [[90, 120], [48, 64]]
    for r in answer["results"]:
        sections = r["tasks"]
        assert len(sections["classification"]["top"]) >= 1
        assert isinstance(sections["detection"]["detections"], list)
        seg = sections["segmentation"]
        assert (seg["height"], seg["width"]) == tuple(r["original_size"])
        assert abs(sum(c["fraction"] for c in seg["classes"]) - 1) < 1e-3


def test_only_requested_tasks_run(server, edge):
    with Client(server.url) as c:
        answer = c.infer(edge.encode(texture("grass", (80, 80))).data, "seg")
    assert answer["tasks"] == ["segmentation"]
    assert answer["results"][0]["tasks"]["classification"] is None


def test_decode_once_for_three_tasks(server, edge):
    data = edge.encode([texture("brick", (64, 64))] * 3).data
    before = scrape(server)
    with Client(server.url) as c:
        c.infer(data, "cls,det,seg")
    after = scrape(server)
    count = lambda text, stage: metric(text, "splitserve_stage_seconds_count", stage=stage)  # noqa: E731
    assert count(after, "entropy_decode") - count(before, "entropy_decode") == 1
    assert count(after, "feature_decode") - count(before, "feature_decode") == 1
    for task in ("classification", "detection", "segmentation"):
        assert count(after, f"task:{task}") - count(before, f"task:{task}") == 1


def test_full_offloading_accepts_images(server):
    with Client(server.url) as c:
        for fmt, ctype in (("JPEG", "image/jpeg"), ("PNG", "image/png"), ("WEBP", "image/webp")):
            import io

            buf = io.BytesIO()
            texture("coffee", (100, 70)).save(buf, format=fmt)
            answer = c.infer_image(buf.getvalue(), "cls")
            assert answer["input"] == "image" and answer["results"][0]["original_size"] == [70, 100]


def test_errors_are_4xx_and_server_keeps_serving(server, edge, other_bundle_dir):
    from splitserve.edge import EdgeEncoder

    good = edge.encode(texture("brick", (64, 64))).data
    url = server.url + "/infer"
    hdr = {"Content-Type": "application/x-splitserve"}
    r = httpx.post(url, params={"tasks": "cls,pose"}, content=good, headers=hdr)
    assert r.status_code == 400 and "unknown task 'pose'" in r.json()["detail"]
    assert "classification (cls)" in r.json()["detail"]
    r = httpx.post(url, params={"tasks": "cls"}, content=good[:-5], headers=hdr)
    assert r.status_code == 400 and "truncated" in r.json()["detail"]
    flipped = bytearray(good)
    flipped[len(flipped) // 2] ^= 0x10
    r = httpx.post(url, params={"tasks": "cls"}, content=bytes(flipped), headers=hdr)
    assert r.status_code == 400
    r = httpx.post(url, params={"tasks": "cls"}, content=b"GIF89a" + b"\0" * 40, headers=hdr)
    assert r.status_code == 400 and "magic" in r.json()["detail"]
    foreign = EdgeEncoder.from_bundle(other_bundle_dir).encode(texture("brick", (64, 64))).data
    r = httpx.post(url, params={"tasks": "cls"}, content=foreign, headers=hdr)
    assert r.status_code == 409 and "fingerprint" in r.json()["detail"]
    r = httpx.post(url, params={"tasks": "cls"}, content=b"\0" * 300_000, headers=hdr)
    assert r.status_code == 413
    r = httpx.post(url, params={"tasks": "cls"}, content=good, headers={"Content-Type": "text/plain"})
    assert r.status_code == 415 and "unsupported content type" in r.json()["detail"]
    r = httpx.post(url, params={"tasks": "cls"}, content=b"not an image", headers={"Content-Type": "image/png"})
    assert r.status_code == 400 and "not a readable image" in r.json()["detail"]
    # chunked body without Content-Length is limited while streaming
    r = httpx.post(url, params={"tasks": "cls"}, content=iter([b"\0" * 100_000] * 3), headers=hdr)
    assert r.status_code == 413
    with Client(server.url) as c:
        assert c.infer(good, "cls")["results"][0]["tasks"]["classification"]["top"]
        with pytest.raises(ServerError) as e:
            c.infer(foreign, "cls")
        assert e.value.status == 409
    text = scrape(server)
    assert metric(text, "splitserve_requests_total", task="classification", status="409") >= 1
    assert metric(text, "splitserve_requests_total", task="classification", status="200") >= 1


def test_concurrent_requests_are_batched(server, edge):
    data = edge.encode(texture("gravel", (64, 64))).data
    before = scrape(server)

    async def burst():
        async with AsyncClient(server.url) as c:
            return await asyncio.gather(*[c.infer(data, "cls") for _ in range(12)])

    answers = asyncio.run(burst())
    assert len(answers) == 12
    after = scrape(server)
    batches = metric(after, "splitserve_batch_requests_count") - metric(before, "splitserve_batch_requests_count")
    merged = metric(after, "splitserve_batch_requests_sum") - metric(before, "splitserve_batch_requests_sum")
    assert merged == 12
    assert batches < 12  # some requests shared a decode


def test_openapi_documents_every_endpoint(server):
    spec = httpx.get(server.url + "/openapi.json").json()
    for path in ("/infer", "/v1/tasks", "/v1/encoder", "/healthz", "/readyz", "/metrics"):
        assert path in spec["paths"], path
    # one operationId per operation, the same in every process (probes answer GET and HEAD)
    ids = [op["operationId"] for item in spec["paths"].values() for op in item.values()]
    assert len(ids) == len(set(ids)) and {"healthz", "healthz_head", "readyz", "readyz_head"} <= set(ids)
    infer = spec["paths"]["/infer"]["post"]
    assert "application/x-splitserve" in infer["requestBody"]["content"]
    assert {"200", "400", "409", "413", "415", "503"} <= set(infer["responses"])
    schemas = spec["components"]["schemas"]
    assert {"InferResponse", "ImageResult", "TaskResults"} <= set(schemas)
    assert set(schemas["TaskResults"]["properties"]) == {"classification", "detection", "segmentation"}
    # this server has no API key: its spec declares none (a keyed server's does: test_hostile_input)
    assert "securitySchemes" not in spec["components"] and "security" not in infer
    # /docs loads its JavaScript from a CDN: off unless --docs (the spec itself is always served)
    assert httpx.get(server.url + "/docs").status_code == 404


def test_queue_full_gives_503_and_recovers(bundle_dir, edge):
    s = GatewayProcess("--bundle", str(bundle_dir), "--max-batch", "2", "--max-wait-ms", "0", "--max-queue", "2",
                       "--api-key", "s3cret", "--no-warmup").start()
    try:
        data = edge.encode([texture("brick", (64, 64))] * 2).data
        r = httpx.post(s.url + "/infer", content=data, headers={"Content-Type": "application/x-splitserve"})
        assert r.status_code == 401
        assert httpx.get(s.url + "/openapi.json").status_code == 200  # without --auth-all the spec stays open

        async def burst():
            async with httpx.AsyncClient(base_url=s.url, headers={"X-API-Key": "s3cret"}, timeout=120) as c:
                return await asyncio.gather(*[
                    c.post("/infer", params={"tasks": "cls,det,seg"}, content=data,
                           headers={"Content-Type": "application/x-splitserve"}) for _ in range(12)])

        responses = asyncio.run(burst())
        codes = [r.status_code for r in responses]
        assert 503 in codes and 200 in codes
        busy = next(r for r in responses if r.status_code == 503)
        assert int(busy.headers["retry-after"]) >= 1 and "queue is full" in busy.json()["detail"]
        with Client(s.url, api_key="s3cret") as c:  # recovered
            assert c.infer(data, "cls")["results"]
        assert metric(scrape(s), "splitserve_rejected_total") >= 1
    finally:
        s.stop()


def test_startup_fails_clearly_for_missing_head(other_bundle_dir):
    proc = subprocess.run([sys.executable, "-m", "splitserve", "serve", "--bundle", str(other_bundle_dir),
                           "--tasks", "det", "--port", "0"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0
    assert "has no head for detection" in proc.stderr


def test_startup_fails_clearly_for_missing_bundle(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "splitserve", "serve", "--bundle", str(tmp_path / "nope")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "no such bundle directory" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_free_ports_do_not_follow_the_seeded_random_module():
    """Training seeds ``random``: two processes on one machine that both trained with one seed (two
    test runs, two benchmarks) must not try the same ports in the same order and meet at one."""
    state = random.getstate()
    try:
        random.seed(0)
        first = [free_port() for _ in range(3)]
        random.seed(0)
        assert [free_port() for _ in range(3)] != first
    finally:
        random.setstate(state)  # the rest of the session keeps its own sequence
