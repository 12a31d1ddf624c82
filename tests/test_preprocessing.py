"""The bundle declares how an image becomes the model input; edge, gateway and training all apply it.

Each policy is checked for its geometry on known sizes, for identical inputs on the edge and the
gateway's full-offloading path, for a payload that round-trips edge → gateway, and for the
gateway accepting exactly the latent shapes the policy produces.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from splitserve.bundle import BundleError, read_manifest, save_bundle, upgrade_bundle
from splitserve.edge import EdgeEncoder
from splitserve.errors import PayloadError, SplitserveError
from splitserve.gateway.runtime import Job, Runtime
from splitserve.models import build_codec
from splitserve_edge.payload import Payload
from splitserve.plugins import PluginRegistry
from splitserve.preprocess import Preprocessing, PreprocessingError

from .conftest import jpeg_bytes, texture

POLICIES = {
    "fixed": Preprocessing.fixed(64, 96, multiple=4),
    "resize_crop": Preprocessing.resize_crop(72, (64, 64), multiple=4),
    "shorter_side": Preprocessing.shorter_side(64, 112, multiple=4),
}


def test_fixed_policy_squashes():
    p = POLICIES["fixed"]
    assert p.input_size(480, 640) == (64, 96) and p.input_size(10, 10) == (64, 96)
    assert p.apply(Image.new("RGB", (640, 480))).shape == (3, 64, 96)


def test_resize_crop_policy_is_imagenet_protocol():
    p = Preprocessing.resize_crop(256, (224, 224))
    assert p.resized_size(375, 500) == (256, 341)  # torchvision Resize(256): longer side truncated
    assert p.input_size(375, 500) == (224, 224)
    img = Image.fromarray(np.arange(375 * 500 * 3, dtype=np.uint32).reshape(375, 500, 3).astype(np.uint8))
    x = p.apply(img)
    ref = img.resize((341, 256), Image.BILINEAR).crop((58, 16, 58 + 224, 16 + 224))  # round((341-224)/2)=58
    ref = (np.asarray(ref, dtype=np.float32).transpose(2, 0, 1) / 255 - np.array([0.485, 0.456, 0.406], np.float32)[:, None, None]) \
        / np.array([0.229, 0.224, 0.225], np.float32)[:, None, None]
    np.testing.assert_allclose(x, ref, rtol=1e-6, atol=1e-6)
    assert not p.keeps_geometry


def test_shorter_side_policy_keeps_aspect_caps_longer_side_and_rounds():
    p = Preprocessing.shorter_side(800, 1333, multiple=8)
    assert p.input_size(480, 640) == (800, 1064)  # 640*800/480 = 1066.7 -> nearest multiple of 8
    assert p.input_size(100, 1000) == (136, 1328)  # longer side capped at 1333 -> 1328 (multiple of 8)
    assert p.input_size(640, 480) == (1064, 800)
    assert all(s % 8 == 0 for s in p.input_size(333, 517))


@pytest.mark.parametrize("spec,expected", [
    ("fixed:64", Preprocessing.fixed(64, 64, 4)),
    ("fixed:64x96", Preprocessing.fixed(64, 96, 4)),
    ("resize-crop:256:224", Preprocessing.resize_crop(256, (224, 224), 4)),
    ("shorter-side:800:1333", Preprocessing.shorter_side(800, 1333, 4)),
])
def test_spec_parsing(spec, expected):
    assert Preprocessing.from_spec(spec, 4) == expected
    assert Preprocessing.from_dict(expected.to_dict()) == expected


@pytest.mark.parametrize("bad", ["", "fixed", "fixed:0", "crop:1:2", "shorter-side:800", "resize-crop:100:224",
                                 "fixed:62"])
def test_bad_specs_are_clear_errors(bad):
    with pytest.raises(PreprocessingError):
        Preprocessing.from_spec(bad, 4)


@pytest.mark.parametrize("bad", [{"kind": "squash", "size": [4, 4]}, {"kind": "fixed"}, {"kind": "fixed", "size": [64, 64], "x": 1},
                                 {"kind": "shorter_side", "shorter": 100, "max_longer": 50}, [1, 2]])
def test_bad_declarations_rejected(bad):
    with pytest.raises(PreprocessingError):
        Preprocessing.from_dict(bad)


@pytest.fixture(scope="module")
def policy_bundles(tmp_path_factory):
    from splitserve.defaults import FMNIST_LABELS

    registry = PluginRegistry.discover()
    out = {}
    for name, policy in POLICIES.items():
        torch.manual_seed(0)
        codec = build_codec("entropic_student", feature_channels=64).eval()
        tasks = ["classification"] if name == "resize_crop" else ["classification", "segmentation"]
        heads = {}
        for t in tasks:
            plugin = registry.get(t)
            cfg = plugin.resolve_config("resnet18", plugin.config_for_classes(FMNIST_LABELS))
            heads[t] = (plugin.build_head("resnet18", cfg).eval(), cfg)
        path = tmp_path_factory.mktemp(name) / "bundle"
        save_bundle(path, codec, backbone="resnet18", preprocessing=policy, heads=heads)
        out[name] = path
    return out


@pytest.mark.parametrize("name", list(POLICIES))
def test_policy_round_trips_edge_to_gateway(policy_bundles, name):
    path = policy_bundles[name]
    manifest = read_manifest(path)
    assert manifest.policy == POLICIES[name]
    edge = EdgeEncoder.from_bundle(path)
    runtime = Runtime(path, PluginRegistry.discover())
    photo = texture("brick", (150, 110))  # 110 high, 150 wide: every policy changes its geometry
    jpeg = jpeg_bytes(photo)

    # the edge's model input and the gateway's full-offloading input are the same tensor
    x_edge, sizes = edge.preprocess([jpeg])
    x_gateway, metas = runtime.preprocess_image(jpeg)
    assert sizes == [(110, 150)]
    assert torch.equal(x_edge, x_gateway)
    assert tuple(x_edge.shape[-2:]) == POLICIES[name].input_size(110, 150) == metas[0].input_size

    # the payload round-trips: the gateway accepts its shape and decodes the edge's exact latent
    encoded = edge.encode([jpeg])
    payload, pmetas = runtime.parse_payload(encoded.data)
    assert pmetas[0].input_size == metas[0].input_size and pmetas[0].original_size == (110, 150)
    c, h, w = payload.latent_shape
    y = runtime.codec.decompress(list(payload.strings), (h, w))
    assert torch.equal(y, edge.codec.quantize(x_edge))
    # answers through the payload equal answers through full offloading (same features)
    plugins = list(runtime.plugins)
    via_payload = runtime.run([Job(plugins=plugins, payload=payload, metas=pmetas)])[0][0]
    via_image = runtime.run([Job(plugins=plugins, pixels=x_gateway, metas=metas)])[0][0]
    assert via_payload["classification"] == via_image["classification"]


def _forge(payload: Payload, latent=None, sizes=None) -> bytes:
    return Payload(payload.fingerprint, latent or payload.latent_shape, sizes or payload.original_sizes,
                   payload.strings).to_bytes()


@pytest.mark.parametrize("name", list(POLICIES))
def test_gateway_accepts_only_shapes_the_policy_makes(policy_bundles, name):
    path = policy_bundles[name]
    edge = EdgeEncoder.from_bundle(path)
    runtime = Runtime(path, PluginRegistry.discover())
    payload = edge.encode([texture("grass", (150, 110))]).payload
    c, h, w = payload.latent_shape
    runtime.parse_payload(payload.to_bytes())  # the real one is fine
    for lh, lw in [(h + 1, w), (h, w - 1), (1024, 1024), (4 * h, 4 * w)]:
        with pytest.raises(PayloadError, match="preprocessing"):
            runtime.parse_payload(_forge(payload, latent=(c, lh, lw)))
    if POLICIES[name].kind == "shorter_side":
        # another aspect ratio gives another shape: the declared size must match the latent
        with pytest.raises(PayloadError, match="preprocessing"):
            runtime.parse_payload(_forge(payload, sizes=((110, 400),)))
        # a huge declared image still maps to the capped input, never to a bigger latent
        assert POLICIES[name].input_size(60000, 60000) == (64, 64)
        assert POLICIES[name].input_size(10, 60000) == (8, 112)


def test_edge_refuses_mixed_input_sizes_in_one_payload(policy_bundles):
    edge = EdgeEncoder.from_bundle(policy_bundles["shorter_side"])
    with pytest.raises(SplitserveError, match="separate payloads"):
        edge.encode([texture("brick", (150, 110)), texture("brick", (110, 150))])


def test_crop_policy_refused_for_detection_data(tmp_path):
    from splitserve.data.transforms import detection_transform

    with pytest.raises(SplitserveError, match="crops"):
        detection_transform(False, POLICIES["resize_crop"])


def test_version1_bundles_refused_with_upgrade_hint_and_converted(policy_bundles, tmp_path):
    import json
    import shutil

    # a v1 RAC bundle: same weights, no preprocessing declaration
    torch.manual_seed(0)
    codec = build_codec("rac", blocks=0, feature_channels=64).eval()
    path = tmp_path / "rac"
    save_bundle(path, codec, backbone="resnet18", input_size=(64, 64))
    raw = json.loads((path / "manifest.json").read_text())
    raw["format_version"] = 1
    raw.pop("preprocessing")
    (path / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(BundleError, match=r"platform bundle upgrade"):
        read_manifest(path)
    manifest = upgrade_bundle(path)
    assert manifest.policy == Preprocessing.fixed(64, 64, multiple=8)
    EdgeEncoder.from_bundle(path)  # loads and verifies
    # v1 Entropic Student used full GDN: refused with the reason, not converted
    es = tmp_path / "es"
    shutil.copytree(policy_bundles["fixed"], es)
    raw = json.loads((es / "manifest.json").read_text())
    raw["format_version"] = 1
    (es / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(BundleError, match="simplified GDN"):
        upgrade_bundle(es)
