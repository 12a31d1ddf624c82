"""Test helpers shared by several test modules."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from splitserve.bundle import load_head, read_manifest
from splitserve.edge import EdgeEncoder
from splitserve.plugins import PluginRegistry

from .conftest import texture


def bundle_heads(bundle: Path) -> dict[str, tuple[torch.nn.Module, dict]]:
    """Every head of an own-trunk bundle with its config, as ``save_bundle(heads=...)`` takes them."""
    manifest = read_manifest(bundle)
    registry = PluginRegistry.discover()
    heads = {}
    for task, entry in manifest.tasks.items():
        plugin = registry.get(task)
        config = plugin.resolve_config(manifest.backbone, entry.config)
        heads[task] = (load_head(bundle, task, plugin.build_head(manifest.backbone, config), manifest), config)
    return heads


def informative(bundle: Path) -> None:
    """Scale the untrained encoder's output so latents depend on the image (at initialisation they
    all round to zero, and then no test could tell one image's answer from another's)."""
    from splitserve.bundle import load_codec, save_bundle

    manifest = read_manifest(bundle)
    codec = load_codec(bundle, manifest=manifest)
    with torch.no_grad():
        codec.encoder[-1].weight.mul_(60.0)
    save_bundle(bundle, codec, backbone=manifest.backbone, preprocessing=manifest.policy, heads=bundle_heads(bundle),
                rates=manifest.rates, default_rate=manifest.default_rate)
    edge = EdgeEncoder.from_bundle(bundle)
    x, _ = edge.preprocess([texture("brick", (90, 70)), texture("grass", (90, 70))])
    y = edge.codec.quantize(x)
    assert y.abs().sum() > 0 and not torch.equal(y[0], y[1])


def informative_bundle(path: Path, *, input_size: tuple[int, int], tasks: list[str],
                       codec_config: dict | None = None) -> Path:
    """An untrained bundle with the given heads whose latents depend on the image (see :func:`informative`)."""
    from splitserve.defaults import build_untrained_bundle

    bundle = build_untrained_bundle(path, input_size=input_size, tasks=tasks, codec_config=codec_config)
    informative(bundle)
    return bundle


def sigterm_group_during(args: list[str], log: Path, records: int, *, timeout: float = 120) -> tuple[int, str]:
    """Run ``platform ARGS`` in its own process group; once ``log`` (a metrics.jsonl) holds
    ``records`` training records, SIGTERM the group (as timeout or systemd do, data-loading workers
    included). Returns the exit status and stderr."""
    proc = subprocess.Popen([sys.executable, "-m", "splitserve", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"},
                            start_new_session=True)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if log.is_file() and log.read_text().count('"kind": "train"') >= records:
                break
            time.sleep(0.2)
        assert proc.poll() is None, proc.communicate()
        os.killpg(proc.pid, signal.SIGTERM)
        _, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc.returncode, err
