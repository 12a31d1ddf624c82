"""The device side without torch: `platform export`, the ONNX client's byte-identical payloads, and
a fresh virtual environment holding only the edge client that talks to a real gateway."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import venv
import warnings
from pathlib import Path

import numpy as np
import pytest

from splitserve.cli import main
from splitserve.edge import EdgeEncoder
from splitserve.gateway.process import GatewayProcess
from splitserve_edge.runtime import EdgeModel, EdgeModelError

from .conftest import jpeg_bytes, texture
from .helpers import informative_bundle

REPO = Path(__file__).resolve().parents[1]
PHOTOS = ("astronaut", "coffee", "chelsea")


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    return informative_bundle(tmp_path_factory.mktemp("edge") / "bundle", input_size=(96, 128),
                              tasks=["classification", "segmentation"])


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("photos")
    out = []
    for name in PHOTOS:
        p = root / f"{name}.jpg"
        p.write_bytes(jpeg_bytes(texture(name)))
        out.append(p)
    return out


@pytest.fixture(scope="module")
def onnx_dir(bundle, photos, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("export") / "onnx"
    with warnings.catch_warnings():  # PyTorch's TorchScript-based ONNX exporter is deprecated and says so
        warnings.simplefilter("error", DeprecationWarning)
        assert main(["export", "--bundle", str(bundle), "--format", "onnx", "--out", str(out),
                     "--images", *map(str, photos)]) == 0
    return out


def test_export_writes_portable_files_and_checks_latents(onnx_dir, bundle, capsys):
    meta = json.loads((onnx_dir / "edge.json").read_text())
    assert meta["encoder"]["format"] == "onnx" and (onnx_dir / "encoder.onnx").is_file()
    assert meta["fingerprint"] == json.loads((bundle / "manifest.json").read_text())["fingerprint"]
    assert sorted(p.name for p in onnx_dir.iterdir()) == ["coding.safetensors", "edge.json", "encoder.onnx"]


def test_the_onnx_graph_takes_any_batch_and_size(onnx_dir, bundle, tmp_path):
    """torch.export's graph, opset 20: batch, height and width stay symbolic, so one file encodes any
    image count at any size a preprocessing policy gives, as PyTorch's encoder does; RAC's GELU is
    ONNX's Gelu op, which ONNX Runtime runs as one kernel."""
    import onnx
    import onnxruntime as ort
    import torch

    from splitserve.bundle import load_codec
    from splitserve.export import write_encoder
    from splitserve.models import build_codec
    from splitserve.preprocess import Preprocessing

    model = onnx.load(str(onnx_dir / "encoder.onnx"))
    dims = [d.dim_param or d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["batch", 3, "height", "width"]
    assert {o.domain: o.version for o in model.opset_import}[""] == 20
    session = ort.InferenceSession(str(onnx_dir / "encoder.onnx"), providers=["CPUExecutionProvider"])
    encoder = load_codec(bundle).encoder
    for shape in ((1, 3, 96, 128), (3, 3, 64, 192)):
        x = torch.rand(*shape, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            expected = encoder(x).numpy()
        (latent,) = session.run(None, {"image": x.numpy()})
        assert latent.shape == expected.shape and np.abs(latent - expected).max() < 1e-4
    rac = build_codec("rac", feature_channels=64, blocks=8).eval()
    write_encoder(rac.encoder, "onnx", Preprocessing.fixed(64, 64, multiple=rac.input_multiple), tmp_path / "rac.onnx")
    ops = {node.op_type for node in onnx.load(str(tmp_path / "rac.onnx")).graph.node}
    assert "Gelu" in ops and "Erf" not in ops


def test_single_rate_export_is_what_it_was(onnx_dir, bundle, photos, tmp_path):
    """A single-rate bundle's export keeps edge format 1, payload format 2 and the coding-tables file
    of before rates existed, and an edge.json written then (no rates, no default_rate) still loads."""
    from splitserve.bundle import load_codec

    meta = json.loads((onnx_dir / "edge.json").read_text())
    assert meta["format_version"] == 1 and meta["payload_version"] == 2 and meta["default_rate"] == 0
    assert [r["index"] for r in meta["rates"]] == [0]
    assert (onnx_dir / "coding.safetensors").read_bytes() == load_codec(bundle).coding_tables().to_bytes()
    old = tmp_path / "old"
    old.mkdir()
    for f in onnx_dir.iterdir():
        (old / f.name).write_bytes(f.read_bytes())
    (old / "edge.json").write_text(json.dumps({k: v for k, v in meta.items() if k not in ("rates", "default_rate")}))
    model = EdgeModel.load(old, threads=1)
    assert model.rates == 1 and model.default_rate == 0
    assert model.encode([photos[0]]).data == EdgeEncoder.from_bundle(bundle).encode([photos[0]]).data
    (old / "edge.json").write_text(json.dumps({**meta, "format_version": 3}))
    with pytest.raises(EdgeModelError, match="version 3 is not supported .this client reads 1, 2"):
        EdgeModel.load(old)


def test_onnx_client_payload_is_byte_identical_to_the_pytorch_edge(onnx_dir, bundle, photos):
    model = EdgeModel.load(onnx_dir, threads=1)
    edge = EdgeEncoder.from_bundle(bundle)
    for photo in photos:
        x_torch, _ = edge.preprocess([photo])
        x_edge, _ = model.preprocess([photo])
        assert np.array_equal(x_torch.numpy(), x_edge)  # same preprocessing code, bit for bit
        y = edge.codec.quantize(x_torch)
        assert y.abs().sum() > 0  # an informative latent: a real comparison
        assert model.encode([photo]).data == edge.encode([photo]).data


def test_edge_model_refuses_bad_directories(onnx_dir, tmp_path):
    with pytest.raises(EdgeModelError, match="no edge.json"):
        EdgeModel.load(tmp_path)
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in onnx_dir.iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    (broken / "coding.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(EdgeModelError, match="sha256"):
        EdgeModel.load(broken)


@pytest.mark.parametrize("args,match", [
    (["--format", "tflite"], "invalid choice"),
    (["--format", "onnx", "--images", "/no/such.jpg"], "no such file"),
])
def test_export_bad_input_is_one_line(bundle, tmp_path, args, match, capsys):
    with pytest.raises(SystemExit) if "invalid choice" in match else _nullcontext():
        code = main(["export", "--bundle", str(bundle), "--out", str(tmp_path / "x"), *args])
        assert code == 2
    err = capsys.readouterr().err
    assert match in err and len(err.strip().splitlines()) <= 3


def _nullcontext():
    import contextlib

    return contextlib.nullcontext()


def test_export_refuses_a_bundle_without_an_encoder(bundle, tmp_path, capsys):
    import shutil

    broken = tmp_path / "b"
    shutil.copytree(bundle, broken)
    (broken / "encoder.safetensors").unlink()
    assert main(["export", "--bundle", str(broken), "--format", "onnx", "--out", str(tmp_path / "o")]) == 2
    assert "encoder" in capsys.readouterr().err


def test_pte_export_without_executorch_is_one_line(bundle, photos, tmp_path):
    """ExecuTorch is installed apart (docs/edge.md); where it is missing, --format pte says what to do."""
    probe = ("import sys; sys.modules['executorch'] = None; from splitserve.cli import main; "
             "sys.exit(main(sys.argv[1:]))")
    proc = subprocess.run([sys.executable, "-c", probe, "export", "--bundle", str(bundle), "--format", "pte",
                           "--out", str(tmp_path / "o"), "--images", str(photos[0])],
                          capture_output=True, text=True, timeout=300)
    err = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(err) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "needs ExecuTorch" in err[0] and "pip install --no-deps executorch==1.5.1" in err[0]


@pytest.mark.slow
def test_fresh_venv_with_only_the_edge_client_posts_to_a_real_gateway(onnx_dir, bundle, photos, tmp_path):
    """pip install ./platform/splitserve_edge into an empty venv: no torch there; its CLI encodes a
    photo and POSTs it; the gateway's answer equals the answer to the PyTorch edge's payload."""
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True, clear=True).create(env_dir)
    py = env_dir / "bin" / "python"
    import shutil

    source = tmp_path / "splitserve_edge"  # the build writes next to its sources: keep them out of the checkout
    shutil.copytree(REPO / "platform" / "splitserve_edge", source, ignore=shutil.ignore_patterns("build", "*.egg-info",
                                                                                                "__pycache__"))
    pip = subprocess.run([str(py), "-m", "pip", "install", "--quiet", "numpy<2", str(source)],
                         capture_output=True, text=True, timeout=600)
    assert pip.returncode == 0, pip.stderr[-3000:]
    clean = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    probe = subprocess.run([str(py), "-c", "import importlib.util as u; print([m for m in ('torch','torchvision',"
                            "'compressai') if u.find_spec(m)])"], capture_output=True, text=True, env=clean, cwd=tmp_path)
    assert probe.stdout.strip() == "[]", probe.stdout + probe.stderr
    size = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, env=clean).stdout.strip()
    installed_mb = sum(f.stat().st_size for f in Path(size).rglob("*") if f.is_file()) / 2**20
    assert installed_mb < 250, installed_mb  # ~210 MB with pip itself (docs/benchmarks.md), the full stack ~5.5 GB

    with GatewayProcess("--bundle", str(bundle), "--max-wait-ms", "0") as server:
        cli = env_dir / "bin" / "splitserve-edge"
        proc = subprocess.run([str(cli), "post", str(onnx_dir), str(photos[0]), "--url", server.url, "--tasks", "cls,seg",
                               "--threads", "1"], capture_output=True, text=True, env=clean, cwd=tmp_path, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        answer = json.loads(proc.stdout)
        import httpx

        reference = httpx.post(server.url + "/infer", params={"tasks": "cls,seg"},
                               content=EdgeEncoder.from_bundle(bundle).encode([photos[0]]).data,
                               headers={"Content-Type": "application/x-splitserve"}, timeout=60).json()
    assert answer["results"] == reference["results"] and answer["bytes_received"] == reference["bytes_received"]
    # bad input on the device: one line, exit 2
    bad = subprocess.run([str(cli), "encode", str(onnx_dir), str(tmp_path), "-o", str(tmp_path / "x.ssp")],
                         capture_output=True, text=True, env=clean, cwd=tmp_path)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1, bad.stderr
