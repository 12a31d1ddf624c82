"""A codec family from another package, registered only through the ``splitserve.codecs`` entry
point, is distilled, served and encoded with no edit to the core.

The fixture package (tests/fixtures/tiny-codec) is installed into a throw-away target directory,
never into the running environment; the commands run in subprocesses that see it on PYTHONPATH.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import Started

pytestmark = pytest.mark.slow

FIXTURE = Path(__file__).parent / "fixtures" / "tiny-codec"
FAST = ["--num-workers", "0", "--no-progress", "--no-tensorboard", "--batch-size", "8", "--epochs", "1",
        "--train-limit", "16", "--val-limit", "8"]


def _run(env, *args):
    return _checked(subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, timeout=600))


def _start(env, *args) -> Started:
    """Started now and checked later (``started.result(600)``), to run side by side with what follows."""
    return Started([sys.executable, *args], env=env)


def _checked(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    target = tmp_path_factory.mktemp("site")
    source = tmp_path_factory.mktemp("src") / "tiny-codec"
    shutil.copytree(FIXTURE, source)  # the build writes next to its sources: keep them out of the checkout
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--target", str(target), str(source)], check=True, capture_output=True, timeout=300)
    e = dict(os.environ)
    e["PYTHONPATH"] = os.pathsep.join([str(target), e.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    e["OMP_NUM_THREADS"] = "1"
    return e


def test_running_environment_does_not_know_the_family():
    from splitserve.models import list_codecs

    assert "tiny" not in list_codecs()  # installed only for the subprocesses below


def test_entry_point_family_distils_serves_and_encodes(env, tmp_path):
    from splitserve.data import make_fmnist_scenes

    data = tmp_path / "fm"
    make_fmnist_scenes(data, train_scenes=16, val_scenes=8, image_size=32, seed=0, progress=False)
    teacher, bundle = tmp_path / "teacher", tmp_path / "bundle"
    listing = _start(env, "-c", "from splitserve.models import list_codecs; print(list_codecs())")
    _run(env, "-m", "splitserve", "teacher", "--task", "cls", "--arch", "resnet18", "--data", str(data),
         "--out", str(teacher), "--image-size", "32", *FAST)
    assert "tiny" in _checked(listing.result(600)).stdout
    _run(env, "-m", "splitserve", "distill", "--encoder", "tiny", "--codec-option", "latent_channels=6",
         "--teacher", str(teacher), "--data", str(data), "--beta", "0.01", "--out", str(bundle), *FAST,
         "--refit-steps", "0")
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["codec"] == {"family": "tiny", "config": {"latent_channels": 6, "feature_channels": 64}}

    image = next((data / "imagefolder" / "val").rglob("*.png"))
    payload = tmp_path / "p.ssp"
    _run(env, "-m", "splitserve", "encode", str(image), "--bundle", str(bundle), "-o", str(payload))
    # without the package, the bundle names what is missing in one line (checked below, run beside the next)
    plain = {k: v for k, v in env.items() if k != "PYTHONPATH"}
    inspected = _start(plain, "-m", "splitserve", "bundle", "inspect", str(bundle))
    # serve: the runtime decodes the payload with the entry-point family and answers
    answer = _run(env, "-c", f"""
import json
from splitserve.gateway.runtime import Job, Runtime
from splitserve.plugins import PluginRegistry
rt = Runtime({str(bundle)!r}, PluginRegistry.discover())
payload, metas = rt.parse_payload(open({str(payload)!r}, 'rb').read())
out = rt.run([Job(plugins=list(rt.plugins), payload=payload, metas=metas)])
print(json.dumps({{'family': rt.codec.family, 'latent': list(payload.latent_shape),
                  'top': out[0][0]['classification'].top[0].label}}))
""").stdout
    result = json.loads(answer.strip().splitlines()[-1])
    assert result["family"] == "tiny" and result["latent"] == [6, 8, 8]
    assert result["top"] in manifest["tasks"]["classification"]["config"]["labels"]

    proc = inspected.result(600)
    assert proc.returncode == 2 and "unknown codec family 'tiny'" in proc.stderr
