"""Training commands end to end on fmnist-scenes (ResNet-18, 64×64, a few dozen real images).

teacher → distill → finetune (cls, det, seg) → the bundle serves all three tasks through the
gateway runtime from real payload bytes; plus loss decrease, exact resume after an interruption,
SIGTERM handling, recipes and one-line errors.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from splitserve.cli import main

from .helpers import sigterm_group_during

pytestmark = pytest.mark.slow

FAST = ["--num-workers", "0", "--no-progress", "--no-tensorboard", "--batch-size", "8"]


def default_bundle_path_under(home: Path) -> Path:
    from splitserve.defaults import default_bundle_name

    return home / "bundles" / default_bundle_name()


# distill/train refit the entropy model after training (--refit-steps, default 300): tests that are not
# about it turn it off to stay fast; the variable-rate runs and the chain's distill keep it
NO_REFIT = ("--refit-steps", "0")


def run(*args: str) -> None:
    code = main([str(a) for a in args])
    assert code == 0, f"platform {' '.join(map(str, args))} exited {code}"


@pytest.fixture(scope="module")
def scenes(tmp_path_factory) -> Path:
    from splitserve.data import make_fmnist_scenes

    out = tmp_path_factory.mktemp("data") / "fm"
    make_fmnist_scenes(out, train_scenes=32, val_scenes=16, image_size=64, seed=0, progress=False)
    return out


@pytest.fixture(scope="module")
def chain(scenes, tmp_path_factory) -> dict:
    """The whole pipeline, run once through the CLI; tests below inspect what it produced."""
    root = tmp_path_factory.mktemp("chain")
    t_cls, t_det, t_seg = root / "teacher-cls", root / "teacher-det", root / "teacher-seg"
    bundle = root / "bundle"
    small = ["--arch", "resnet18", "--image-size", "64", *FAST]
    run("teacher", "--task", "cls", "--data", scenes, "--out", t_cls, "--epochs", "1", *small)
    run("teacher", "--task", "det", "--data", scenes, "--out", t_det, "--epochs", "1", "--train-limit", "8",
        "--val-limit", "4", *small)
    run("teacher", "--task", "seg", "--data", scenes, "--out", t_seg, "--epochs", "1", "--train-limit", "8",
        "--val-limit", "4", "--head-config", "output_stride=8", "atrous_rates=[1,2,3]", *small)
    run("distill", "--encoder", "entropic_student", "--teacher", t_cls, "--data", scenes, "--beta", "0.1",
        "--out", bundle, "--epochs", "2", "--log-every", "1", *FAST)
    distilled = json.loads((bundle / "manifest.json").read_text())
    run("finetune", "--task", "classification", "--bundle", bundle, "--teacher", t_cls, "--data", scenes,
        "--epochs", "1", *FAST)
    run("finetune", "--task", "det", "--bundle", bundle, "--teacher", t_det, "--coco", scenes / "coco",
        "--epochs", "1", "--train-limit", "8", "--val-limit", "8", *FAST)
    run("finetune", "--task", "seg", "--bundle", bundle, "--teacher", t_seg, "--data", scenes,
        "--epochs", "1", "--train-limit", "8", "--val-limit", "8", *FAST)
    return {"root": root, "bundle": bundle, "teacher_cls": t_cls, "teacher_det": t_det, "teacher_seg": t_seg,
            "distilled": distilled}


def test_teacher_directory(chain):
    t = chain["teacher_cls"]
    meta = json.loads((t / "teacher.json").read_text())
    assert meta["task"] == "classification" and meta["arch"] == "resnet18"
    assert meta["config"]["num_classes"] == 10 and len(meta["config"]["labels"]) == 10
    assert "top1" in meta["metrics"]
    assert sorted(p.name for p in t.glob("*.safetensors")) == ["head.safetensors", "stem.safetensors"]
    assert not list(t.rglob("*.pt")), "a finished run leaves no pickle checkpoint behind"
    assert (t / "metrics.jsonl").is_file() and (t / "train.csv").is_file() and (t / "val.csv").is_file()


def test_head_config_reaches_teacher_and_bundle(chain):
    """teacher --head-config sets the teacher's geometry; finetune from that teacher inherits it."""
    from splitserve.bundle import read_manifest

    meta = json.loads((chain["teacher_seg"] / "teacher.json").read_text())
    stored = read_manifest(chain["bundle"]).tasks["segmentation"].config
    for cfg in (meta["config"], stored):
        assert (cfg["output_stride"], cfg["atrous_rates"], cfg["num_classes"]) == (8, [1, 2, 3], 11)


def test_chain_bundle_serves_three_tasks(chain, scenes):
    from splitserve.bundle import read_manifest
    from splitserve.edge import EdgeEncoder
    from splitserve.gateway.runtime import Job, Runtime
    from splitserve.plugins import PluginRegistry

    bundle = chain["bundle"]
    manifest = read_manifest(bundle)
    assert set(manifest.tasks) == {"classification", "detection", "segmentation"}
    # finetune never touches the encoder or the prior
    assert manifest.fingerprint == chain["distilled"]["fingerprint"]
    for name in ("encoder", "prior"):
        assert manifest.files[name].sha256 == chain["distilled"]["files"][name]["sha256"]
    # stage 2 trains decoder + head by default, as both papers do
    assert manifest.files["decoder"].sha256 != chain["distilled"]["files"]["decoder"]["sha256"]
    assert {"bpp", "payload_bpp", "bpp_estimate", "distill_loss"} <= set(manifest.metrics)
    assert 0 < manifest.metrics["bpp"] < manifest.metrics["payload_bpp"]
    assert "beta" in manifest.provenance and "platform distill" in manifest.provenance["command"]
    for task, metric in (("classification", "top1"), ("detection", "mAP"), ("segmentation", "mIoU")):
        entry = manifest.tasks[task]
        assert metric in entry.metrics and entry.provenance["stage"].startswith("finetune")
    assert manifest.tasks["classification"].provenance["distillation"] is True
    # detection and segmentation losses have no distillation term: their teachers start the heads
    # (no teacher forward pass per step) and are measured next to them
    for task, metric in (("detection", "mAP"), ("segmentation", "mIoU")):
        entry = manifest.tasks[task]
        assert entry.provenance["distillation"] is False and entry.provenance["init"].startswith("teacher head")
        assert f"teacher_{metric}" in entry.metrics
    assert manifest.tasks["classification"].config["labels"][0] == "ankle_boot"

    images = sorted((scenes / "imagefolder" / "val").rglob("*.png"))[:3] + sorted((scenes / "coco" / "val2017").glob("*.jpg"))[:1]
    assert len(images) == 4
    encoded = EdgeEncoder.from_bundle(bundle).encode(images)
    runtime = Runtime(bundle, PluginRegistry.discover())
    payload, metas = runtime.parse_payload(encoded.data)
    results = runtime.run([Job(plugins=list(runtime.plugins), payload=payload, metas=metas)])
    assert len(results) == 1 and len(results[0]) == 4
    for answer in results[0]:
        assert set(answer) == {"classification", "detection", "segmentation"}
        top = answer["classification"].top
        assert len(top) == 5 and all(s.label in manifest.tasks["classification"].config["labels"] for s in top)
        assert isinstance(answer["detection"].detections, list)
        seg = answer["segmentation"]
        assert (seg.width, seg.height) == (64, 64) and seg.mask


def test_distill_loss_decreases(chain):
    log = chain["bundle"].parent / "bundle.runs" / "distill" / "metrics.jsonl"
    records = [json.loads(line) for line in log.read_text().splitlines()]
    train = [r["loss"] for r in records if r["kind"] == "train"]
    assert len(train) == 8  # 32 images / batch 8 × 2 epochs, logged every step
    assert sum(train[-2:]) / 2 < 0.95 * sum(train[:2]) / 2
    val = [r for r in records if r["kind"] == "val"]
    # the coded rate the prior learns carries over to val; val distortion after 8 steps on
    # RandomResizedCrop(0.08, 1) crops of 32 images is not monotone on the whole val images
    assert len(val) == 3 and val[1]["bpp"] < val[0]["bpp"] and val[1]["distill_loss"] < 1e6
    # the third: the written weights, measured again after the entropy model's refit (--refit-steps)
    # codes the same latent in fewer bits
    assert val[2]["global_step"] == val[1]["global_step"] and val[2]["bpp"] < val[1]["bpp"], val
    refit = json.loads((chain["bundle"] / "manifest.json").read_text())["provenance"]["prior_refit"]
    assert refit["bits_after"] < refit["bits_before"] and refit["steps"] == 40  # 10 passes over 4 batches
    assert {"bpp", "images_per_s", "lr"} <= set(next(r for r in records if r["kind"] == "train"))


def _codec_tensors(bundle: Path) -> dict[str, torch.Tensor]:
    out = {}
    for part in ("encoder", "prior", "decoder"):
        out.update({f"{part}.{k}": v for k, v in load_file(bundle / f"{part}.safetensors").items()})
    return out


def test_resume_is_exact(chain, scenes, tmp_path):
    """Stop after 3 of 4 steps (mid-epoch 2), resume, and land on the uninterrupted weights."""
    common = ["distill", "--teacher", chain["teacher_cls"], "--data", scenes, "--beta", "0.2", "--epochs", "2",
              "--train-limit", "16", "--val-limit", "4", "--seed", "3", "--log-every", "1", *FAST, *NO_REFIT]
    run(*common, "--out", tmp_path / "straight")
    work = tmp_path / "work"
    run(*common, "--out", tmp_path / "resumed", "--workdir", work, "--max-steps", "3")
    ckpt = torch.load(work / "checkpoint" / "last.pt", weights_only=True)
    assert (ckpt["epoch"], ckpt["batch"], ckpt["global_step"]) == (1, 1, 3)
    code = main([str(a) for a in (*common, "--out", tmp_path / "resumed", "--workdir", work, "--resume",
                                  "--lr", "0.01")])
    assert code == 2  # a checkpoint made with other settings is refused, not silently mixed
    run(*common, "--out", tmp_path / "resumed", "--workdir", work, "--resume")
    a, b = _codec_tensors(tmp_path / "straight"), _codec_tensors(tmp_path / "resumed")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    steps = [json.loads(line)["global_step"] for line in (work / "metrics.jsonl").read_text().splitlines()
             if json.loads(line)["kind"] == "train"]
    assert steps == [1, 2, 3, 4]


def _sigterm_then_init(worker_id: int) -> None:
    """A group SIGTERM that reaches a worker before its own handlers are set (torch's kill it)."""
    from splitserve.training.stopping import worker_init

    os.kill(os.getpid(), signal.SIGTERM)
    worker_init(worker_id)


def test_loader_workers_survive_a_sigterm_at_start():
    from splitserve.training.stopping import StopSafeLoader

    handler, mask = signal.getsignal(signal.SIGTERM), signal.pthread_sigmask(signal.SIG_BLOCK, set())
    loader = StopSafeLoader(list(range(6)), batch_size=2, num_workers=2, worker_init_fn=_sigterm_then_init)
    for _ in range(2):  # workers start afresh with every iteration, as with every epoch
        assert [b.tolist() for b in loader] == [[0, 1], [2, 3], [4, 5]]
    # the main process's handling is untouched
    assert signal.getsignal(signal.SIGTERM) is handler and signal.pthread_sigmask(signal.SIG_BLOCK, set()) == mask


def test_sigterm_saves_checkpoint_and_resumes(chain, scenes, tmp_path):
    """SIGTERM to the whole process group (as timeout or systemd send it), data-loading worker included."""
    work, out = tmp_path / "work", tmp_path / "bundle"
    args = ["distill", "--teacher", str(chain["teacher_cls"]), "--data", str(scenes), "--beta", "0.1",
            "--epochs", "50", "--train-limit", "16", "--val-limit", "4", "--log-every", "1", "--workdir", str(work),
            "--out", str(out), *FAST, "--num-workers", "1", *NO_REFIT]
    log = work / "metrics.jsonl"
    code, err = sigterm_group_during(args, log, 2)
    assert code == 128 + signal.SIGTERM, err
    assert "stopped by SIGTERM" in err and "--resume" in err
    assert not out.exists(), "an interrupted run writes no bundle"
    ckpt = torch.load(work / "checkpoint" / "last.pt", weights_only=True)
    step = ckpt["global_step"]
    assert step >= 2
    run(*args, "--resume", "--max-steps", str(step + 1))
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["global_step"] for r in records if r["kind"] == "train"][-1] == step + 1
    assert (out / "manifest.json").is_file()


def test_a_run_killed_while_writing_its_outputs_resumes_without_training(chain, scenes, tmp_path, monkeypatch,
                                                                         capsys):
    """The checkpoint outlives the training until the outputs are written: a crash there (here a
    full disk while the head is stored) costs no epochs; --resume only writes the outputs."""
    import shutil

    import splitserve.training.finetune as finetune

    bundle, work = tmp_path / "bundle", tmp_path / "work"
    shutil.copytree(chain["bundle"], bundle)
    args = ["finetune", "--task", "cls", "--bundle", bundle, "--teacher", chain["teacher_cls"], "--data", scenes,
            "--epochs", "2", "--train-limit", "16", "--val-limit", "4", "--log-every", "1", "--workdir", work, *FAST]
    write = finetune.update_heads

    def disk_full(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(finetune, "update_heads", disk_full)
    with pytest.raises(OSError):
        main([str(a) for a in args])
    trained = [json.loads(line) for line in (work / "metrics.jsonl").read_text().splitlines()]
    assert (work / "checkpoint" / "last.pt").is_file()
    monkeypatch.setattr(finetune, "update_heads", write)
    capsys.readouterr()
    run(*args, "--resume")
    assert "holds the finished run (step 4); writing its outputs" in capsys.readouterr().out
    records = [json.loads(line) for line in (work / "metrics.jsonl").read_text().splitlines()]
    assert [r for r in records if r["kind"] == "train"] == [r for r in trained if r["kind"] == "train"]
    prov = json.loads((bundle / "manifest.json").read_text())["tasks"]["classification"]["provenance"]
    assert prov["steps"] == 4
    assert not (work / "checkpoint").exists(), "written outputs: the checkpoint goes"


def test_finetune_from_teacher_replaces_the_bundles_head(chain, scenes, tmp_path, capsys):
    """--from-teacher starts from the same-task teacher's head although the bundle has one (the
    default starts from the bundle's); it refuses a teacher of another task."""
    import shutil

    from splitserve.bundle import load_head, read_manifest
    from splitserve.plugins import PluginRegistry
    from splitserve.training.teacher import load_teacher

    bundle = tmp_path / "bundle"
    shutil.copytree(chain["bundle"], bundle)
    common = ["finetune", "--task", "det", "--bundle", bundle, "--coco", scenes / "coco", "--epochs", "0",
              "--val-limit", "4", "--freeze-decoder", "--workdir", tmp_path / "work", *FAST]
    assert main([*map(str, common), "--teacher", str(chain["teacher_cls"]), "--from-teacher"]) == 2
    assert "--from-teacher needs --teacher DIR of a detection teacher" in capsys.readouterr().err
    run(*common, "--teacher", chain["teacher_det"], "--from-teacher")
    manifest = read_manifest(bundle)
    assert manifest.tasks["detection"].provenance["init"] == f"teacher head ({chain['teacher_det']})"
    plugin = PluginRegistry.discover().get("detection")
    head = load_head(bundle, "detection", plugin.build_head(manifest.backbone, plugin.resolve_config(
        manifest.backbone, manifest.tasks["detection"].config)), manifest)
    teacher = load_teacher(chain["teacher_det"], PluginRegistry.discover())
    for (name, ours), theirs in zip(head.state_dict().items(), teacher.head.state_dict().values()):
        assert torch.equal(ours, theirs), name  # 0 epochs: the teacher's head as it is


def test_torchrun_two_processes(chain, scenes, tmp_path):
    """DDP on the CPU (gloo): two ranks fine-tune one head; rank 0 alone writes the bundle."""
    import shutil

    bundle = tmp_path / "bundle"
    shutil.copytree(chain["bundle"], bundle)
    before = json.loads((bundle / "manifest.json").read_text())
    work = tmp_path / "work"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "splitserve", "finetune", "--task", "cls", "--bundle", str(bundle), "--teacher",
           str(chain["teacher_cls"]), "--data", str(scenes), "--epochs", "1", "--train-limit", "16",
           "--val-limit", "8", "--log-every", "1", "--workdir", str(work), "--keep-checkpoint",
           "--num-workers", "0", "--no-progress", "--no-tensorboard", "--batch-size", "4"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    after = json.loads((bundle / "manifest.json").read_text())
    assert after["fingerprint"] == before["fingerprint"]
    assert after["tasks"]["classification"]["file"]["sha256"] != before["tasks"]["classification"]["file"]["sha256"]
    steps = [json.loads(line) for line in (work / "metrics.jsonl").read_text().splitlines()]
    # 16 images over 2 ranks × batch 4 = 2 steps; 8 images per step (both ranks) are counted
    assert [r["global_step"] for r in steps if r["kind"] == "train"] == [1, 2]
    assert sorted(p.name for p in (work / "checkpoint").iterdir()) == ["last.pt"]  # one save: the epoch's end
    rng = torch.load(work / "checkpoint" / "last.pt", weights_only=True)["rng"]  # every rank's, in one file
    assert len(rng) == 2 and not torch.equal(rng[0]["torch"], rng[1]["torch"])
    assert proc.stdout.count("updated ") == 1  # only rank 0 writes


def test_train_cls_fixed_keeps_teacher_classifier(chain, scenes, tmp_path):
    out = tmp_path / "rac"
    run("train", "--cls-fixed", "--encoder", "rac", "--blocks", "0", "--teacher", chain["teacher_cls"],
        "--data", scenes, "--lmbda", "0.5", "--out", out, "--epochs", "1", "--train-limit", "16", "--val-limit", "8",
        *FAST, *NO_REFIT)
    from splitserve.bundle import read_manifest

    manifest = read_manifest(out)
    assert manifest.codec.family == "rac" and manifest.codec.config["blocks"] == 0
    assert {"top1", "teacher_top1"} <= set(manifest.tasks["classification"].metrics)
    head = load_file(out / "heads" / "classification.safetensors")
    teacher = load_file(chain["teacher_cls"] / "head.safetensors")
    assert head.keys() == teacher.keys() and all(torch.equal(head[k], teacher[k]) for k in head)

    joint = tmp_path / "rac-joint"
    run("train", "--joint", "--encoder", "rac", "--blocks", "0", "--teacher", chain["teacher_cls"],
        "--data", scenes, "--lmbda", "0.5", "--out", joint, "--epochs", "1", "--train-limit", "16", "--val-limit", "8",
        "--log-every", "1", *FAST, *NO_REFIT)
    head = load_file(joint / "heads" / "classification.safetensors")
    assert not torch.equal(head["fc.weight"], teacher["fc.weight"])  # --joint trains the classifier
    log = joint.parent / "rac-joint.runs" / "train" / "metrics.jsonl"
    first = json.loads(log.read_text().splitlines()[0])
    assert {"rate", "feature_mse", "ce", "kd", "prior_aux", "bpp"} <= set(first)

    # weight decay (1e-4, the reference's) on the head's conv/linear weights only: not the codec, biases or BN
    work = tmp_path / "wd"
    run("train", "--joint", "--encoder", "rac", "--blocks", "0", "--teacher", chain["teacher_cls"],
        "--data", scenes, "--lmbda", "0.5", "--out", tmp_path / "rac-wd", "--epochs", "1", "--train-limit", "16",
        "--val-limit", "8", "--max-steps", "1", "--workdir", work, *FAST, *NO_REFIT)
    groups = torch.load(work / "checkpoint" / "last.pt", weights_only=True)["optimizers"]["main"]["param_groups"]
    decays = [(g["weight_decay"], len(g["params"])) for g in groups]
    from splitserve.models import build_codec

    codec_params = sum(1 for n, _ in build_codec("rac", blocks=0, feature_channels=64).named_parameters()
                       if not n.endswith("quantiles"))
    params = {k: v for k, v in teacher.items() if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))}
    n_weights = sum(1 for v in params.values() if v.ndim > 1)  # conv + fc weights of layer2..4 + fc
    assert decays == [(0.0, codec_params), (1e-4, n_weights), (0.0, len(params) - n_weights)]


def test_teacher_from_torchvision_checkpoint(scenes, tmp_path):
    import torchvision

    torch.manual_seed(5)
    model = torchvision.models.resnet18(num_classes=10)
    torch.save({"model": model.state_dict(), "epoch": 3}, tmp_path / "model.pth")
    out = tmp_path / "teacher"
    run("teacher", "--task", "cls", "--data", scenes, "--arch", "resnet18", "--checkpoint", tmp_path / "model.pth",
        "--epochs", "0", "--image-size", "64", "--val-limit", "8", "--out", out, *FAST)
    stem = load_file(out / "stem.safetensors")
    head = load_file(out / "head.safetensors")
    assert torch.equal(stem["0.weight"], model.conv1.weight)
    assert torch.equal(stem["4.1.conv2.weight"], model.layer1[1].conv2.weight)
    assert torch.equal(head["tail.layer4.1.bn2.running_var"], model.layer4[1].bn2.running_var)
    assert torch.equal(head["fc.weight"], model.fc.weight)


@pytest.mark.parametrize("source", ["flags", "recipe"])
def test_provenance_command_line_runs_again(tmp_path, source):
    """The command a bundle or teacher records parses back to the same settings, KEY=VALUE lists included."""
    import shlex

    from splitserve.cli import build_parser
    from splitserve.cli.finetune import OPTIONS
    from splitserve.training.options import command_line, resolve

    head = ["fpn_channels=64", "anchor_sizes=[8, 16]", "name=a b", "flag=yes"]
    if source == "flags":
        argv = ["finetune", "--bundle", "b", "--data", "d", "--task", "det", "--head-config", *head,
                "--milestones", "2", "3", "--option", "aux_weight=0.5"]
    else:
        recipe = tmp_path / "r.yaml"
        recipe.write_text("command: finetune\ntask: det\nhead_config: {fpn_channels: 64, anchor_sizes: [8, 16], "
                          "name: a b, flag: 'yes'}\nmilestones: [2, 3]\noption: {aux_weight: 0.5}\n")
        argv = ["finetune", "--recipe", str(recipe), "--bundle", "b", "--data", "d"]
    cfg = resolve(build_parser().parse_args(argv), OPTIONS, "finetune")
    line = command_line(cfg, OPTIONS, "finetune")
    again = resolve(build_parser().parse_args(shlex.split(line)[1:]), OPTIONS, "finetune")
    assert dict(again.head_config) == dict(cfg.head_config) == {
        "fpn_channels": 64, "anchor_sizes": [8, 16], "name": "a b", "flag": source == "flags" or "yes"}
    assert dict(again.option) == {"aux_weight": 0.5} and again.milestones == [2, 3]


def test_recipes_resolve_and_flags_override(tmp_path):
    from splitserve.cli import build_parser
    from splitserve.training.options import resolve

    recipe = tmp_path / "r.yaml"
    recipe.write_text("command: distill\nteacher: /t\ndata: /d\nout: /o\nbeta: 0.32\nepochs: 3\n"
                      "milestones: [1, 2]\nimage-size: 64\nnotes: anything\n")
    args = build_parser().parse_args(["distill", "--recipe", str(recipe), "--epochs", "7"])
    from splitserve.cli.distill import OPTIONS

    cfg = resolve(args, OPTIONS, "distill")
    assert (cfg.beta, cfg.epochs, cfg.milestones, cfg.image_size) == (0.32, 7, [1, 2], [64])
    assert cfg.lr == 1e-3 and cfg.batch_size == 64  # built-in defaults (the paper's)

    import importlib

    shipped = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.yaml"))
    assert len(shipped) >= 6
    import yaml

    for path in shipped:
        command = yaml.safe_load(path.read_text())["command"]
        module = importlib.import_module(f"splitserve.cli.{command}")
        extra = {"distill": ["--teacher", "t", "--data", "d", "--out", "o"],
                 "finetune": ["--bundle", "b", "--data", "d"],
                 "train": ["--teacher", "t", "--data", "d", "--out", "o"],
                 "teacher": ["--data", "d", "--out", "o"]}[command]
        args = build_parser().parse_args([command, "--recipe", str(path), *extra])
        resolve(args, module.OPTIONS, command)  # raises on an unknown key or a bad value


def _one_line_error(capsys, *args) -> str:
    code = main([str(a) for a in args])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def test_errors_are_one_line(capsys, tmp_path, scenes):
    err = _one_line_error(capsys, "teacher", "--task", "cls", "--data", tmp_path / "nope", "--out", tmp_path / "t",
                          "--arch", "resnet18", *FAST)
    assert "nope" in err

    broken = tmp_path / "coco"
    (broken / "annotations").mkdir(parents=True)
    (broken / "train2017").mkdir()
    (broken / "val2017").mkdir()
    (broken / "annotations" / "instances_train2017.json").write_text('{"images": [')
    err = _one_line_error(capsys, "teacher", "--task", "det", "--data", broken, "--out", tmp_path / "t",
                          "--arch", "resnet18", *FAST)
    assert "instances_train2017.json" in err and "JSON" in err

    recipe = tmp_path / "bad.yaml"
    recipe.write_text("beta: 0.1\nbatchsize: 8\n")
    err = _one_line_error(capsys, "distill", "--recipe", recipe, "--teacher", tmp_path, "--data", scenes,
                          "--out", tmp_path / "b")
    assert "batchsize" in err

    err = _one_line_error(capsys, "distill", "--teacher", tmp_path / "missing-teacher", "--data", scenes,
                          "--beta", "0.1", "--out", tmp_path / "b")
    assert "missing-teacher" in err

    err = _one_line_error(capsys, "distill", "--data", scenes, "--beta", "0.1", "--out", tmp_path / "b")
    assert "--teacher" in err

    import argparse

    evil = tmp_path / "evil.pth"
    torch.save({"model": argparse.Namespace(a=1)}, evil)  # pickled objects are not weights
    err = _one_line_error(capsys, "teacher", "--task", "cls", "--data", scenes, "--checkpoint", evil,
                          "--out", tmp_path / "t", "--arch", "resnet18", "--epochs", "0", *FAST)
    assert "weights-only" in err

    from splitserve.defaults import build_untrained_bundle

    bundle = build_untrained_bundle(tmp_path / "cls-only", input_size=(64, 64), tasks=["cls"])
    err = _one_line_error(capsys, "finetune", "--task", "det", "--bundle", bundle, "--coco", scenes / "coco", *FAST)
    assert "no 'detection' head" in err and "--teacher" in err


def test_serving_path_accuracy_matches_training_validation(chain, scenes, capsys):
    """`bench e2e` sends each val image alone through payload → gateway runtime; its top-1 must be the
    one finetune recorded (same preprocessing, same rounding), so training numbers are serving numbers."""
    capsys.readouterr()
    run("bench", "e2e", "--bundle", chain["bundle"], "--data", scenes, "--teacher", chain["teacher_cls"])
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if "via payload" in line)
    top1 = float(row.split("|")[2])
    manifest = json.loads((chain["bundle"] / "manifest.json").read_text())
    recorded = manifest["tasks"]["classification"]["metrics"]["top1"]
    assert abs(top1 - recorded) <= 100 / 16 + 1e-6  # 16 val images: at most one flips on float noise
    assert "teacher `teacher-cls`" in out


def test_finetune_detection_on_a_coco_tree_with_the_default_bundle(scenes, tmp_path):
    """The issue's command as typed — `platform finetune --task detection --coco DIR` — on a COCO 2017
    tree (annotations/instances_{train,val}2017.json, train2017/, val2017/), no --bundle: it updates
    the default bundle (here in an isolated $SPLITSERVE_HOME) and keeps its fingerprint."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "SPLITSERVE_HOME": str(tmp_path / "home")}
    env.pop("SPLITSERVE_BUNDLE", None)
    cmd = [sys.executable, "-m", "splitserve", "finetune", "--task", "detection", "--coco", str(scenes / "coco"),
           "--epochs", "1", "--train-limit", "4", "--val-limit", "2", "--batch-size", "2", "--num-workers", "0",
           "--no-progress"]
    from splitserve.defaults import PACKAGED_BUNDLE

    shipped = (PACKAGED_BUNDLE / "manifest.json").read_text()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (PACKAGED_BUNDLE / "manifest.json").read_text() == shipped  # the user's copy changed, not the package
    bundle = default_bundle_path_under(tmp_path / "home")
    assert f"updating {bundle}" in proc.stdout
    manifest = json.loads((bundle / "manifest.json").read_text())
    det = manifest["tasks"]["detection"]
    assert "mAP" in det["metrics"] and det["provenance"]
    from splitserve.bundle import load_codec

    assert load_codec(bundle).fingerprint() == manifest["fingerprint"]


def test_joint_resume_is_exact_with_a_per_step_schedule(chain, scenes, tmp_path):
    """`train --joint` steps its cosine schedule every step: a resumed run must restore it exactly."""
    common = ["train", "--joint", "--encoder", "rac", "--blocks", "0", "--teacher", chain["teacher_cls"],
              "--data", scenes, "--lmbda", "0.5", "--epochs", "2", "--train-limit", "24", "--val-limit", "4",
              "--seed", "5", "--log-every", "1", "--lr", "0.05", *FAST, *NO_REFIT]
    run(*common, "--out", tmp_path / "straight")
    work = tmp_path / "work"
    run(*common, "--out", tmp_path / "resumed", "--workdir", work, "--max-steps", "3")
    run(*common, "--out", tmp_path / "resumed", "--workdir", work, "--resume")
    a, b = _codec_tensors(tmp_path / "straight"), _codec_tensors(tmp_path / "resumed")
    for k in a:
        assert torch.equal(a[k], b[k]), k
    lrs = [json.loads(line)["lr"] for line in (work / "metrics.jsonl").read_text().splitlines()
           if json.loads(line)["kind"] == "train"]
    assert len(lrs) == 6 and lrs == sorted(lrs, reverse=True) and lrs[0] > lrs[-1]  # cosine, per step


def test_finetune_with_a_teacher_logs_a_distillation_term(chain):
    """KD is on when finetune is given a teacher of the task: the kd term is logged and positive."""
    work = Path(str(chain["bundle"]) + ".runs") / "finetune-classification"
    records = [json.loads(line) for line in (work / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    assert train and all("kd" in r and r["kd"] > 0 for r in train)


def test_cpu_bf16_autocast_trains_in_bf16_and_keeps_the_prior_in_fp32(chain, scenes, tmp_path, capsys):
    """--amp bf16 on the CPU really autocasts (the weights differ from an fp32 run of the same seed),
    the entropy model still trains in fp32, and --amp fp16 is refused in one line."""
    common = ["distill", "--teacher", chain["teacher_cls"], "--data", scenes, "--beta", "0.2", "--epochs", "1",
              "--train-limit", "8", "--val-limit", "4", "--seed", "5", *FAST, *NO_REFIT]
    run(*common, "--out", tmp_path / "fp32", "--amp", "off")
    run(*common, "--out", tmp_path / "bf16", "--amp", "bf16")
    a, b = _codec_tensors(tmp_path / "fp32"), _codec_tensors(tmp_path / "bf16")
    assert all(t.dtype == torch.float32 for t in b.values() if t.is_floating_point())  # weights stay fp32
    changed = [k for k in a if not torch.equal(a[k], b[k])]
    assert any(k.startswith("encoder.") for k in changed)
    rate = json.loads((tmp_path / "bf16" / "manifest.json").read_text())["metrics"]
    assert 0 < rate["bpp"] < 64
    err = _one_line_error(capsys, *common, "--out", tmp_path / "fp16", "--amp", "fp16")
    assert "--amp fp16 needs a CUDA device" in err


def test_teacher_starts_from_another_tasks_teacher(chain, scenes, tmp_path):
    """--checkpoint DIR takes a classification teacher's ResNet into a detection teacher (stem and
    layer2..4 equal, value for value), as torchvision detectors start from ImageNet backbones."""
    from splitserve.plugins import PluginRegistry
    from splitserve.training.teacher import load_teacher

    out = tmp_path / "det-from-cls"
    run("teacher", "--task", "det", "--data", scenes, "--out", out, "--checkpoint", chain["teacher_cls"],
        "--arch", "resnet18", "--image-size", "64", "--epochs", "0", "--val-limit", "4", *FAST)
    registry = PluginRegistry.discover()
    cls, det = load_teacher(chain["teacher_cls"], registry), load_teacher(out, registry)
    for a, b in ((cls.stem.state_dict(), det.stem.state_dict()), (cls.head.tail.state_dict(), det.head.tail.state_dict())):
        assert len(b) > 20 and set(b) <= set(a)  # detection's FrozenBatchNorm has no num_batches_tracked
        assert all(torch.equal(a[k], b[k]) for k in b)
