"""Stage 1 with several teachers (``distill --teacher TASK=DIR … --teacher-weight TASK=W``) on a tiny
fmnist-scenes tree: a zero-weighted second teacher changes nothing (bit-exact on CPU), a weighted one
changes the loss, and the bundle carries every teacher's head and records each teacher and weight."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from splitserve.cli import main

from .test_training import FAST, NO_REFIT, _codec_tensors, run, scenes  # noqa: F401 (scenes is a fixture)

pytestmark = pytest.mark.slow

TINY = ["--train-limit", "8", "--val-limit", "4", "--epochs", "1", *FAST, "--batch-size", "4", "--log-every", "1",
        *NO_REFIT]


@pytest.fixture(scope="module")
def teachers(scenes, tmp_path_factory) -> dict[str, Path]:
    """Untrained (--epochs 0) ResNet-18 teachers of two tasks, from different seeds so their features differ."""
    root = tmp_path_factory.mktemp("teachers")
    small = ["--arch", "resnet18", "--image-size", "64", "--epochs", "0", "--val-limit", "4", *FAST]
    run("teacher", "--task", "cls", "--data", scenes, "--out", root / "cls", *small)
    run("teacher", "--task", "seg", "--data", scenes, "--out", root / "seg", "--seed", "1",
        "--head-config", "output_stride=8", "atrous_rates=[1,2,3]", *small)
    return {"cls": root / "cls", "seg": root / "seg", "root": root}


@pytest.fixture(scope="module")
def runs(teachers, scenes) -> dict[str, Path]:
    """The same stage 1 with the classification teacher alone, and next to a segmentation teacher of
    weight 0 and of weight 0.5."""
    out = {}
    root = teachers["root"]
    distill = ["distill", "--data", scenes, "--beta", "0.1", *TINY]
    run(*distill, "--teacher", teachers["cls"], "--out", root / "single")
    out["single"] = root / "single"
    for name, weight in (("zero", "0"), ("half", "0.5")):
        run(*distill, "--teacher", f"classification={teachers['cls']}", "--teacher", f"seg={teachers['seg']}",
            "--teacher-weight", f"segmentation={weight}", "--out", root / name)
        out[name] = root / name
    return out


def listed(teachers: dict[str, Path]) -> list[dict]:
    """The provenance of a run from the classification teacher and the segmentation teacher at 0.5."""
    return [{"task": "classification", "path": str(teachers["cls"]), "weight": 1.0},
            {"task": "segmentation", "path": str(teachers["seg"]), "weight": 0.5}]


def train_losses(bundle: Path) -> list[float]:
    log = bundle.parent / f"{bundle.name}.runs" / "distill" / "metrics.jsonl"
    return [r["loss"] for r in map(json.loads, log.read_text().splitlines()) if r["kind"] == "train"]


def test_a_zero_weighted_teacher_changes_nothing(runs):
    single, zero = _codec_tensors(runs["single"]), _codec_tensors(runs["zero"])
    assert single.keys() == zero.keys()
    assert all(torch.equal(single[k], zero[k]) for k in single)
    assert train_losses(runs["single"]) == train_losses(runs["zero"]) and len(train_losses(runs["single"])) == 2


def test_a_weighted_second_teacher_adds_its_term(runs):
    from splitserve.bundle import read_manifest

    single, half = train_losses(runs["single"]), train_losses(runs["half"])
    assert single[0] != half[0]  # the same first batch, same codec init: only the loss differs
    metrics = read_manifest(runs["half"]).metrics
    # the validation loss is the weighted sum of each teacher's term, as the bundle records them
    assert metrics["distill_loss"] == pytest.approx(
        metrics["distill_classification"] + 0.5 * metrics["distill_segmentation"], rel=1e-5)
    assert metrics["distill_segmentation"] > 0


def test_the_bundle_carries_every_teacher(runs, teachers):
    from splitserve.bundle import read_manifest

    manifest = read_manifest(runs["half"])
    assert set(manifest.tasks) == {"classification", "segmentation"}
    assert manifest.provenance["teachers"] == listed(teachers)
    assert set(read_manifest(runs["single"]).tasks) == {"classification"}
    # the command it records parses back to the same teachers and weights
    import shlex

    from splitserve.cli import build_parser
    from splitserve.cli.distill import OPTIONS
    from splitserve.training.options import resolve

    again = resolve(build_parser().parse_args(shlex.split(manifest.provenance["command"])[1:]), OPTIONS, "distill")
    assert again.teacher == [f"classification={teachers['cls']}", f"seg={teachers['seg']}"]
    assert dict(again.teacher_weight) == {"segmentation": 0.5}


def test_the_multi_teacher_bundle_serves_both_heads(runs, scenes):
    from splitserve.edge import EdgeEncoder
    from splitserve.gateway.runtime import Job, Runtime
    from splitserve.plugins import PluginRegistry

    images = sorted((scenes / "imagefolder" / "val").rglob("*.png"))[:2]
    encoded = EdgeEncoder.from_bundle(runs["half"]).encode(images)
    runtime = Runtime(runs["half"], PluginRegistry.discover())
    payload, metas = runtime.parse_payload(encoded.data)
    (answers,) = runtime.run([Job(plugins=list(runtime.plugins), payload=payload, metas=metas)])
    assert len(answers) == 2
    for answer in answers:
        assert set(answer) == {"classification", "segmentation"}
        assert (answer["segmentation"].width, answer["segmentation"].height) == (64, 64)


def test_teachers_must_share_a_backbone_and_a_task_each(teachers, scenes, tmp_path, capsys):
    other = tmp_path / "r34"
    run("teacher", "--task", "seg", "--data", scenes, "--out", other, "--arch", "resnet34", "--image-size", "64",
        "--epochs", "0", "--val-limit", "2", *FAST)
    base = ["distill", "--data", str(scenes), "--beta", "0.1", "--out", str(tmp_path / "b"), *map(str, TINY)]
    for extra, message in (
        ([f"--teacher={teachers['cls']}", "--teacher", str(other)],
         "backbone resnet34, but the first teacher's is resnet18; all teachers must share one backbone"),
        (["--teacher", f"det={teachers['seg']}"], "that directory holds a segmentation teacher"),
        (["--teacher", str(teachers["cls"]), "--teacher-weight", "seg=1"], "no --teacher for that task"),
    ):
        capsys.readouterr()
        assert main([*base, *extra]) != 0
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, err


@pytest.fixture(scope="module")
def joint(teachers, scenes) -> Path:
    """Duan & Zhu's single stage from the classification teacher and a segmentation teacher of weight
    0.5, with a two-rate codec whose entropy model has its own optimizer (``--prior-lr``)."""
    out = teachers["root"] / "joint"
    run("train", "--joint", "--encoder", "rac", "--blocks", "0", "--teacher", f"classification={teachers['cls']}",
        "--teacher", f"seg={teachers['seg']}", "--teacher-weight", "seg=0.5", "--lmbdas", "0.5,2", "--data", scenes,
        "--out", out, "--prior-lr", "0.002", "--keep-checkpoint", *TINY)
    return out


def test_joint_training_learns_from_every_teacher(joint, teachers):
    from safetensors.torch import load_file

    from splitserve.bundle import read_manifest

    manifest = read_manifest(joint)
    assert set(manifest.tasks) == {"classification", "segmentation"}
    assert manifest.provenance["teachers"] == listed(teachers)
    assert [r.lmbda for r in manifest.rates] == [2.0, 0.5] and manifest.provenance["lmbdas"] == [2.0, 0.5]
    log = joint.parent / "joint.runs" / "train" / "metrics.jsonl"
    train = [r for r in map(json.loads, log.read_text().splitlines()) if r["kind"] == "train"]
    assert len(train) == 2
    for r in train:  # the decoded feature is pulled toward the segmentation teacher's too, at half weight
        mse = r["mse_layer1"] + r["mse_layer2"] + r["mse_layer3"] + r["mse_layer4"]
        assert r["feature_mse_segmentation"] > 0
        assert r["feature_mse"] == pytest.approx(mse + 0.5 * r["feature_mse_segmentation"], rel=1e-5)
        # the rate not drawn fits its prior to the step's latent, and that is part of the loss
        assert r["prior_fit"] > 0
        assert r["loss"] == pytest.approx(r["rate"] + r["feature_mse"] + r["ce"] + r["kd"] + r["prior_fit"], rel=1e-5)
    # the classifier trained; the segmentation teacher's head is carried as it is
    teacher_seg = load_file(teachers["seg"] / "head.safetensors")
    seg = load_file(joint / manifest.tasks["segmentation"].file.path)
    assert seg.keys() == teacher_seg.keys() and all(torch.equal(seg[k], teacher_seg[k]) for k in seg)
    teacher_cls = load_file(teachers["cls"] / "head.safetensors")
    cls = load_file(joint / manifest.tasks["classification"].file.path)
    assert any(not torch.equal(cls[k], teacher_cls[k]) for k in cls)


def test_prior_lr_trains_the_entropy_model_on_its_own_adam(joint):
    """``--prior-lr``: the run's checkpoint has a ``prior`` Adam at that rate, on the main schedule,
    holding every prior's density and both rates' gains (that ``main`` then holds none of them is
    test_rates_training's), and the provenance says so."""
    from splitserve.models import build_codec
    from splitserve.training.optim import entropy_model_params

    ckpt = torch.load(joint.parent / "joint.runs" / "train" / "checkpoint" / "last.pt", weights_only=False)
    opts = ckpt["optimizers"]
    assert set(opts) == {"main", "aux", "prior"}
    codec = build_codec("rac", blocks=0, rates=2)
    entropy = entropy_model_params(codec)
    (group,) = opts["prior"]["param_groups"]
    assert len(group["params"]) == len(entropy)
    # the cosine schedule ran over it: 2 steps of 2, down to --min-lr-ratio (0.01) as main's lr (0.01)
    assert group["initial_lr"] == 0.002 and group["lr"] == pytest.approx(0.002 * 0.01)
    assert opts["main"]["param_groups"][0]["lr"] == pytest.approx(0.01 * 0.01)
    from splitserve.bundle import read_manifest

    assert read_manifest(joint).provenance["prior_lr"] == 0.002
    # both rates' densities stepped at every step (the rate not drawn fits its prior too); a gain
    # steps only when its rate is drawn
    densities = sum(p.numel() for name, p in codec.named_parameters() if name.startswith("priors.")
                    and not name.endswith("quantiles"))
    stepped = [s for s in opts["prior"]["state"].values() if s["step"] == 2]
    assert sum(s["exp_avg"].numel() for s in stepped) >= densities


def test_the_joint_bundle_serves_both_heads(joint, scenes):
    test_the_multi_teacher_bundle_serves_both_heads({"half": joint}, scenes)
