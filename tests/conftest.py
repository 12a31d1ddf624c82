"""Shared fixtures: small real bundles (ResNet-18, every plugin), real images, one local Ray instance."""

from __future__ import annotations

import io
import os
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from splitserve.defaults import builtin_tasks
from splitserve.gateway.process import GatewayProcess, free_port


@pytest.fixture(scope="session")
def bundle_dir(tmp_path_factory) -> Path:
    """An untrained bundle with all three built-in heads (deterministic weights)."""
    from splitserve.defaults import build_untrained_bundle

    path = tmp_path_factory.mktemp("bundles") / "es-r18"
    return build_untrained_bundle(path, input_size=(64, 64), tasks=builtin_tasks())


@pytest.fixture(scope="session")
def other_bundle_dir(tmp_path_factory) -> Path:
    """Same architecture, different seed: a different encoder (different fingerprint)."""
    from splitserve.defaults import build_untrained_bundle

    path = tmp_path_factory.mktemp("bundles") / "es-r18-seed1"
    return build_untrained_bundle(path, input_size=(64, 64), seed=1, tasks=["cls"])


@pytest.fixture(scope="session")
def vr_bundle_dir(tmp_path_factory) -> Path:
    """A variable-rate bundle (4 rates) with all three built-in heads, whose latents depend on the image."""
    from .helpers import informative_bundle

    path = tmp_path_factory.mktemp("bundles") / "es-r18-vr4"
    return informative_bundle(path, input_size=(64, 64), tasks=builtin_tasks(), codec_config={"rates": 4})


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


class Started:
    """A subprocess started now and checked later, so that independent ones run side by side: a
    fresh interpreter spends its first seconds importing torch on one core, and this machine has
    two. Its output goes to files (a pipe that nobody reads could fill up and stall it)."""

    def __init__(self, args: list[str], **popen):
        self.out, self.err = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")
        self.proc = subprocess.Popen(args, stdout=self.out, stderr=self.err, text=True, **popen)

    def result(self, timeout: float = 300) -> subprocess.CompletedProcess:
        """Wait for it (killed after ``timeout``: subprocess.TimeoutExpired), like ``subprocess.run``."""
        try:
            self.proc.wait(timeout)
        finally:
            self.stop()
        self.out.seek(0), self.err.seek(0)
        return subprocess.CompletedProcess(self.proc.args, self.proc.returncode, self.out.read(), self.err.read())

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def photo_jpeg(tmp_path) -> Path:
    """A real JPEG photo with an odd size (not a multiple of anything)."""
    path = tmp_path / "photo.jpg"
    path.write_bytes(jpeg_bytes(texture("coffee", (333, 217))))
    return path


@pytest.fixture
def rng():
    return np.random.default_rng(0)


@pytest.fixture(scope="session")
def server(bundle_dir):
    s = GatewayProcess("--bundle", str(bundle_dir), "--max-wait-ms", "40", "--max-batch", "16",
                       "--max-body-bytes", "200000").start()
    yield s
    s.stop()


@pytest.fixture(scope="session")
def edge(bundle_dir):
    from splitserve.edge import EdgeEncoder

    return EdgeEncoder.from_bundle(bundle_dir)


class LocalRay:
    """A local 2-CPU Ray instance on loopback with Serve's HTTP proxy, started on first use.

    The Ray test modules share it through the ``local_ray`` fixture: each deploys its applications
    in a module fixture (``local_ray.start()`` gives the proxy's URL) and deletes them at its end.
    Starting and stopping an instance costs about 15 s here, so it starts once; and it stops as soon
    as the modules that use it are done (see :func:`pytest_runtest_teardown`), so it does not idle
    beside the rest of the suite.
    """

    object_store_mb = 200

    def __init__(self) -> None:
        self.url: str | None = None
        self.modules: set[Path] = set()  # test files that use it, from the collection

    def start(self) -> str:
        if self.url is None:
            os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
            import ray
            from ray import serve

            port = free_port()
            ray.init(num_cpus=2, object_store_memory=self.object_store_mb * 2**20, include_dashboard=False,
                     _node_ip_address="127.0.0.1", log_to_driver=False, configure_logging=False)
            try:
                serve.start(http_options={"host": "127.0.0.1", "port": port})
            except BaseException:
                ray.shutdown()
                raise
            self.url = f"http://127.0.0.1:{port}"
        return self.url

    def stop(self) -> None:
        if self.url is not None:
            import ray
            from ray import serve

            self.url = None
            try:
                serve.shutdown()
            finally:
                ray.shutdown()


_LOCAL_RAY = LocalRay()


@pytest.fixture(scope="session")
def local_ray() -> LocalRay:
    """The local Ray instance the Ray test modules share (not started until one calls ``start()``)."""
    yield _LOCAL_RAY
    _LOCAL_RAY.stop()


# The test modules that use the shared Ray instance (checked at collection), in the order they run,
# one after another and before the rest: test_ray.py first, since its first test runs `platform ray`,
# which starts an instance of its own, before the shared one is up (else it is stopped and started
# again, ~15 s).
RAY_MODULES = ("test_ray.py", "test_ray_faults.py", "test_rates_gateway.py")


def pytest_collection_modifyitems(items) -> None:
    _LOCAL_RAY.modules = {item.path for item in items if "local_ray" in item.fixturenames}
    unlisted = sorted(path.name for path in _LOCAL_RAY.modules if path.name not in RAY_MODULES)
    if unlisted:
        raise pytest.UsageError(f"{', '.join(unlisted)} use local_ray: add them to RAY_MODULES in tests/conftest.py")
    # the Ray modules first, in their order; the rest keep theirs (a stable sort)
    order = {name: i for i, name in enumerate(RAY_MODULES)}
    items.sort(key=lambda item: order.get(item.path.name, len(RAY_MODULES)))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item, nextitem):
    """Stop the shared Ray instance once the next test is in a module that does not use it (the
    modules' own fixtures, which delete their applications, are torn down before this runs)."""
    try:
        return (yield)
    finally:
        if nextitem is None or nextitem.path not in _LOCAL_RAY.modules:
            _LOCAL_RAY.stop()
