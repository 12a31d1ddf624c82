"""Heads that share one layer2..4: trained with `finetune --shared-trunk`, stored once, run once per batch.

The answers of shared-trunk heads must equal what each head computes with its own copy of the
trunk, a 3-task request must run the trunk once, and shared and own-trunk heads mix in one bundle.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from splitserve.bundle import load_head, load_trunk, read_manifest
from splitserve.cli import main
from splitserve.edge import EdgeEncoder
from splitserve.gateway.runtime import Job, Runtime
from splitserve.models.backbone import SharedTrunk
from splitserve.plugins import PluginRegistry

from .conftest import texture
from .helpers import informative_bundle

pytestmark = pytest.mark.slow

FAST = ["--num-workers", "0", "--no-progress", "--no-tensorboard", "--batch-size", "8", "--epochs", "1",
        "--train-limit", "8", "--val-limit", "8"]


@pytest.fixture(scope="module")
def shared_bundle(tmp_path_factory) -> Path:
    """An untrained default-style bundle whose cls and det heads are re-trained on a shared trunk
    (seg keeps its own)."""
    from splitserve.data import make_fmnist_scenes

    root = tmp_path_factory.mktemp("shared")
    data = root / "fm"
    make_fmnist_scenes(data, train_scenes=16, val_scenes=8, image_size=64, seed=0, progress=False)
    bundle = informative_bundle(root / "bundle", input_size=(64, 64),
                                tasks=["classification", "detection", "segmentation"])
    for task in ("classification", "detection"):
        assert main(["finetune", "--task", task, "--bundle", str(bundle), "--data", str(data), "--shared-trunk",
                     *FAST]) == 0
    return bundle


def test_trunk_stored_once_and_heads_without_it(shared_bundle):
    manifest = read_manifest(shared_bundle)
    assert "trunk" in manifest.files
    assert {t: e.trunk for t, e in manifest.tasks.items()} == {
        "classification": "shared", "detection": "shared", "segmentation": "own"}
    cls = load_file(str(shared_bundle / manifest.tasks["classification"].file.path))
    det = load_file(str(shared_bundle / manifest.tasks["detection"].file.path))
    seg = load_file(str(shared_bundle / manifest.tasks["segmentation"].file.path))
    assert not any(k.startswith("tail.") for k in cls) and "fc.weight" in cls
    assert not any(k.startswith("retinanet.backbone.body.") for k in det)
    assert any(k.startswith("tail.") for k in seg)
    trunk = load_file(str(shared_bundle / manifest.files["trunk"].path))
    assert any(k.startswith("layer4.") for k in trunk)
    # finetune --shared-trunk leaves the trunk and the decoder as they were: other heads are safe
    prov = manifest.tasks["detection"].provenance
    assert prov["shared_trunk"] is True and prov["train_decoder"] is False


def _own_copy(bundle: Path, task: str, registry: PluginRegistry):
    """The same head, built with its own (copied, unshared) layer2..4."""
    manifest = read_manifest(bundle)
    plugin = registry.get(task)
    config = plugin.resolve_config(manifest.backbone, manifest.tasks[task].config)
    trunk = load_trunk(bundle, manifest)
    head = load_head(bundle, task, plugin.build_head(manifest.backbone, config), manifest, trunk=trunk)
    own = plugin.build_head(manifest.backbone, config).eval()
    state = {k: v for k, v in head.state_dict().items()}
    prefix = "tail.tail." if task == "classification" else "retinanet.backbone.body.tail."
    state = {(k.replace(prefix, prefix[: -len("tail.")]) if k.startswith(prefix) else k): v for k, v in state.items()}
    own.load_state_dict(state, strict=False)
    assert not isinstance(own.tail, SharedTrunk)
    return plugin, own, config


def test_shared_answers_equal_own_trunk_answers_and_trunk_runs_once(shared_bundle):
    registry = PluginRegistry.discover()
    runtime = Runtime(shared_bundle, registry)
    edge = EdgeEncoder.from_bundle(shared_bundle)
    images = [texture(name, (90, 70)) for name in ("brick", "grass", "gravel")]
    payload, metas = runtime.parse_payload(edge.encode(images).data)
    plugins = list(runtime.plugins)
    calls = []
    runtime.trunk.tail.register_forward_hook(lambda *_: calls.append(1))
    before = _count(runtime, "trunk")
    served = runtime.run([Job(plugins=plugins, payload=payload, metas=metas)])[0]
    assert len(calls) == 1  # one layer2..4 forward for cls + det together
    assert _count(runtime, "trunk") == before + 1

    features = runtime.codec.decode(runtime.codec.decompress(list(payload.strings), payload.latent_shape[1:]))
    for task in ("classification", "detection"):
        plugin, own, config = _own_copy(shared_bundle, task, registry)
        with torch.inference_mode():
            expected = plugin.predict(own, features, metas, config)
        assert [answers[task] for answers in served] == expected
    # a request for one shared task gets the same answers as in the 3-task request
    alone = runtime.run([Job(plugins=[registry.get("det")], payload=payload, metas=metas)])[0]
    assert [a["detection"] for a in alone] == [a["detection"] for a in served]


def _count(runtime: Runtime, stage: str) -> float:
    for metric in runtime.metrics.registry.collect():
        for sample in metric.samples:
            if sample.name.endswith("_count") and sample.labels.get("stage") == stage:
                return sample.value
    return 0.0


def test_shared_trunk_is_frozen_by_finetune(shared_bundle, tmp_path):
    """A second --shared-trunk finetune trains the head only: the trunk file does not change."""
    manifest = read_manifest(shared_bundle)
    trunk_hash = manifest.files["trunk"].sha256
    decoder_hash = manifest.files["decoder"].sha256
    data = shared_bundle.parent / "fm"
    assert main(["finetune", "--task", "classification", "--bundle", str(shared_bundle), "--data", str(data),
                 "--shared-trunk", "--workdir", str(tmp_path / "w"), *FAST]) == 0
    after = read_manifest(shared_bundle)
    assert after.files["trunk"].sha256 == trunk_hash and after.files["decoder"].sha256 == decoder_hash
    assert json.loads((shared_bundle / "manifest.json").read_text())["tasks"]["classification"]["trunk"] == "shared"
