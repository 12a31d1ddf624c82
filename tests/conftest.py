"""Shared fixtures: small real bundles (ResNet-18, every plugin) and real images."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image


@pytest.fixture(scope="session")
def bundle_dir(tmp_path_factory) -> Path:
    """An untrained bundle with all three built-in heads (deterministic weights)."""
    from splitserve.defaults import build_untrained_bundle

    path = tmp_path_factory.mktemp("bundles") / "es-r18"
    return build_untrained_bundle(path, input_size=(64, 64))


@pytest.fixture(scope="session")
def other_bundle_dir(tmp_path_factory) -> Path:
    """Same architecture, different seed: a different encoder (different fingerprint)."""
    from splitserve.defaults import build_untrained_bundle

    path = tmp_path_factory.mktemp("bundles") / "es-r18-seed1"
    return build_untrained_bundle(path, input_size=(64, 64), seed=1, tasks=["cls"])


def texture(name: str = "brick", size: tuple[int, int] | None = None) -> Image.Image:
    """A real photo shipped in scikit-image's wheel, optionally resized to (width, height)."""
    from skimage import data

    arr = getattr(data, name)()
    img = Image.fromarray(arr).convert("RGB")
    return img.resize(size) if size else img


def jpeg_bytes(img: Image.Image, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


@pytest.fixture
def photo_jpeg(tmp_path) -> Path:
    """A real JPEG photo with an odd size (not a multiple of anything)."""
    path = tmp_path / "photo.jpg"
    path.write_bytes(jpeg_bytes(texture("coffee", (333, 217))))
    return path


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A real `platform serve` process on loopback; stopped by the fixture that made it."""

    def __init__(self, *args: str, env: dict | None = None):
        import os
        import subprocess
        import sys

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "splitserve", "serve", "--port", str(self.port), "--log-level", "warning", *args]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     env={**os.environ, **(env or {})})

    def wait_ready(self, timeout: float = 120) -> "Server":
        import time

        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited {self.proc.returncode}:\n{self.proc.stdout.read()}")
            try:
                if httpx.get(self.url + "/readyz", timeout=1).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError("server did not become ready")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except Exception:
                self.proc.kill()


@pytest.fixture(scope="session")
def server(bundle_dir):
    s = Server("--bundle", str(bundle_dir), "--max-wait-ms", "40", "--max-batch", "16",
               "--max-body-bytes", "200000").wait_ready()
    yield s
    s.stop()


@pytest.fixture(scope="session")
def edge(bundle_dir):
    from splitserve.edge import EdgeEncoder

    return EdgeEncoder.from_bundle(bundle_dir)
