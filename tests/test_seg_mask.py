"""Segmentation answers at a cost set by the model: the mask comes back at the model input's size with
the geometry to the original image, and ``full_mask`` (numpy + Pillow, no torch) enlarges it
nearest-neighbour on the caller's side."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from splitserve.models.backbone import FEATURE_CHANNELS
from splitserve.plugins import ImageMeta, PluginRegistry
from splitserve_edge.payload import Payload
from splitserve_tasks.segmentation.schema import SegmentationResult, decode_mask, full_mask

from .conftest import texture

ARCH = "resnet18"
SAMPLES = Path(__file__).resolve().parents[1] / "examples" / "images"


@pytest.fixture(scope="module")
def seg():
    plugin = PluginRegistry.discover().get("seg")
    torch.manual_seed(0)
    config = plugin.resolve_config(ARCH, {"num_classes": 5})
    return plugin, plugin.build_head(ARCH, config).eval(), config


def nearest_reference(classes: np.ndarray, height: int, width: int) -> np.ndarray:
    """The mask pixel whose area holds each original pixel's centre, counted independently of
    ``full_mask``: the number of mask-pixel edges at or before the centre, in integers (×2·mask·orig)."""
    mh, mw = classes.shape
    row_edges, col_edges = 2 * np.arange(1, mh) * height, 2 * np.arange(1, mw) * width
    rows = np.searchsorted(row_edges, (2 * np.arange(height) + 1) * mh, side="right")
    cols = np.searchsorted(col_edges, (2 * np.arange(width) + 1) * mw, side="right")
    return np.array([[classes[r, c] for c in cols] for r in rows], dtype=np.uint8)


@pytest.mark.parametrize("input_size", [(64, 64), (48, 80)])
def test_full_mask_is_the_model_argmax_on_the_original_grid(seg, input_size):
    """At non-square inputs and originals of other aspects (enlarged, shrunk, extreme), the full-size
    mask equals the argmax at model resolution mapped to the original geometry."""
    plugin, head, config = seg
    originals = [(480, 640), (300, 200), (7, 1000), (100, 30), input_size]
    g = torch.Generator().manual_seed(2)
    h = torch.randn(len(originals), FEATURE_CHANNELS[ARCH], input_size[0] // 4, input_size[1] // 4, generator=g)
    answers = plugin.predict(head, h, [ImageMeta(o, input_size) for o in originals], config)
    logits = F.interpolate(head.logits(h), size=input_size, mode="bilinear", align_corners=False)
    for answer, row, (oh, ow) in zip(answers, logits, originals):
        at_model = row.argmax(0).numpy().astype(np.uint8)
        assert len(np.unique(at_model)) > 1  # a mask with structure, or any mapping would pass
        assert np.array_equal(decode_mask(answer), at_model)
        full = full_mask(answer)
        assert full.shape == (oh, ow) and full.dtype == np.uint8
        assert np.array_equal(full, nearest_reference(at_model, oh, ow))
        assert np.array_equal(full_mask(json.loads(answer.model_dump_json())), full)  # the JSON a client gets
    assert np.array_equal(full_mask(answers[-1]), decode_mask(answers[-1]))  # original = input: itself


def test_full_mask_checks_the_mask_against_its_declared_size(seg):
    plugin, head, config = seg
    h = torch.randn(1, FEATURE_CHANNELS[ARCH], 16, 16)
    answer = plugin.predict(head, h, [ImageMeta((480, 640), (64, 64))], config)[0]
    with pytest.raises(ValueError, match=r"mask is \(64, 64\), the answer says \(64, 32\)"):
        full_mask(answer.model_copy(update={"mask_width": 32}))


def test_schema_and_full_mask_import_without_torch():
    code = ("import sys; from splitserve_tasks.segmentation.schema import full_mask, SegmentationResult; "
            "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def _declared(data: bytes, size: tuple[int, int], n: int) -> bytes:
    """A payload whose n images carry the first image's bitstream and declare ``size`` (h, w): under a
    fixed-size policy every declared size maps to the same latent, so the server must accept it."""
    p = Payload.from_bytes(data)
    return Payload(p.fingerprint, p.latent_shape, (size,) * n, (p.strings[0],) * n).to_bytes()


@pytest.mark.slow
def test_declared_8192_squared_costs_what_64_squared_costs(server, edge):
    """16 images declared 8192×8192 (1.7 kB on the wire) get a small answer at the model's
    resolution: the same masks as the same image declared 64×64, and the scale to 8192."""
    data = edge.encode([texture("coffee", (64, 64))]).data
    answers = {}
    for size in ((64, 64), (8192, 8192)):
        r = httpx.post(server.url + "/infer", params={"tasks": "seg"}, content=_declared(data, size, 16),
                       headers={"Content-Type": "application/x-splitserve"}, timeout=300)
        assert r.status_code == 200, r.text[:300]
        answers[size] = r
    big = answers[(8192, 8192)]
    assert len(big.content) < 64_000
    small = [SegmentationResult.model_validate(x["tasks"]["segmentation"]) for x in answers[(64, 64)].json()["results"]]
    results = [SegmentationResult.model_validate(x["tasks"]["segmentation"]) for x in big.json()["results"]]
    assert len(results) == 16
    for r, s in zip(results, small):
        assert (r.width, r.height, r.mask_width, r.mask_height, r.scale) == (8192, 8192, 64, 64, [128.0, 128.0])
        assert r.mask == s.mask and r.classes == s.classes
    mask = decode_mask(results[0])
    assert np.array_equal(full_mask(results[0]), np.repeat(np.repeat(mask, 128, axis=0), 128, axis=1))


@pytest.mark.slow
def test_default_bundle_masks_cover_the_objects_of_a_640x480_photo():
    """The shipped (trained) bundle through the gateway runtime, on sample photos enlarged to 640×480:
    the full-size mask puts each object's class where the object is in the 640×480 image."""
    from splitserve.defaults import PACKAGED_BUNDLE
    from splitserve.edge import EdgeEncoder
    from splitserve.gateway.runtime import Job, Runtime

    truth = json.loads((SAMPLES / "truth.json").read_text())
    runtime = Runtime(PACKAGED_BUNDLE, PluginRegistry.discover(), tasks=["seg"])
    labels = runtime.head_configs["segmentation"]["labels"]
    edge = EdgeEncoder.from_bundle(PACKAGED_BUNDLE)
    for name in ("trouser.jpg", "bag.jpg", "coat.jpg"):
        photo = Image.open(SAMPLES / name).convert("RGB").resize((640, 480), Image.BILINEAR)
        payload, metas = runtime.parse_payload(edge.encode([photo]).data)
        [[answer]] = runtime.run([Job(plugins=list(runtime.plugins), payload=payload, metas=metas)])
        mask = full_mask(answer["segmentation"])
        assert mask.shape == (480, 640)
        [obj] = truth[name]["objects"]
        x1, y1, x2, y2 = (round(v * s) for v, s in zip(obj["box"], (10, 7.5, 10, 7.5)))
        hit = mask == labels.index(obj["class"])
        inside = int(hit[y1:y2, x1:x2].sum())
        assert inside >= 0.8 * hit.sum() and inside >= 0.5 * (y2 - y1) * (x2 - x1), name
