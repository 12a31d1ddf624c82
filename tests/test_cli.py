"""The `platform` command as users run it: real processes, one-line errors, non-zero exits."""

import subprocess
import sys

import pytest
import torch

from splitserve.cli import main
from splitserve.edge import EdgeEncoder
from splitserve.bundle import read_manifest
from splitserve_edge.payload import Payload, bits_per_pixel, bytes_per_image

from .conftest import jpeg_bytes, texture


def platform(*args, env=None):
    return subprocess.run([sys.executable, "-m", "splitserve", *args], capture_output=True, text=True,
                          timeout=300, env=env)


def _commands() -> dict[str, str]:
    """Every subcommand of the real parser, with its one-line summary (new commands included)."""
    import argparse

    from splitserve.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return {c.dest: c.help for c in sub._choices_actions}


def test_help_lists_every_command(capsys):
    commands = _commands()
    assert {"serve", "infer", "encode", "export", "bundle", "tasks", "data", "teacher", "distill", "finetune",
            "train", "evaluate", "bench", "ray"} <= set(commands)
    proc = platform("--help")
    assert proc.returncode == 0
    for cmd, summary in commands.items():
        assert f"    {cmd}" in proc.stdout and summary.split()[0] in proc.stdout, cmd
        with pytest.raises(SystemExit) as exit_:
            main([cmd, "--help"])
        assert exit_.value.code == 0, cmd
        assert "usage: platform " + cmd in capsys.readouterr().out


def test_encode_jpeg_of_any_size(bundle_dir, photo_jpeg, tmp_path, capsys):
    out = tmp_path / "p.ssp"
    big = tmp_path / "big.jpg"
    big.write_bytes(jpeg_bytes(texture("astronaut", (1031, 677))))
    assert main(["encode", str(photo_jpeg), str(big), "--bundle", str(bundle_dir), "-o", str(out)]) == 0
    text = capsys.readouterr().out
    payload = Payload.from_bytes(out.read_bytes())
    assert payload.num_images == 2 and payload.original_sizes == ((217, 333), (677, 1031))
    assert f"wrote {out}: {len(out.read_bytes())} bytes" in text
    # bpp is over the model input's pixels (the bundle's fixed input size), from the payload's real byte length
    ih, iw = read_manifest(bundle_dir).input_size
    assert (ih, iw) != (217, 333)
    per_image = bytes_per_image(payload)
    bpp = [bits_per_pixel(8 * b, 1, (ih, iw)) for b in per_image]
    assert f"{bpp[0]:.4f}" in text and f"{bpp[1]:.4f}" in text and f"{iw}x{ih}" in text
    assert 8 * sum(per_image) == pytest.approx(8 * len(out.read_bytes()))


def test_encoded_file_decodes_to_the_edge_latent(bundle_dir, photo_jpeg, tmp_path):
    out = tmp_path / "p.ssp"
    assert main(["encode", str(photo_jpeg), "--bundle", str(bundle_dir), "-o", str(out)]) == 0
    from splitserve.bundle import load_codec

    edge = EdgeEncoder.from_bundle(bundle_dir)
    x, _ = edge.preprocess([photo_jpeg])
    server = load_codec(bundle_dir)
    payload = Payload.from_bytes(out.read_bytes())
    payload.check_fingerprint(server.fingerprint())
    y = server.decompress(list(payload.strings), payload.latent_shape[1:])
    assert torch.equal(y, edge.codec.quantize(x))


@pytest.mark.parametrize("kind", ["missing", "text", "truncated"])
def test_encode_bad_input_is_one_line(bundle_dir, photo_jpeg, tmp_path, kind):
    bad = tmp_path / "bad.jpg"
    if kind == "text":
        bad.write_text("hello, I am not a JPEG\n")
    elif kind == "truncated":
        bad.write_bytes(photo_jpeg.read_bytes()[:40])
    proc = platform("encode", str(bad), "--bundle", str(bundle_dir), "-o", str(tmp_path / "o"))
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and str(bad) in lines[0] and "Traceback" not in proc.stderr
    assert ("no such file" if kind == "missing" else "not a readable image") in lines[0]
    assert not (tmp_path / "o").exists()


def test_bundle_inspect(bundle_dir):
    proc = platform("bundle", "inspect", str(bundle_dir))
    assert proc.returncode == 0, proc.stderr
    from splitserve.bundle import read_manifest

    m = read_manifest(bundle_dir)
    assert m.fingerprint in proc.stdout
    assert "device side" in proc.stdout and "server side" in proc.stdout
    assert "138,672" in proc.stdout  # Entropic Student encoder parameters
    for task in ("classification", "detection", "segmentation"):
        assert task in proc.stdout


def test_bundle_inspect_corrupt(bundle_dir, tmp_path):
    import shutil

    copy = tmp_path / "b"
    shutil.copytree(bundle_dir, copy)
    (copy / "encoder.safetensors").write_bytes(b"garbage")
    proc = platform("bundle", "inspect", str(copy))
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    assert "do not match the manifest" in proc.stderr


def test_bundle_init_rac(tmp_path):
    assert main(["bundle", "init", str(tmp_path / "r"), "--encoder", "rac", "--blocks", "0", "--tasks", "cls",
                 "--input-size", "64", "64"]) == 0
    from splitserve.bundle import read_manifest

    m = read_manifest(tmp_path / "r")
    assert m.codec.config["blocks"] == 0 and list(m.tasks) == ["classification"]


def test_tasks_command():
    proc = platform("tasks")
    assert proc.returncode == 0
    for line in ("classification", "detection", "segmentation", "splitserve_tasks.detection:DetectionPlugin"):
        assert line in proc.stdout


def test_infer_command(server, bundle_dir, photo_jpeg):
    proc = platform("infer", str(photo_jpeg), "--tasks", "cls,det,seg", "--url", server.url, "--bundle", str(bundle_dir))
    assert proc.returncode == 0, proc.stderr
    assert "classification:" in proc.stdout and "detection:" in proc.stdout and "segmentation:" in proc.stdout
    proc = platform("infer", str(photo_jpeg), "--tasks", "cls", "--url", server.url, "--offload", "--json")
    assert proc.returncode == 0, proc.stderr
    import json

    assert json.loads(proc.stdout)["input"] == "image"


def test_infer_against_other_encoder_is_refused(server, other_bundle_dir, photo_jpeg):
    proc = platform("infer", str(photo_jpeg), "--url", server.url, "--bundle", str(other_bundle_dir))
    assert proc.returncode == 2 and "differs from the local bundle" in proc.stderr


def test_infer_unreachable_server(bundle_dir, photo_jpeg):
    proc = platform("infer", str(photo_jpeg), "--url", "http://127.0.0.1:9", "--bundle", str(bundle_dir))
    assert proc.returncode == 2 and "cannot reach" in proc.stderr and "Traceback" not in proc.stderr
