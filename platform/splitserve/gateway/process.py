"""A real gateway process on loopback — for benchmarks and integration tests, which must
measure and exercise the server exactly as users run it (``platform serve``)."""

from __future__ import annotations

import os
import random
import socket
import subprocess
import sys
import time


def free_port() -> int:
    """A free loopback port in 20000–32767: below Linux's ephemeral range and above Ray's worker
    ports (10002–19999), so no bind(0), outgoing connection or Ray worker takes it before the server binds."""
    # from the OS's entropy, not the random module, which training seeds: two processes on one machine
    # that both trained with one seed (two test runs) would otherwise try the same ports in one order
    for port in random.SystemRandom().sample(range(20000, 32768), 200):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise OSError("no free loopback port in 20000-32767")


class GatewayProcess:
    """``python -m splitserve serve …`` on a free loopback port; a context manager."""

    def __init__(self, *args: str, env: dict[str, str] | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.args = ["--port", str(self.port), "--log-level", "warning", *args]
        self.env = env
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 180) -> "GatewayProcess":
        import httpx

        cmd = [sys.executable, "-m", "splitserve", "serve", *self.args]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     env={**os.environ, **(self.env or {})})
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"gateway exited with {self.proc.returncode}:\n{self.proc.stdout.read()}")
            try:
                if httpx.get(self.url + "/readyz", timeout=1).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"gateway did not become ready within {timeout:.0f} s")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def __enter__(self) -> "GatewayProcess":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
