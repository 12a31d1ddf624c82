"""``platform finetune --tasks cls,det,seg``: one shared trunk fine-tuned on three tasks' losses at
once (each task's own data and head, through the plugins' own training hooks), written to the
bundle as shared-trunk heads that the gateway serves from that one trunk."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from splitserve.bundle import load_codec, read_manifest
from splitserve.cli import main
from splitserve.edge import EdgeEncoder
from splitserve.gateway.runtime import Job, Runtime
from splitserve.plugins import PluginRegistry

from .conftest import texture
from .helpers import informative_bundle
from .test_training import FAST, run, scenes  # noqa: F401 (scenes is a fixture)

pytestmark = pytest.mark.slow

TASKS = ["--tasks", "cls,det,seg", "--epochs", "1", "--train-limit", "8", "--val-limit", "4", "--log-every", "1",
         "--head-config", "seg.output_stride=8", "seg.atrous_rates=[1,2,3]", *FAST, "--batch-size", "4"]


@pytest.fixture(scope="module")
def bundles(scenes, tmp_path_factory) -> dict[str, Path]:
    """An untrained three-head bundle (each head with its own layer2..4), and a copy trained with --tasks."""
    root = tmp_path_factory.mktemp("multitask")
    start = informative_bundle(root / "start", input_size=(64, 64),
                               tasks=["classification", "detection", "segmentation"])
    trained = root / "trained"
    shutil.copytree(start, trained)
    run("finetune", "--bundle", trained, "--data", scenes, *TASKS)
    return {"start": start, "trained": trained}


def test_one_trunk_is_trained_by_three_tasks(bundles):
    start, trained = read_manifest(bundles["start"]), read_manifest(bundles["trained"])
    assert "trunk" not in start.files and "trunk" in trained.files
    assert {t: e.trunk for t, e in trained.tasks.items()} == dict.fromkeys(
        ("classification", "detection", "segmentation"), "shared")
    for task, entry in trained.tasks.items():  # layer2..4 are stored once, in the trunk file
        head = load_file(str(bundles["trained"] / entry.file.path))
        assert not any(".layer2." in f".{k}" or ".layer4." in f".{k}" for k in head), task
        assert entry.provenance["procedure"] == "multitask" and entry.provenance["shared_trunk"] is True
        assert entry.provenance["tasks"] == ["classification", "detection", "segmentation"]
    # the trunk started from the first task's layer2..4 and was trained away from them
    trunk = load_file(str(bundles["trained"] / trained.files["trunk"].path))
    first = load_file(str(bundles["start"] / start.tasks["classification"].file.path))
    changed = [k for k in trunk if not torch.equal(trunk[k], first[f"tail.{k}"])]
    assert any(k.startswith("layer2.") for k in changed) and any(k.startswith("layer4.") for k in changed)
    # every task's loss was minimised in every step, each on its own data
    log = bundles["trained"].parent / "trained.runs" / "finetune-classification+detection+segmentation"
    train = [r for r in map(json.loads, (log / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "train"]
    assert len(train) == 2  # 8 images per task in batches of 4
    for r in train:
        assert {"classification/ce", "detection/classification", "segmentation/ce"} <= set(r)
        assert r["images_per_s"] > 0
    # the encoder and prior are untouched; with every head among the tasks, the decoder trained too
    assert trained.fingerprint == start.fingerprint == load_codec(bundles["trained"]).fingerprint()
    assert trained.files["decoder"].sha256 != start.files["decoder"].sha256


def test_the_bundle_serves_three_tasks_from_that_trunk(bundles):
    bundle = bundles["trained"]
    runtime = Runtime(bundle, PluginRegistry.discover())
    payload, metas = runtime.parse_payload(EdgeEncoder.from_bundle(bundle).encode(
        [texture(name, (90, 70)) for name in ("brick", "grass")]).data)
    calls = []
    runtime.trunk.tail.register_forward_hook(lambda *_: calls.append(1))
    (answers,) = runtime.run([Job(plugins=list(runtime.plugins), payload=payload, metas=metas)])
    assert len(answers) == 2 and all(set(a) == {"classification", "detection", "segmentation"} for a in answers)
    # cls and det run on the trunk module itself: layer2..4 once per batch for both
    assert len(calls) == 1 and runtime.heads.shared == {"classification", "detection"}
    # the dilated DeepLabv3 computes its own geometry on the very same weights (tied, not copied)
    seg, trunk = runtime.heads.heads["segmentation"], runtime.trunk.tail
    assert seg.tail.layer3[0].conv1.weight is trunk.layer3[0].conv1.weight
    assert seg.tail.layer3[0].conv1.stride == (1, 1) != trunk.layer3[0].conv1.stride


def test_a_task_weight_scales_that_tasks_loss_terms(bundles, scenes, tmp_path):
    """Same start, seed and data: with ``--task-weight cls=2`` the first step's classification term
    is twice the unweighted run's, the other tasks' are the same (logged before any update)."""
    weighted = tmp_path / "weighted"
    shutil.copytree(bundles["start"], weighted)
    run("finetune", "--bundle", weighted, "--data", scenes, *TASKS, "--task-weight", "cls=2", "--max-steps", "1")

    def first_step(bundle: Path) -> dict:
        log = bundle.parent / f"{bundle.name}.runs" / "finetune-classification+detection+segmentation"
        return next(r for r in map(json.loads, (log / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "train")

    plain, doubled = first_step(bundles["trained"]), first_step(weighted)
    assert doubled["classification/ce"] == pytest.approx(2 * plain["classification/ce"], rel=1e-5)
    assert doubled["segmentation/ce"] == pytest.approx(plain["segmentation/ce"], rel=1e-5)
    assert doubled["detection/classification"] == pytest.approx(plain["detection/classification"], rel=1e-5)


def test_task_names_and_options_are_checked(bundles, scenes, tmp_path, capsys):
    bundle = tmp_path / "b"
    shutil.copytree(bundles["start"], bundle)
    base = ["finetune", "--bundle", str(bundle), "--data", str(scenes), *map(str, FAST)]
    for extra, message in (
        (["--tasks", "cls"], "--tasks names at least two different tasks"),
        (["--tasks", "cls,det", "--task", "seg"], "give --task (one head) or --tasks"),
        (["--tasks", "cls,det", "--task-weight", "seg=1"], "--task-weight segmentation: not one of --tasks"),
        (["--tasks", "cls,det", "--head-config", "fpn_channels=64"], "with --tasks, name the task: TASK.KEY=VALUE"),
        (["--task", "cls", "--task-weight", "cls=1"], "--task-weight goes with --tasks"),
        ([], "missing --task (or --tasks"),
        (["--task", "cls", "--teacher", "a", "b"], "--teacher: one teacher for --task"),
    ):
        capsys.readouterr()
        assert main([*base, *extra]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, err
