"""`platform bundle pack`: server-side weights in float16, the device side and its bitstreams exact
(or, asked for, the encoder in float16 too: a new, verified code)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from splitserve.bundle import read_manifest
from splitserve.cli import main
from splitserve.edge import EdgeEncoder
from splitserve.gateway.runtime import Job, Runtime
from splitserve.plugins import PluginRegistry

from .conftest import texture


def _classify(runtime: Runtime, data: bytes):
    """The classification answer the gateway runtime gives one payload."""
    payload, metas = runtime.parse_payload(data)
    return runtime.run([Job(plugins=list(runtime.plugins), payload=payload, metas=metas)])[0][0]["classification"]


def _runtime(bundle) -> Runtime:
    return Runtime(bundle, PluginRegistry.discover(), tasks=["classification"])


def test_pack_halves_server_weights_and_keeps_the_code(bundle_dir, tmp_path, capsys):
    out = tmp_path / "packed"
    assert main(["bundle", "pack", str(bundle_dir), str(out)]) == 0
    assert "fingerprint" in capsys.readouterr().out
    src, dst = read_manifest(bundle_dir), read_manifest(out)
    assert dst.fingerprint == src.fingerprint
    for part in ("encoder", "prior"):
        assert dst.files[part].sha256 == src.files[part].sha256  # the device side is untouched
    dec = load_file(str(out / dst.files["decoder"].path))
    assert {t.dtype for t in dec.values() if t.is_floating_point()} == {torch.float16}
    size = lambda b: sum(f.stat().st_size for f in b.rglob("*.safetensors"))  # noqa: E731
    assert size(out) < 0.6 * size(bundle_dir)
    # same payload, near-identical answers
    image = texture("coffee", (90, 70))
    data = EdgeEncoder.from_bundle(bundle_dir).encode([image]).data
    assert EdgeEncoder.from_bundle(out).encode([image]).data == data
    answers = [_classify(_runtime(b), data) for b in (bundle_dir, out)]
    assert [t.index for t in answers[0].top] == [t.index for t in answers[1].top]
    assert abs(answers[0].top[0].probability - answers[1].top[0].probability) < 1e-2


def test_pack_copies_only_what_the_manifest_lists(bundle_dir, tmp_path):
    import shutil

    src = tmp_path / "src"
    shutil.copytree(bundle_dir, src)
    (src / ".done").write_text("")  # a training script's marker, a run directory: not bundle files
    (src / "x.runs" / "distill").mkdir(parents=True)
    (src / "x.runs" / "distill" / "metrics.jsonl").write_text("{}\n")
    out = tmp_path / "packed"
    assert main(["bundle", "pack", str(src), str(out)]) == 0
    manifest = read_manifest(out)
    listed = {e.path for e in manifest.files.values()} | {t.file.path for t in manifest.tasks.values()}
    assert {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()} == listed | {"manifest.json"}
    assert {oct(p.stat().st_mode & 0o777) for p in [out, *out.rglob("*")]} <= {"0o755", "0o644"}  # readable by a server user


def test_an_fp16_encoder_is_a_new_code_that_verifies(bundle_dir, tmp_path, capsys):
    """--fp16-encoder: the encoder file is float16, the fingerprint is that of the rounded weights
    (the packed bundle loads and verifies), a payload of the float32 encoder is refused as another
    encoder's, and the packed bundle's own payloads decode to near-identical answers."""
    from splitserve_edge.errors import FingerprintMismatch

    from splitserve.bundle import load_codec

    out = tmp_path / "packed"
    assert main(["bundle", "pack", str(bundle_dir), str(out), "--fp16-encoder"]) == 0
    assert "new: measure it again" in capsys.readouterr().out
    src, dst = read_manifest(bundle_dir), read_manifest(out)
    assert dst.fingerprint != src.fingerprint
    assert dst.files["prior"].sha256 == src.files["prior"].sha256  # coding tables exact
    enc = load_file(str(out / dst.files["encoder"].path))
    assert {t.dtype for t in enc.values() if t.is_floating_point()} == {torch.float16}
    assert load_codec(out).fingerprint() == dst.fingerprint
    size = lambda b, part: (b / read_manifest(b).files[part].path).stat().st_size  # noqa: E731
    assert size(out, "encoder") < 0.55 * size(bundle_dir, "encoder")
    image = texture("coffee", (90, 70))
    old = EdgeEncoder.from_bundle(bundle_dir).encode([image]).data
    new = EdgeEncoder.from_bundle(out).encode([image]).data
    packed = _runtime(out)
    with pytest.raises(FingerprintMismatch):
        packed.parse_payload(old)
    answers = [_classify(_runtime(bundle_dir), old), _classify(packed, new)]
    assert answers[0].top[0].index == answers[1].top[0].index
    assert abs(answers[0].top[0].probability - answers[1].top[0].probability) < 2e-2


def test_pack_sets_the_default_rate_and_drops_the_metrics_measured_at_the_old_one(vr_bundle_dir, tmp_path, capsys):
    """--default-rate K: the copy's devices code at rate K unless they choose; its code is the same;
    the metrics of the old default are gone (to be measured again); a K outside the rates is one line."""
    import json
    import shutil

    vr = tmp_path / "vr"
    shutil.copytree(vr_bundle_dir, vr)
    raw = json.loads((vr / "manifest.json").read_text())
    raw["default_rate"], raw["metrics"] = 2, {"bytes": 120.0}
    raw["tasks"]["classification"]["metrics"] = {"top1": 50.0}
    (vr / "manifest.json").write_text(json.dumps(raw))
    src = read_manifest(vr)
    out = tmp_path / "packed"
    assert main(["bundle", "pack", str(vr), str(out), "--default-rate", "1"]) == 0
    assert "default rate 1" in capsys.readouterr().out
    dst = read_manifest(out)
    assert (dst.default_rate, dst.fingerprint) == (1, src.fingerprint)
    assert dst.metrics == {} and all(t.metrics == {} for t in dst.tasks.values())
    image = texture("coffee", (64, 64))
    assert EdgeEncoder.from_bundle(out).encode([image]).rates == (1,)
    assert EdgeEncoder.from_bundle(vr).encode([image]).rates == (2,)
    assert main(["bundle", "pack", str(vr), str(tmp_path / "same"), "--default-rate", "2"]) == 0
    assert read_manifest(tmp_path / "same").tasks["classification"].metrics == {"top1": 50.0}  # still true

    assert main(["bundle", "pack", str(vr), str(tmp_path / "bad"), "--default-rate", "4"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--default-rate 4 is outside the bundle's rates 0..3" in err
    assert not (tmp_path / "bad").exists()


@pytest.fixture(scope="module")
def shared_bundle(bundle_dir, tmp_path_factory):
    """``bundle_dir`` with classification and detection on one shared trunk (the classification
    head's layer2..4) and segmentation on its own: both ways a head is stored."""
    from splitserve.bundle import load_codec, save_bundle

    from .helpers import bundle_heads

    manifest = read_manifest(bundle_dir)
    heads = bundle_heads(bundle_dir)
    out = tmp_path_factory.mktemp("pack") / "shared"
    save_bundle(out, load_codec(bundle_dir, manifest=manifest), backbone=manifest.backbone,
                preprocessing=manifest.policy, heads=heads, trunk=heads["classification"][0].tail,
                shared_tasks=["classification", "detection"])
    return out


def test_int8_stores_trunk_and_heads_in_a_quarter_and_loads_them_within_half_a_step(shared_bundle, tmp_path, capsys):
    """--int8: the trunk's and heads' conv/linear weights are int8 with a float32 scale per output
    channel, the rest float16, the device side exact; loading gives every weight back within half
    its channel's step, and the answers stay those of the float32 bundle."""
    from splitserve import int8
    from splitserve.bundle import load_trunk

    out = tmp_path / "int8"
    assert main(["bundle", "pack", str(shared_bundle), str(out), "--int8"]) == 0
    assert "(unchanged)" in capsys.readouterr().out
    src, dst = read_manifest(shared_bundle), read_manifest(out)
    assert dst.fingerprint == src.fingerprint
    assert [dst.files[p].sha256 for p in ("encoder", "prior")] == [src.files[p].sha256 for p in ("encoder", "prior")]
    assert {k: e.storage for k, e in dst.files.items()} == {"encoder": "float", "prior": "float", "decoder": "float",
                                                            "trunk": "int8"}
    assert {t.file.storage for t in dst.tasks.values()} == {"int8"}
    assert main(["bundle", "inspect", str(out)]) == 0
    assert "stored int8  trunk, classification head, detection head, segmentation head" in capsys.readouterr().out
    stored = load_file(str(out / dst.files["trunk"].path))
    weights = [k for k in stored if k.endswith(".weight") and stored[k].dim() >= 2]
    assert weights and all(stored[k].dtype == torch.int8 for k in weights)
    assert {stored[k + int8.SCALE_SUFFIX].dtype for k in weights} == {torch.float32}
    assert all((stored[k].flatten(1).abs().amax(1) == 127).all() for k in weights)  # each channel's full range
    assert {t.dtype for k, t in stored.items() if t.is_floating_point() and not k.endswith(int8.SCALE_SUFFIX)} \
        == {torch.float16}
    size = lambda b, rel: (b / rel).stat().st_size  # noqa: E731
    assert size(out, dst.files["trunk"].path) < 0.27 * size(shared_bundle, src.files["trunk"].path)
    for task in dst.tasks.values():
        assert size(out, task.file.path) < 0.3 * size(shared_bundle, task.file.path)

    before, after = load_trunk(shared_bundle).tail.state_dict(), load_trunk(out).tail.state_dict()
    for name in weights:
        w, step = before[name], stored[name + int8.SCALE_SUFFIX].view(-1, *[1] * (before[name].dim() - 1))
        assert after[name].dtype == torch.float32
        assert ((after[name] - w).abs() <= step / 2 + 1e-6).all(), name
        assert not torch.equal(after[name], w)  # rounded, not copied
    image = texture("coffee", (90, 70))
    data = EdgeEncoder.from_bundle(shared_bundle).encode([image]).data
    assert EdgeEncoder.from_bundle(out).encode([image]).data == data
    answers = [_classify(_runtime(b), data) for b in (shared_bundle, out)]
    assert [t.index for t in answers[0].top] == [t.index for t in answers[1].top]
    assert [t.probability for t in answers[1].top] == pytest.approx([t.probability for t in answers[0].top], abs=1e-2)

    again = tmp_path / "again"  # packing a packed bundle keeps int8 as int8 (not int8 read as float)
    assert main(["bundle", "pack", str(out), str(again), "--int8"]) == 0
    assert torch.equal(load_trunk(again).tail.state_dict()[weights[0]], after[weights[0]])


@pytest.fixture(scope="module")
def int8_bundle(shared_bundle, tmp_path_factory):
    out = tmp_path_factory.mktemp("pack") / "int8"
    assert main(["bundle", "pack", str(shared_bundle), str(out), "--int8"]) == 0
    return out


@pytest.mark.parametrize("forge, reason", [
    (lambda t, k: t.pop(k + ".int8_scale"), "has no scale"),
    (lambda t, k: t.__setitem__(k + ".int8_scale", t[k + ".int8_scale"][1:]), "do not fit"),
    (lambda t, k: t.__setitem__(k + ".int8_scale", t[k + ".int8_scale"].double()), "do not fit"),
    (lambda t, k: t.__setitem__(k + ".int8_scale", torch.full_like(t[k + ".int8_scale"], float("nan"))),
     "not finite"),
    (lambda t, k: t.__setitem__(k, t[k].float()), "not int8"),
    (lambda t, k: t.__setitem__("ghost.int8_scale", torch.ones(3)), "has no int8 weight"),
], ids=["no scale", "short scale", "float64 scale", "nan scale", "float weight", "stray scale"])
def test_forged_int8_storage_is_refused_with_its_reason(int8_bundle, tmp_path, forge, reason):
    """A bundle from elsewhere whose int8 file does not fit its scales is a BundleError, not a
    trunk of garbage weights (the file's hash in the manifest is the forger's own)."""
    import hashlib
    import shutil

    from safetensors.torch import save_file

    from splitserve.bundle import load_trunk, write_manifest
    from splitserve.errors import BundleError

    out = tmp_path / "int8"
    shutil.copytree(int8_bundle, out)
    manifest = read_manifest(out)
    path = out / manifest.files["trunk"].path
    tensors = load_file(str(path))
    key = next(k for k in tensors if k.endswith(".weight") and tensors[k].dtype == torch.int8)
    forge(tensors, key)
    save_file(tensors, str(path))
    manifest.files["trunk"].sha256 = hashlib.sha256(path.read_bytes()).hexdigest()
    write_manifest(out, manifest)
    with pytest.raises(BundleError, match=f"trunk weights trunk.safetensors are not valid int8 storage: .*{reason}"):
        load_trunk(out)
