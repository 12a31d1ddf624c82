"""Training survives SIGKILL: a tiny `platform train-image-codec` run (it goes through the same loop
and checkpoints as every training command) is killed at several points, inside a checkpoint write
included, resumed with --resume, and must end with exactly the weights of an uninterrupted run.

The kills inside a write are deterministic: the child runs the real command with os.write,
os.fsync and os.replace wrapped to count the checkpoint's calls (they still make them) and to
SIGKILL the process at the chosen one. One more kill comes from outside, at whatever the run is
doing when it has logged a few steps. One `platform teacher` run (ResNet-18, the hours-long kind)
is killed inside a write of its 90 MB checkpoint.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from splitserve.training.checkpoint import content_digest

from .conftest import texture

pytestmark = pytest.mark.slow

KILL_AT = r'''
"""platform ARGV[2:], SIGKILLed at a point of its checkpoint writes named by ARGV[1]:
  write:K:N  in the K-th checkpoint write, once N bytes of the new file are written;
  fsync:K    once the K-th new file is complete and fsynced, before any rename;
  rotate:K   in the K-th save, after last.pt became previous.pt, before the new file is renamed."""
import os, signal, sys

kind, save, *rest = sys.argv[1].split(":")
save, limit = int(save), int(rest[0]) if rest else 0
count = {"saves": 0, "bytes": 0}
write, fsync, replace = os.write, os.fsync, os.replace


def checkpoint_file(fd):  # any file of the checkpoint directory, wherever the writer puts its bytes
    try:
        return os.path.dirname(os.readlink(f"/proc/self/fd/{fd}")).endswith("/checkpoint")
    except OSError:
        return False


def die():
    os.kill(os.getpid(), signal.SIGKILL)


def counted_write(fd, data):
    if not checkpoint_file(fd):
        return write(fd, data)
    if os.lseek(fd, 0, os.SEEK_CUR) == 0:
        count["saves"] += 1
        count["bytes"] = 0
    if kind == "write" and count["saves"] == save and len(data) >= limit - count["bytes"]:
        write(fd, bytes(data[: limit - count["bytes"]]))
        die()
    n = write(fd, data)
    count["bytes"] += n
    return n


def counted_fsync(fd):
    fsync(fd)
    if kind == "fsync" and count["saves"] == save and checkpoint_file(fd):
        die()


def counted_replace(src, dst):
    if kind == "rotate" and count["saves"] == save and str(src).endswith(".last.pt.tmp"):
        die()
    return replace(src, dst)


os.write, os.fsync, os.replace = counted_write, counted_fsync, counted_replace
from splitserve.cli import main

sys.exit(main(sys.argv[2:]))
'''

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
PHOTOS = ("coffee", "astronaut", "rocket", "chelsea", "brick", "grass")


def platform(args: list, kill_at: str | None = None, **kw) -> subprocess.CompletedProcess:
    head = [sys.executable, "-c", KILL_AT, kill_at] if kill_at else [sys.executable, "-m", "splitserve"]
    return subprocess.run([*head, *map(str, args)], capture_output=True, text=True, timeout=300, env=ENV, **kw)


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """An ImageFolder tree of 64×64 crops of real photos (scikit-image's), one class per photo:
    4 train and 1 val image per class."""
    root = tmp_path_factory.mktemp("photos")
    for name in PHOTOS:
        img = texture(name)
        for i in range(5):
            split = "val" if i == 4 else "train"
            (root / split / name).mkdir(parents=True, exist_ok=True)
            box = (37 * i, 23 * i, 37 * i + 128, 23 * i + 128)
            img.crop(box).resize((64, 64)).save(root / split / name / f"{i}.png")
    return root


def codec_args(photos: Path, out: Path, work: Path) -> list:
    # 24 train images, batch 4: 6 steps per epoch, 12 in all; a checkpoint after every step
    return ["train-image-codec", "--arch", "bmshj2018-factorized", "--data", photos, "--out", out, "--channels",
            "8,8", "--lmbda", "0.01", "--batch-size", "4", "--epochs", "2", "--checkpoint-every", "1",
            "--num-workers", "0", "--val-limit", "2", "--no-progress", "--workdir", work]


@pytest.fixture(scope="module")
def reference(photos, tmp_path_factory) -> dict:
    """The uninterrupted run's weights."""
    root = tmp_path_factory.mktemp("straight")
    proc = platform(codec_args(photos, root / "codec", root / "work"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return load_file(root / "codec" / "model.safetensors")


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def verified_step(path: Path) -> int:
    """The step of a complete checkpoint file whose content matches its SHA-256."""
    saved = torch.load(path, map_location="cpu", weights_only=True)
    assert saved.pop("sha256") == content_digest(saved), f"{path} does not verify"
    return saved["global_step"]


@pytest.mark.parametrize("kill_at, good", [
    ("write:3:2000", "last.pt"),  # 2,000 bytes into the 3rd checkpoint
    ("fsync:7", "last.pt"),  # the 7th checkpoint complete on disk, not yet renamed
    ("rotate:5", "previous.pt"),  # last.pt of step 4 already moved aside, the new one not yet in place
])
def test_a_kill_inside_a_checkpoint_write_loses_nothing(photos, reference, tmp_path, kill_at, good):
    save = int(kill_at.split(":")[1])
    out, work = tmp_path / "codec", tmp_path / "work"
    args = codec_args(photos, out, work)
    proc = platform(args, kill_at)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    ckpt = work / "checkpoint"
    assert verified_step(ckpt / good) == save - 1  # the last good checkpoint is whole
    assert (ckpt / "last.pt").exists() == (good == "last.pt")
    assert (ckpt / ".last.pt.tmp").is_file()  # the interrupted write went to the side

    proc = platform([*args, "--resume"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"{ckpt / good} at epoch" in proc.stdout and f"step {save - 1}\n" in proc.stdout
    warnings = [line for line in proc.stderr.splitlines() if "warning" in line]
    if good == "last.pt":
        assert warnings == []
    else:
        assert len(warnings) == 1 and f"last.pt is missing; resuming from previous.pt (step {save - 1})" in warnings[0]
    assert_same(load_file(out / "model.safetensors"), reference)


def test_a_kill_from_outside_at_any_moment_loses_nothing(photos, reference, tmp_path):
    """SIGKILL to the process group at a random moment after the first epoch's record is logged —
    training, checkpointing, validating or writing the codec: wherever it lands, the resumed run
    ends where the uninterrupted one did."""
    import random

    out, work = tmp_path / "codec", tmp_path / "work"
    args = codec_args(photos, out, work)
    proc = subprocess.Popen([sys.executable, "-m", "splitserve", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=ENV, start_new_session=True)
    log = work / "metrics.jsonl"
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if log.is_file() and '"kind": "train"' in log.read_text():  # logged at the end of epoch 1
                time.sleep(random.uniform(0.0, 0.5))
                os.killpg(proc.pid, signal.SIGKILL)
                break
            time.sleep(0.01)
        proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it was killed"
    resumed = platform([*args, "--resume"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same(load_file(out / "model.safetensors"), reference)
    records = [line for line in log.read_text().splitlines() if '"kind": "train"' in line]
    assert len(records) == 2  # one per epoch, each once: what came after the checkpoint was dropped


def test_a_teacher_killed_inside_its_checkpoint_write_resumes_exactly(photos, tmp_path):
    """The kind of run that takes hours: a ResNet-18 teacher, killed 10 MB into writing its second
    checkpoint, resumes from the first and ends with the uninterrupted run's stem and head."""
    def args(out):
        return ["teacher", "--task", "cls", "--data", photos, "--out", out, "--arch", "resnet18", "--image-size",
                "64", "--epochs", "1", "--train-limit", "16", "--batch-size", "8", "--checkpoint-every", "1",
                "--val-limit", "2",
                "--num-workers", "0", "--no-progress", "--no-tensorboard"]

    straight = platform(args(tmp_path / "straight"))
    assert straight.returncode == 0, straight.stderr[-3000:]
    out = tmp_path / "killed"
    proc = platform(args(out), "write:2:10000000")
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    assert verified_step(out / "checkpoint" / "last.pt") == 1
    proc = platform([*args(out), "--resume"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "step 1\n" in proc.stdout
    for part in ("stem", "head"):
        assert_same(load_file(out / f"{part}.safetensors"), load_file(tmp_path / "straight" / f"{part}.safetensors"))
