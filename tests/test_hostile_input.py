"""The attacks of the reliability issue, each against a real gateway process: the cost of a request
is bounded by what it pays for, and no request can take the server down or hold it."""

from __future__ import annotations

import io
import signal
import socket
import time

import httpx
import pytest
from PIL import Image

from splitserve.errors import PayloadError
from splitserve.gateway.process import GatewayProcess
from splitserve_edge.payload import Payload

from .conftest import texture

pytestmark = pytest.mark.slow
PAYLOAD = {"Content-Type": "application/x-splitserve"}


@pytest.fixture(scope="module")
def gateway(bundle_dir, tmp_path_factory):
    key = tmp_path_factory.mktemp("secret") / "key"
    key.write_text("s3cret\n")
    s = GatewayProcess("--bundle", str(bundle_dir), "--max-batch", "8", "--max-wait-ms", "5",
                       "--body-timeout-s", "1", "--shutdown-timeout-s", "2", "--max-image-pixels", "4000000",
                       "--api-key-file", str(key), "--auth-all", "--docs").start()
    yield s
    s.stop()


def _client(gateway) -> httpx.Client:
    return httpx.Client(base_url=gateway.url, headers={"X-API-Key": "s3cret"}, timeout=30)


def _forge(real: Payload, *, latent=None, sizes=None, images=None) -> bytes:
    n = images or real.num_images
    return Payload(real.fingerprint, latent or real.latent_shape, sizes or real.original_sizes * n,
                   real.strings * n if images else real.strings).to_bytes()


def test_oversized_claims_are_refused_fast(gateway, edge):
    real = edge.encode([texture("brick", (70, 50))]).payload
    c = real.latent_shape[0]
    with _client(gateway) as client:
        for body, reason in [
            (_forge(real, latent=(c, 512, 512)), "preprocessing"),            # row 1: 24x512x512 latent claim
            (_forge(real, sizes=((16384, 16384),)), "original height"),      # row 2: huge original size
            (_forge(real, sizes=((65535, 65535),)), "original height"),      # row 3
            (_forge(real, images=160), "image count"),                        # row 4: N above max_batch
        ]:
            t = time.perf_counter()
            r = client.post("/infer", content=body, headers=PAYLOAD)
            assert r.status_code == 400 and reason in r.json()["detail"], (reason, r.status_code, r.text[:200])
            assert time.perf_counter() - t < 2.0
        assert client.post("/infer", content=real.to_bytes(), headers=PAYLOAD).status_code == 200


def test_decompression_bomb_upload_is_refused_from_its_header(gateway):
    buf = io.BytesIO()
    Image.new("1", (8000, 8000)).save(buf, format="PNG")  # row 5: a few kB, 64 M pixels
    assert len(buf.getvalue()) < 50_000
    with _client(gateway) as client:
        t = time.perf_counter()
        r = client.post("/infer", content=buf.getvalue(), headers={"Content-Type": "image/png"})
        assert r.status_code == 400 and "too large" in r.json()["detail"]
        assert time.perf_counter() - t < 2.0


def test_stalled_body_gets_408_and_huge_header_is_refused(gateway):
    host, port = "127.0.0.1", int(gateway.url.rsplit(":", 1)[1])
    with socket.create_connection((host, port), timeout=10) as s:  # row 6: declares 5 MB, sends 1 kB, stalls
        s.sendall(b"POST /infer HTTP/1.1\r\nHost: x\r\nX-API-Key: s3cret\r\nContent-Type: application/x-splitserve\r\n"
                  b"Content-Length: 5000000\r\n\r\n" + b"\0" * 1024)
        t = time.perf_counter()
        answer = s.recv(4096)
        assert answer.startswith(b"HTTP/1.1 408") or answer.startswith(b"HTTP/1.1 413"), answer[:80]
        assert time.perf_counter() - t < 5
    with socket.create_connection((host, port), timeout=10) as s:  # one 1 MB header line
        try:
            s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Junk: " + b"a" * (1 << 20) + b"\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError):
            pass
        answer = s.recv(4096)
        assert answer == b"" or answer.split(b" ")[1] in (b"400", b"431"), answer[:80]
    assert httpx.get(gateway.url + "/healthz").status_code == 200


def test_error_bodies_echo_only_a_short_excerpt(gateway, edge):
    data = edge.encode([texture("brick", (40, 40))]).data
    with _client(gateway) as client:  # row 8: long values that fit in the request head reach the app
        r = client.post("/infer", params={"tasks": "x" * 10_000}, content=data, headers=PAYLOAD)
        assert r.status_code == 400 and "unknown task" in r.text and len(r.text) < 500, r.text[:600]
        r = client.post("/infer", content=data, headers={"Content-Type": "a/" + "b" * 10_000})
        assert r.status_code == 415 and len(r.text) < 500, r.text[:600]


def _raw_head(host: str, port: int, size: int) -> bytes:
    """Send a GET /healthz head of exactly ``size`` bytes in one write; return the status line."""
    head = b"GET /healthz?x=1 HTTP/1.1\r\nHost: x\r\nX-Pad: \r\n\r\n"
    head = head.replace(b"X-Pad: ", b"X-Pad: " + b"a" * (size - len(head)))
    assert len(head) == size
    with socket.create_connection((host, port), timeout=10) as s:
        s.sendall(head)
        return s.recv(4096).split(b"\r\n", 1)[0]


def test_the_head_limit_is_exact_however_the_head_arrives(gateway):
    """h11 checks its limit only on a head still incomplete after a read; one read brings a whole
    20 kB head, so the app measures every head: 16,384 bytes pass, 16,385 get 431."""
    host, port = "127.0.0.1", int(gateway.url.rsplit(":", 1)[1])
    assert _raw_head(host, port, 16_384) == b"HTTP/1.1 200 OK"
    assert _raw_head(host, port, 16_385).startswith(b"HTTP/1.1 431")
    assert _raw_head(host, port, 20_000).startswith(b"HTTP/1.1 431")


def test_a_60_kb_request_line_gets_a_short_431_and_the_server_keeps_serving(gateway, edge):
    data = edge.encode([texture("brick", (40, 40))]).data
    with _client(gateway) as client:
        r = client.post("/infer", params={"tasks": "x" * 60_000}, content=data, headers=PAYLOAD)
        assert r.status_code == 431 and "exceeds the limit of 16384 bytes" in r.json()["detail"], r.text[:600]
        assert len(r.text) < 200
    assert httpx.get(gateway.url + "/healthz").status_code == 200


def test_released_memoryview_is_a_payload_error():
    view = memoryview(b"SS\x02" + b"\0" * 40)
    view.release()
    with pytest.raises(PayloadError):  # row 9
        Payload.from_bytes(view)


def test_key_from_file_protects_everything_but_the_probes(gateway):
    """--auth-all: the key guards /metrics, /v1/*, the spec and the docs pages; probes stay open."""
    documents = ("/openapi.json", "/docs", "/redoc")
    with httpx.Client(base_url=gateway.url, timeout=10) as anonymous:  # row 10
        for path in ("/metrics", "/v1/tasks", "/v1/encoder", *documents):
            r = anonymous.get(path)
            assert r.status_code == 401 and "API key" in r.json()["detail"], path
        for path in ("/healthz", "/readyz"):
            assert anonymous.get(path).status_code == 200
            assert anonymous.head(path).status_code == 200  # probes answer HEAD too
    with _client(gateway) as client:
        assert client.get("/v1/encoder").status_code == 200 and client.get("/metrics").status_code == 200
        for page in ("/docs", "/redoc"):
            r = client.get(page)
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
            assert "/openapi.json" in r.text, page
        spec = client.get("/openapi.json").json()
    # the key is declared in OpenAPI, so generated clients send it
    assert spec["components"]["securitySchemes"]["APIKeyHeader"] == {
        "type": "apiKey", "in": "header", "name": "X-API-Key",
        "description": "the gateway's API key, when it has one"}
    for path in ("/infer", "/v1/tasks", "/v1/encoder", "/metrics"):
        method = "post" if path == "/infer" else "get"
        assert spec["paths"][path][method]["security"] == [{"APIKeyHeader": []}], path
    assert "security" not in spec["paths"]["/healthz"]["get"]
    assert not set(documents) & set(spec["paths"]), "the documents do not document themselves"


def test_sigterm_with_a_slow_client_exits_within_the_deadline(bundle_dir):
    s = GatewayProcess("--bundle", str(bundle_dir), "--shutdown-timeout-s", "2", "--body-timeout-s", "30",
                       "--no-warmup").start()
    port = int(s.url.rsplit(":", 1)[1])
    slow = socket.create_connection(("127.0.0.1", port), timeout=10)  # row 7: a body that never finishes
    slow.sendall(b"POST /infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-splitserve\r\n"
                 b"Content-Length: 100000\r\n\r\n" + b"\0" * 100)
    time.sleep(0.5)
    t = time.perf_counter()
    s.proc.send_signal(signal.SIGTERM)
    s.proc.wait(timeout=15)
    assert time.perf_counter() - t < 6, "graceful shutdown must end at its deadline"
    slow.close()
