"""Shared fixtures: small real bundles (ResNet-18, every plugin) and real images."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from splitserve.defaults import builtin_tasks
from splitserve.gateway.process import GatewayProcess


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
