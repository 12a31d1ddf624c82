"""Slow and numerous clients against a real gateway process: a request head has a deadline, a whole
request has one, and connections beyond the bound are answered 503 + Retry-After — while honest
requests keep their latency."""

from __future__ import annotations

import socket
import statistics
import threading
import time

import httpx
import pytest

from splitserve.gateway.process import GatewayProcess

from .conftest import texture

pytestmark = pytest.mark.slow
PAYLOAD = {"Content-Type": "application/x-splitserve"}
HEAD_TIMEOUT, REQUEST_TIMEOUT, BODY_TIMEOUT, MAX_CONNECTIONS = 2.0, 4.0, 1.5, 24


@pytest.fixture(scope="module")
def gateway(bundle_dir):
    s = GatewayProcess("--bundle", str(bundle_dir), "--head-timeout-s", str(HEAD_TIMEOUT), "--request-timeout-s",
                       str(REQUEST_TIMEOUT), "--body-timeout-s", str(BODY_TIMEOUT), "--max-connections",
                       str(MAX_CONNECTIONS), "--max-wait-ms", "1", "--threads", "1").start()
    yield s
    s.stop()


def _address(gateway) -> tuple[str, int]:
    return "127.0.0.1", int(gateway.url.rsplit(":", 1)[1])


def _slowloris(address, results: list, index: int, give_up_s: float = 12.0) -> None:
    """Send a request head one byte per second (odd ``index``: nothing at all); record when (and
    how) the server ends it."""
    head = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Padding: " + b"a" * 64 + b"\r\n\r\n"
    start = time.monotonic()
    with socket.create_connection(address, timeout=give_up_s) as s:
        s.settimeout(1.0)
        for byte in head:
            if time.monotonic() - start > give_up_s:
                break
            try:
                if index % 2 == 0:
                    s.sendall(bytes([byte]))
                answer = s.recv(4096)  # returns as soon as the server answers or closes
                results[index] = (time.monotonic() - start, answer)
                return
            except socket.timeout:
                continue  # one second passed with no answer: send the next byte
            except OSError as e:  # reset by the server
                results[index] = (time.monotonic() - start, repr(e).encode())
                return
    results[index] = (None, b"")  # still open after give_up_s


def _honest_latencies(url: str, body: bytes, seconds: float) -> list[float]:
    out, end = [], time.monotonic() + seconds
    with httpx.Client(base_url=url, timeout=30) as c:
        while time.monotonic() < end:
            t = time.perf_counter()
            r = c.post("/infer", params={"tasks": "cls"}, content=body, headers=PAYLOAD)
            assert r.status_code == 200, r.text
            out.append(time.perf_counter() - t)
    return out


def test_slowloris_heads_are_cut_at_the_deadline_and_honest_requests_keep_their_latency(gateway, edge):
    body = edge.encode(texture("brick", (64, 64))).data
    baseline = _honest_latencies(gateway.url, body, 3.0)
    results: list = [None] * 8
    threads = [threading.Thread(target=_slowloris, args=(_address(gateway), results, i)) for i in range(8)]
    for t in threads:
        t.start()
    during = _honest_latencies(gateway.url, body, 3.0)
    for t in threads:
        t.join(20)
    closed = [r[0] for r in results]
    print(f"\nslowloris (4 connections at 1 byte/s, 4 silent; head deadline {HEAD_TIMEOUT:g} s): closed after "
          f"{min(closed):.2f}–{max(closed):.2f} s; honest p50 {statistics.median(baseline) * 1000:.1f} ms before, "
          f"{statistics.median(during) * 1000:.1f} ms during (max {max(during) * 1000:.1f} ms, {len(during)} requests)")
    for seconds, answer in results:
        assert seconds is not None, "a slowloris connection outlived the head deadline"
        assert HEAD_TIMEOUT - 0.5 <= seconds <= HEAD_TIMEOUT + 1.0, seconds
        assert answer.startswith(b"HTTP/1.1 408") or b"Reset" in answer, answer[:80]
    assert statistics.median(during) <= 2 * statistics.median(baseline) + 0.05
    assert httpx.get(gateway.url + "/healthz").status_code == 200


def test_a_body_dripped_under_the_stall_timeout_gets_408_at_the_request_deadline(gateway):
    """One byte every 0.5 s never stalls for --body-timeout-s; --request-timeout-s still ends it."""
    with socket.create_connection(_address(gateway), timeout=REQUEST_TIMEOUT + 5) as s:
        start = time.monotonic()
        s.sendall(b"POST /infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-splitserve\r\n"
                  b"Content-Length: 1000\r\n\r\n")
        s.settimeout(0.5)
        answer = b""
        while time.monotonic() - start < REQUEST_TIMEOUT + 4:
            try:
                s.sendall(b"\0")
                answer = s.recv(4096)
                break
            except socket.timeout:
                continue
        elapsed = time.monotonic() - start
        s.settimeout(2.0)
        while chunk := s.recv(4096):  # the rest of the answer, up to the close
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 408"), answer[:80]
    assert b"request not complete within 4 s" in answer
    assert REQUEST_TIMEOUT - 0.5 <= elapsed <= REQUEST_TIMEOUT + 1.0, elapsed


def test_connections_beyond_the_bound_get_503_with_retry_after(gateway, edge):
    body = edge.encode(texture("brick", (64, 64))).data
    idle = [socket.create_connection(_address(gateway), timeout=5) for _ in range(MAX_CONNECTIONS)]
    try:
        time.sleep(0.2)
        r = httpx.post(gateway.url + "/infer", params={"tasks": "cls"}, content=body, headers=PAYLOAD, timeout=10)
        assert r.status_code == 503 and r.headers["retry-after"] == "1", r.text
        assert r.json()["detail"] == f"server busy: {MAX_CONNECTIONS} connections open, retry in 1 s"
    finally:
        for s in idle:
            s.close()
    time.sleep(0.2)
    r = httpx.post(gateway.url + "/infer", params={"tasks": "cls"}, content=body, headers=PAYLOAD, timeout=10)
    assert r.status_code == 200 and r.json()["results"][0]["tasks"]["classification"]["top"]
