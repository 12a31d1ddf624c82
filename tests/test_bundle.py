"""Bundle format: save → load gives identical outputs; anything corrupt is refused clearly."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from splitserve.bundle import EDGE_PARTS, load_codec, load_head, read_manifest, save_bundle, update_heads
from splitserve.errors import BundleError, SplitserveError
from splitserve.models import build_codec


@pytest.fixture
def saved(tmp_path):
    torch.manual_seed(0)
    codec = build_codec("rac", blocks=1, feature_channels=64).eval()
    head = nn.Sequential(nn.Conv2d(64, 8, 1), nn.BatchNorm2d(8)).eval()
    path = tmp_path / "b"
    save_bundle(path, codec, backbone="resnet18", input_size=(64, 96), heads={"toy": (head, {"k": 1})},
                head_metrics={"toy": {"top1": 12.5}})
    return path, codec, head


def test_save_load_identical_outputs(saved):
    path, codec, head = saved
    x = torch.randn(2, 3, 64, 96)
    loaded = load_codec(path)
    assert loaded.fingerprint() == codec.fingerprint() == read_manifest(path).fingerprint
    s1, hw1 = codec.compress(x)
    s2, hw2 = loaded.compress(x)
    assert s1 == s2 and hw1 == hw2  # the same bitstream
    h1 = codec.decode(codec.decompress(s1, hw1))
    h2 = loaded.decode(loaded.decompress(s1, hw1))
    assert torch.equal(h1, h2)
    head2 = load_head(path, "toy", nn.Sequential(nn.Conv2d(64, 8, 1), nn.BatchNorm2d(8)))
    assert torch.equal(head(h1), head2(h2))


def test_manifest_contents(saved):
    path, codec, _ = saved
    m = read_manifest(path)
    assert m.codec.family == "rac" and m.codec.config["blocks"] == 1
    assert m.backbone == "resnet18" and m.input_size == (64, 96)
    assert set(m.files) == {"encoder", "prior", "decoder"}
    assert m.tasks["toy"].config == {"k": 1} and m.tasks["toy"].metrics == {"top1": 12.5}
    assert m.files["encoder"].parameters == codec.parameter_counts()["encoder"]
    assert "created" in m.provenance and "splitserve_version" in m.provenance


def test_edge_load_drops_decoder(saved):
    path, codec, _ = saved
    edge = load_codec(path, parts=EDGE_PARTS)
    assert edge.decoder is None and edge.fingerprint() == codec.fingerprint()


def test_tampered_weights_are_refused(saved):
    path = saved[0]
    tensors = load_file(path / "encoder.safetensors")
    tensors["0.weight"][0, 0, 0, 0] += 1
    save_file(tensors, path / "encoder.safetensors")
    with pytest.raises(BundleError, match="encoder weights encoder.safetensors do not match the manifest"):
        load_codec(path)


def test_consistently_edited_bundle_fails_fingerprint(saved):
    """Weights and their hash edited together still cannot pass as the original encoder."""
    path = saved[0]
    tensors = load_file(path / "encoder.safetensors")
    tensors["0.weight"][0, 0, 0, 0] += 1
    save_file(tensors, path / "encoder.safetensors")
    import hashlib

    raw = json.loads((path / "manifest.json").read_text())
    raw["files"]["encoder"]["sha256"] = hashlib.sha256((path / "encoder.safetensors").read_bytes()).hexdigest()
    (path / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(BundleError, match="fingerprint"):
        load_codec(path)


@pytest.mark.parametrize(
    "mutate,message",
    [
        (lambda p: (p / "manifest.json").unlink(), "no manifest.json"),
        (lambda p: (p / "manifest.json").write_text("{not json"), "not valid JSON"),
        (lambda p: (p / "manifest.json").write_text('{"format": "other"}'), "not a splitserve bundle"),
        (lambda p: (p / "decoder.safetensors").unlink(), "decoder weights decoder.safetensors are missing"),
        (lambda p: (p / "prior.safetensors").write_bytes(b"\x00" * 10), "prior weights prior.safetensors do not match"),
    ],
)
def test_corrupt_bundles(saved, mutate, message):
    mutate(saved[0])
    with pytest.raises(BundleError, match=message):
        load_codec(saved[0])


def test_manifest_field_errors(saved):
    path = saved[0]
    raw = json.loads((path / "manifest.json").read_text())
    raw["files"]["encoder"]["sha256"] = "xyz"
    (path / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(BundleError, match=r"invalid manifest at files.encoder.sha256"):
        read_manifest(path)
    raw["format_version"] = 99
    (path / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(BundleError, match="version 99 is not supported"):
        read_manifest(path)


def test_architecture_mismatch_is_refused(saved):
    path = saved[0]
    raw = json.loads((path / "manifest.json").read_text())
    raw["codec"]["config"]["blocks"] = 2
    (path / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(BundleError, match="do not fit the manifest's architecture"):
        load_codec(path)


def test_path_escape_is_refused(saved):
    path = saved[0]
    raw = json.loads((path / "manifest.json").read_text())
    raw["files"]["decoder"]["path"] = "../../etc/passwd"
    (path / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(BundleError, match="escapes the bundle directory"):
        load_codec(path)


def test_missing_head(saved):
    with pytest.raises(BundleError, match=r"no 'detection' head \(it has: toy\)"):
        load_head(saved[0], "detection", nn.Identity())


def test_update_heads_keeps_fingerprint(saved):
    path, codec, _ = saved
    before = read_manifest(path).fingerprint
    update_heads(path, {"extra": (nn.Linear(3, 4), {"a": 2})}, head_metrics={"extra": {"m": 1.0}})
    m = read_manifest(path)
    assert m.fingerprint == before and set(m.tasks) == {"toy", "extra"}
    load_codec(path)
    assert load_head(path, "extra", nn.Linear(3, 4)) is not None


def test_bad_input_size_is_a_user_error(tmp_path):
    codec = build_codec("rac", blocks=0, feature_channels=64)
    with pytest.raises(SplitserveError, match="multiples of 8"):
        save_bundle(tmp_path / "b", codec, backbone="resnet18", input_size=(60, 64))


def test_failed_save_leaves_no_partial_bundle(tmp_path):
    class Broken(nn.Linear):
        def state_dict(self, *a, **k):
            raise RuntimeError("disk full")

    codec = build_codec("entropic_student", feature_channels=64)
    save_bundle(tmp_path / "b", codec, backbone="resnet18", input_size=(64, 64))
    before = read_manifest(tmp_path / "b").fingerprint
    with pytest.raises(RuntimeError, match="disk full"):
        save_bundle(tmp_path / "b", codec, backbone="resnet18", input_size=(64, 64),
                    heads={"x": (Broken(2, 2), {})})
    assert [p.name for p in tmp_path.iterdir()] == ["b"]  # no temp dir left behind
    assert read_manifest(tmp_path / "b").fingerprint == before  # old bundle intact
