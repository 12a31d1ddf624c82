"""``platform finetune --procedure reference`` for detection on a tiny fmnist-scenes tree (real COCO
files): it starts from the teacher's head, its feature-distillation step lowers the feature loss on
the recipe's layers only, and the decoder other heads consume stays as it is."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file

from splitserve.cli import main

from .test_training import FAST, NO_REFIT, run, scenes  # noqa: F401 (scenes is a fixture)

pytestmark = pytest.mark.slow

TINY = ["--train-limit", "8", "--val-limit", "4", *FAST, "--batch-size", "4", "--log-every", "1"]


@pytest.fixture(scope="module")
def setup(scenes, tmp_path_factory) -> dict[str, Path]:
    """Untrained (--epochs 0) ResNet-18 teachers and a one-epoch stage-1 bundle with a classification head."""
    root = tmp_path_factory.mktemp("reference")
    small = ["--arch", "resnet18", "--image-size", "64", "--epochs", "0", "--val-limit", "4", *FAST]
    run("teacher", "--task", "cls", "--data", scenes, "--out", root / "t-cls", *small)
    run("teacher", "--task", "det", "--data", scenes, "--out", root / "t-det", "--seed", "1", *small)
    run("distill", "--teacher", root / "t-cls", "--data", scenes, "--beta", "0.1", "--out", root / "bundle",
        "--epochs", "1", *TINY, *NO_REFIT)
    return {"root": root, "t_det": root / "t-det", "t_cls": root / "t-cls", "bundle": root / "bundle"}


def copy_bundle(setup, name: str) -> Path:
    out = setup["root"] / name
    shutil.copytree(setup["bundle"], out)
    return out


def finetune_det(bundle: Path, teacher: Path, scenes: Path, *extra) -> None:
    run("finetune", "--task", "det", "--bundle", bundle, "--teacher", teacher, "--coco", scenes / "coco", *TINY,
        *extra)


def test_reference_starts_from_the_teachers_head(setup, scenes):
    bundle = copy_bundle(setup, "start")
    teacher = load_file(setup["t_det"] / "head.safetensors")
    finetune_det(bundle, setup["t_det"], scenes, "--procedure", "direct", "--epochs", "1")
    trained = load_file(bundle / "heads" / "detection.safetensors")
    assert any(not (trained[k] == teacher[k]).all() for k in teacher)  # the bundle's head is no longer the teacher's
    finetune_det(bundle, setup["t_det"], scenes, "--feature-epochs", "0", "--epochs", "0")  # the default procedure
    head = load_file(bundle / "heads" / "detection.safetensors")
    assert head.keys() == teacher.keys()
    assert all((head[k] == teacher[k]).all() for k in teacher)
    entry = json.loads((bundle / "manifest.json").read_text())["tasks"]["detection"]
    assert entry["provenance"]["procedure"] == "reference"
    assert entry["provenance"]["init"].startswith(f"teacher head ({setup['t_det']})")


def test_the_feature_step_lowers_the_feature_loss_on_the_recipes_layers(setup, scenes):
    bundle = copy_bundle(setup, "features")
    decoder = (bundle / "decoder.safetensors").read_bytes()
    finetune_det(bundle, setup["t_det"], scenes, "--feature-epochs", "4", "--epochs", "0")
    log = bundle.parent / "features.runs" / "finetune-detection-features" / "metrics.jsonl"
    val = [r["feature_loss"] for r in map(json.loads, log.read_text().splitlines()) if r["kind"] == "val"]
    assert len(val) == 4 and val[-1] < 0.9 * val[0], val
    assert not list(log.parent.parent.rglob("*.pt"))  # the command is done: neither step's checkpoint is left
    teacher = load_file(setup["t_det"] / "head.safetensors")
    head = load_file(bundle / "heads" / "detection.safetensors")
    layer2 = [k for k in teacher if ".layer2." in f".{k}"]
    later = [k for k in teacher if ".layer3." in f".{k}" or ".layer4." in f".{k}"]
    assert layer2 and later
    assert any(not (head[k] == teacher[k]).all() for k in layer2)  # detection's recipe distils layer2 ...
    assert all((head[k] == teacher[k]).all() for k in later)  # ... and nothing else
    assert (bundle / "decoder.safetensors").read_bytes() == decoder  # the classification head reads it too


def test_a_resume_skips_the_finished_feature_step_and_provenance_times_both_steps(setup, scenes):
    """The feature step's checkpoint stays until the whole command is done, so a ``--resume`` after
    the second step stopped does not train the first again; ``train_seconds`` (what the study's
    training-time comparison reads) sums both steps' training, validation apart (``val_seconds``)."""
    import torch

    bundle = copy_bundle(setup, "resume")
    runs = bundle.parent / "resume.runs"
    features, second = runs / "finetune-detection-features", runs / "finetune-detection"
    finetune_det(bundle, setup["t_det"], scenes, "--feature-epochs", "4", "--epochs", "2", "--max-steps", "1")
    assert (features / "checkpoint" / "last.pt").is_file()  # kept: the command is not done
    trained = [r for r in map(json.loads, (features / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "train"]
    finetune_det(bundle, setup["t_det"], scenes, "--feature-epochs", "4", "--epochs", "2", "--resume",
                 "--keep-checkpoint")
    again = [r for r in map(json.loads, (features / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "train"]
    assert again == trained  # not one more feature step
    spent = {}
    for step in (features, second):
        ck = torch.load(step / "checkpoint" / "last.pt", weights_only=True)
        spent[step.name] = (ck["seconds"] - ck["val_seconds"], ck["val_seconds"])
        assert ck["val_seconds"] > 0
    prov = json.loads((bundle / "manifest.json").read_text())["tasks"]["detection"]["provenance"]
    # each step's checkpoint was written before its last save and its outputs, which train_seconds also counts
    assert sum(t for t, _ in spent.values()) <= prov["train_seconds"] <= sum(t for t, _ in spent.values()) + 10
    assert prov["val_seconds"] == pytest.approx(sum(v for _, v in spent.values()), abs=0.15)


def test_segmentation_follows_its_recipe(setup, scenes):
    """The plugin's recipe reaches the second step: SGD at 0.0025 with the poly 0.9 schedule, per step."""
    teacher = setup["root"] / "t-seg"
    run("teacher", "--task", "seg", "--data", scenes, "--out", teacher, "--arch", "resnet18", "--image-size", "64",
        "--epochs", "0", "--val-limit", "2", "--head-config", "output_stride=8", "atrous_rates=[1,2,3]", *FAST)
    bundle = copy_bundle(setup, "seg")
    run("finetune", "--task", "seg", "--bundle", bundle, "--teacher", teacher, "--data", scenes, "--feature-epochs", "0",
        *TINY, "--train-limit", "4", "--val-limit", "2")
    log = bundle.parent / "seg.runs" / "finetune-segmentation" / "metrics.jsonl"
    lrs = [r["lr"] for r in map(json.loads, log.read_text().splitlines()) if r["kind"] == "train"]
    total = len(lrs)
    assert total == 5  # the recipe's 5 epochs of 4 images in batches of 4
    # logged after each step's schedule update
    assert lrs == pytest.approx([0.0025 * (1 - step / total) ** 0.9 for step in range(1, total + 1)], rel=1e-6)


def test_reference_needs_a_same_task_teacher(setup, scenes, capsys):
    for teacher in ([], ["--teacher", str(setup["t_cls"])]):
        capsys.readouterr()
        code = main(["finetune", "--task", "det", "--bundle", str(copy_bundle(setup, f"err{len(teacher)}")),
                     "--coco", str(scenes / "coco"), "--procedure", "reference", *teacher, *map(str, TINY)])
        err = capsys.readouterr().err.strip()
        assert code != 0 and err.endswith("--procedure reference needs --teacher DIR of a detection teacher"), err
        assert len(err.splitlines()) == 1
