"""`platform export --format pte`: torch.export → ExecuTorch (XNNPACK), checked against PyTorch as the
ONNX export is: the same rounded latent and byte-identical payloads on real photos."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("executorch", reason="ExecuTorch is installed apart (docs/edge.md): pip cannot resolve it "
                                         "beside numpy<2")

from splitserve.bundle import load_codec, read_manifest, save_bundle  # noqa: E402
from splitserve.cli import main  # noqa: E402
from splitserve.edge import EdgeEncoder  # noqa: E402
from splitserve.errors import SplitserveError  # noqa: E402
from splitserve.export import load_export  # noqa: E402
from splitserve.preprocess import Preprocessing  # noqa: E402
from splitserve_edge.runtime import EdgeModel, EdgeModelError  # noqa: E402

from .conftest import texture  # noqa: E402
from .test_edge_client import PHOTOS, bundle, photos  # noqa: E402, F401 — the same bundle and photos as ONNX


def export(bundle: Path, out: Path, photos: list[Path], capsys) -> str:
    assert main(["export", "--bundle", str(bundle), "--format", "pte", "--out", str(out),
                 "--images", *map(str, photos)]) == 0
    return capsys.readouterr().out


def assert_same_payloads(pte_dir: Path, bundle: Path, batches: list[list[Path]]) -> None:
    """Each batch's payload is byte for byte the PyTorch edge's, from an informative latent."""
    model, edge = load_export(pte_dir, threads=1), EdgeEncoder.from_bundle(bundle)
    for batch in batches:
        assert model.encode(batch).data == edge.encode(batch).data
    x, _ = edge.preprocess([batches[0][0]])
    assert edge.codec.quantize(x).abs().sum() > 0


def test_pte_export_equals_pytorch(bundle, photos, tmp_path, capsys):
    text = export(bundle, tmp_path / "pte", photos, capsys)
    assert "checked on 3 images: 0 of" in text and "3 of 3 payloads byte-identical" in text
    meta = json.loads((tmp_path / "pte" / "edge.json").read_text())
    pte = tmp_path / "pte" / "encoder.pte"
    assert meta["encoder"] == {"path": "encoder.pte", "format": "pte", "sha256": hashlib.sha256(pte.read_bytes()).hexdigest()}
    assert meta["fingerprint"] == read_manifest(bundle).fingerprint
    # the rounded latent, symbol for symbol
    model, edge = load_export(tmp_path / "pte"), EdgeEncoder.from_bundle(bundle)
    x, _ = edge.preprocess(photos)
    symbols = model.coder.symbols(model.latents(x.numpy()))
    assert np.array_equal(symbols, model.coder.symbols(edge.codec.encoder(x).detach().numpy()))
    assert_same_payloads(tmp_path / "pte", bundle, [photos, *([p] for p in photos)])  # one payload for all, one each
    with pytest.raises(SplitserveError, match="refused a 64x64 input"):  # the size it was exported for, only
        model.latents(np.zeros((1, 3, 64, 64), np.float32))
    # the torch-free client runs ONNX only, and says where a .pte runs
    with pytest.raises(EdgeModelError, match="this one is 'pte'.*ExecuTorch"):
        EdgeModel.load(tmp_path / "pte")


def test_pte_export_takes_every_size_a_shorter_side_policy_makes(bundle, photos, tmp_path, capsys):
    """Under ``shorter_side`` the input size follows each photo's aspect ratio: one .pte takes them all."""
    manifest = read_manifest(bundle)
    codec = load_codec(bundle, manifest=manifest)
    policy = Preprocessing.shorter_side(64, 112, codec.input_multiple)
    sized = tmp_path / "shorter-side"
    save_bundle(sized, codec, backbone=manifest.backbone, preprocessing=policy, heads={})
    sizes = {policy.input_size(*texture(name).size[::-1]) for name in PHOTOS}
    assert len(sizes) == 2  # a square photo and two wide ones
    text = export(sized, tmp_path / "pte", photos, capsys)
    assert "checked on 3 images: 0 of" in text and "3 of 3 payloads byte-identical" in text
    assert_same_payloads(tmp_path / "pte", sized, [[p] for p in photos])


def test_pte_export_of_a_variable_rate_bundle_equals_pytorch_at_every_rate(vr_bundle_dir, photos, tmp_path, capsys):
    """One rate-free .pte serves every rate: the check runs at each, and every payload whose rounded
    latent agrees with PyTorch's is the PyTorch edge's byte for byte. XNNPACK's floats differ from
    PyTorch's by a few ulps, so an element within that distance of a .5 boundary may round the
    other way (docs/edge.md); with four gains per latent a few such flips show here."""
    text = export(vr_bundle_dir, tmp_path / "pte", photos, capsys)
    flips = int(re.search(r"at each of 4 rates: (\d+) of 64,800 rounded", text).group(1))
    identical = int(re.search(r"(\d+) of 12 payloads byte-identical", text).group(1))
    assert flips <= 4 and identical >= 12 - flips  # a handful of elements in 64,800, not a systematic difference
    model, edge = load_export(tmp_path / "pte", threads=1), EdgeEncoder.from_bundle(vr_bundle_dir)
    assert model.rates == edge.rates == 4
    agree = 0
    for photo in photos:
        x, _ = edge.preprocess([photo])
        ours, theirs = model.latents(x.numpy()), edge.codec.encoder(x).detach().numpy()
        for rate in range(4):
            same = np.array_equal(model.coder.symbols(ours, rate), model.coder.symbols(theirs, rate))
            assert (model.encode([photo], rate=rate).data == edge.encode([photo], rate=rate).data) == same
            agree += same
    assert agree == identical  # the export's own check counts the same
