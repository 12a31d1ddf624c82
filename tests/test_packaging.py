"""The wheel a user installs from: `platform serve` with no --bundle serves the embedded default, so
the wheel must carry every file that bundle's manifest lists, and the three source roots' packages."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from splitserve.bundle import bundle_files, read_manifest
from splitserve.defaults import PACKAGED_BUNDLE

ROOT = Path(__file__).resolve().parents[1]


def test_the_wheel_carries_the_default_bundle_and_every_package(tmp_path):
    # from a copy without build outputs (setuptools reuses a stale build/ in the tree), by the venv's
    # setuptools (--no-build-isolation: no download)
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".git", ".venv", "build", "*.egg-info", "runs", "tests"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                    "--wheel-dir", str(tmp_path), str(src)], check=True, capture_output=True)
    (wheel,) = tmp_path.glob("splitserve-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())

    listed = bundle_files(read_manifest(PACKAGED_BUNDLE))
    assert len(listed) >= 6  # the manifest, encoder, prior, decoder, a trunk or head, ...
    for rel in listed:
        assert f"splitserve/assets/default-bundle/{rel}" in names, rel

    for package in ("splitserve/cli", "splitserve/gateway", "splitserve_edge", "splitserve_tasks/detection"):
        assert f"{package}/__init__.py" in names, package
    assert not any(n.startswith(("tests/", "platform/")) for n in names)
