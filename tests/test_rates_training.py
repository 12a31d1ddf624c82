"""Variable-rate training on a tiny fmnist-scenes tree (ResNet-18 teachers, 32-64 px, real images):
``distill --betas`` writes a bundle whose rates code at increasing bytes; the rate drawn for each
step resumes exactly after a SIGKILL; ``finetune`` on a variable-rate bundle trains its head at
every rate and leaves encoder, priors and gains as they were; the rates a manifest states are the
ones ``platform evaluate`` measures, image by image, unpadded."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

from splitserve.bundle import load_codec, read_manifest
from splitserve.cli import main

from .test_training import FAST, NO_REFIT, _codec_tensors, run, scenes  # noqa: F401 (scenes is a fixture)

pytestmark = pytest.mark.slow

BETAS = "0.01,1,0.1"  # in no order: rate 0 gets the largest beta
# 16 images in batches of 4 for 3 epochs: 12 steps, a checkpoint after each. At a learning rate
# of 0.01 (gradients clipped) the encoder's latents grow past the quantisation step within these
# steps, so the rates' gains (0.5x … 2x) show in the bytes.
VR = ["--betas", BETAS, "--image-size", "32", "--lr", "0.01", "--clip-grad", "1", "--train-limit", "16",
      "--epochs", "3", "--log-every", "1", "--checkpoint-every", "1", *FAST, "--batch-size", "4"]


def records(log: Path, kind: str = "train") -> list[dict]:
    return [r for r in map(json.loads, log.read_text().splitlines()) if r["kind"] == kind]


@pytest.fixture(scope="module")
def teacher(scenes, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("vr-teacher") / "cls"
    run("teacher", "--task", "cls", "--data", scenes, "--out", out, "--arch", "resnet18", "--image-size", "64",
        "--epochs", "0", "--val-limit", "4", *FAST)
    return out


@pytest.fixture(scope="module")
def vr_bundle(teacher, scenes, tmp_path_factory) -> Path:
    """A 3-rate Entropic Student bundle from one uninterrupted run."""
    out = tmp_path_factory.mktemp("vr") / "es-vr3"
    run("distill", "--teacher", teacher, "--data", scenes, *VR, "--out", out)
    return out


def test_distill_betas_writes_k_rates_at_increasing_bytes(vr_bundle):
    manifest = read_manifest(vr_bundle)
    assert manifest.codec.config["rates"] == 3 and load_codec(vr_bundle).rates == 3
    assert [r.beta for r in manifest.rates] == [1.0, 0.1, 0.01]  # rate 0: the largest beta, the smallest payload
    sizes = [r.bytes_per_image for r in manifest.rates]
    assert sizes[0] < sizes[1] < sizes[2], sizes
    assert [r.bpp for r in manifest.rates] == pytest.approx([8 * s / (32 * 32) for s in sizes])  # over the input
    assert manifest.default_rate == 2 and manifest.metrics["bytes"] == sizes[2]
    assert manifest.provenance["betas"] == [1.0, 0.1, 0.01]
    # every step logs the rate it drew and that rate's weighted rate term, for curves per rate
    train = records(vr_bundle.parent / f"{vr_bundle.name}.runs" / "distill" / "metrics.jsonl")
    assert len(train) == 12 and {r["rate_index"] for r in train} == {0.0, 1.0, 2.0}
    for r in train:
        k = int(r["rate_index"])
        assert r[f"rate_r{k}"] == r["rate"] and r[f"bpp_r{k}"] == r["bpp"]
        assert not any(f"rate_r{j}" in r for j in range(3) if j != k)
        # the two rates not drawn fit their priors to the step's latent, and that is part of the loss
        assert r["prior_fit"] > 0 and r["loss"] == pytest.approx(r["distill"] + r["rate"] + r["prior_fit"], rel=1e-5)


def test_distill_prior_shared_trains_one_density_for_every_rate(teacher, scenes, tmp_path):
    """``--prior shared``: the same run with one prior that every rate reads at its own step. The
    manifest names the variant, the bundle rebuilds it (same fingerprint), and its rates code at
    increasing bytes through the same coder."""
    out = tmp_path / "es-vr3-shared"
    run("distill", "--teacher", teacher, "--data", scenes, *VR, "--prior", "shared", "--out", out,
        "--prior-lr", "0.002", "--keep-checkpoint")
    manifest = read_manifest(out)
    assert manifest.codec.config["rates"] == 3 and manifest.codec.config["prior"] == "shared"
    codec = load_codec(out)
    assert type(codec.priors).__name__ == "SharedPrior" and codec.fingerprint() == manifest.fingerprint
    sizes = [r.bytes_per_image for r in manifest.rates]
    assert sizes[0] < sizes[1] < sizes[2], sizes
    assert "--prior shared" in manifest.provenance["command"]
    # one density learns at every step already: nothing else to fit
    assert not any("prior_fit" in r for r in records(out.parent / f"{out.name}.runs" / "distill" / "metrics.jsonl"))
    # --prior-lr: the density and the gains on their own Adam, the encoder and decoder not
    ckpt = out.parent / f"{out.name}.runs" / "distill" / "checkpoint" / "last.pt"
    opts = torch.load(ckpt, weights_only=False)["optimizers"]
    (group,) = opts["prior"]["param_groups"]
    density = codec.priors.density
    # matrices, biases, factors; 3 gains and 3 inverse gains
    assert group["initial_lr"] == 0.002
    assert len(group["params"]) == 2 * len(density.matrices) + len(density.factors) + 2 * 3
    assert manifest.provenance["prior_lr"] == 0.002  # set in the command here, but a recipe may set it unseen


@pytest.mark.parametrize("command, rate", [(["distill"], "--beta"), (["train", "--joint"], "--lmbda")])
def test_prior_shared_needs_several_rates(teacher, scenes, tmp_path, capsys, command, rate):
    code = main([*command, "--teacher", str(teacher), "--data", str(scenes), rate, "0.1", "--prior", "shared",
                 "--out", str(tmp_path / "out")])
    assert code == 2
    assert f"--prior shared needs {rate}s: a single-rate codec has one prior" in capsys.readouterr().err


@pytest.mark.parametrize("command, rate", [(["distill"], "--betas"), (["train", "--joint"], "--lmbdas")])
def test_prior_lr_must_be_positive(teacher, scenes, tmp_path, capsys, command, rate):
    code = main([*command, "--teacher", str(teacher), "--data", str(scenes), rate, "0.1,1", "--prior-lr", "0",
                 "--out", str(tmp_path / "out"), *FAST])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.endswith("--prior-lr must be > 0, got 0.0") and len(err.splitlines()) == 1, err


def test_manifest_rates_are_what_evaluate_measures(vr_bundle, scenes):
    """Every rate's bytes and bpp, and the default rate's metrics, equal evaluation's own measurement
    of the written bundle: each val image from its file, alone in its payload."""
    from splitserve.evaluation.methods import measure_bundle

    manifest = read_manifest(vr_bundle)
    measured = measure_bundle(vr_bundle, scenes, progress=False)
    assert measured.rates == [{"bytes_per_image": r.bytes_per_image, "bpp": r.bpp} for r in manifest.rates]
    cls = measured.tasks["classification"]
    assert (cls["bytes"], cls["payload_bpp"]) == (manifest.metrics["bytes"], manifest.metrics["payload_bpp"])
    assert cls["images"] == 16  # the whole val split, as the run validated on


def test_the_rate_sequence_resumes_exactly_after_a_kill(vr_bundle, teacher, scenes, tmp_path):
    """SIGKILL mid-run, --resume: the same rates at the same steps, and the uninterrupted run's weights."""
    out, work = tmp_path / "resumed", tmp_path / "work"
    args = ["distill", "--teacher", teacher, "--data", scenes, *VR, "--out", out, "--workdir", work]
    log = work / "metrics.jsonl"
    proc = subprocess.Popen([sys.executable, "-m", "splitserve", *map(str, args)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None and (
            not log.is_file() or log.read_text().count('"kind": "train"') < 6):
        time.sleep(0.1)
    assert proc.poll() is None, proc.communicate()[1][-2000:]
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    # a kill inside a checkpoint's rotation leaves previous.pt alone, which --resume then reads
    saved = next(p for p in (work / "checkpoint" / "last.pt", work / "checkpoint" / "previous.pt") if p.is_file())
    killed_at = torch.load(saved, weights_only=True)["global_step"]
    # step 6 logs before its checkpoint is saved: the run resumes after step 5 or 6, inside epoch 2
    assert killed_at in (5, 6, 7) and not out.exists()
    run(*args, "--resume")
    straight = records(vr_bundle.parent / f"{vr_bundle.name}.runs" / "distill" / "metrics.jsonl")
    resumed = records(log)
    assert [r["global_step"] for r in resumed] == list(range(1, 13))
    assert [r["rate_index"] for r in resumed] == [r["rate_index"] for r in straight]
    a, b = _codec_tensors(vr_bundle), _codec_tensors(out)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_finetune_on_a_variable_rate_bundle_trains_every_rate_and_keeps_the_code(vr_bundle, teacher, scenes,
                                                                                   tmp_path):
    bundle = tmp_path / "ft"
    shutil.copytree(vr_bundle, bundle)
    before = read_manifest(bundle)
    files = {part: (bundle / before.files[part].path).read_bytes() for part in ("encoder", "prior", "decoder")}
    run("finetune", "--task", "cls", "--bundle", bundle, "--teacher", teacher, "--data", scenes, "--epochs", "1",
        "--train-limit", "16", "--val-limit", "4", "--log-every", "1", "--seed", "2", *FAST, "--batch-size", "4")
    after = read_manifest(bundle)
    # encoder, every rate's prior and the gains (all in the prior file) are bit-identical, so is the code
    for part in ("encoder", "prior"):
        assert (bundle / after.files[part].path).read_bytes() == files[part]
    assert (bundle / after.files["decoder"].path).read_bytes() != files["decoder"]  # stage 2 trains the decoder
    assert after.fingerprint == before.fingerprint == load_codec(bundle).fingerprint()
    assert after.rates == before.rates and after.default_rate == before.default_rate
    # the head learned at every rate, and is measured at every rate
    train = records(bundle.parent / "ft.runs" / "finetune-classification" / "metrics.jsonl")
    assert [r["rate_index"] for r in train] == [0.0, 1.0, 2.0, 2.0]  # drawn from (seed 2, step)
    metrics = after.tasks["classification"].metrics
    assert {"top1_r0", "top1_r1", "top1_r2", "top1_mean", "bytes_r0", "bytes_r2"} <= set(metrics)
    assert metrics["top1"] == metrics["top1_r2"]  # the plain key is the default rate's
    assert metrics["top1_mean"] == pytest.approx(sum(metrics[f"top1_r{k}"] for k in range(3)) / 3)


def _coco_of_varied_sizes(scenes: Path, root: Path) -> Path:
    """fmnist-scenes' COCO val images resized to four different shapes (boxes scaled with them), as
    both splits: under a shorter-side policy their model inputs differ, so batches are padded."""
    data = json.loads((scenes / "coco" / "annotations" / "instances_val2017.json").read_text())
    shapes = [(64, 64), (64, 96), (96, 64), (48, 80)]
    images = data["images"][:8]
    (root / "annotations").mkdir(parents=True)
    for split in ("train", "val"):
        (root / f"{split}2017").mkdir()
        anns = []
        for i, im in enumerate(images):
            h, w = shapes[i % len(shapes)]
            Image.open(scenes / "coco" / "val2017" / im["file_name"]).convert("RGB").resize((w, h)).save(
                root / f"{split}2017" / im["file_name"])
            sy, sx = h / im["height"], w / im["width"]
            for a in (a for a in data["annotations"] if a["image_id"] == im["id"]):
                x, y, bw, bh = a["bbox"]
                anns.append({"id": a["id"], "image_id": a["image_id"], "category_id": a["category_id"],
                             "bbox": [x * sx, y * sy, bw * sx, bh * sy], "area": bw * sx * bh * sy, "iscrowd": 0})
        sized = [{**im, "height": shapes[i % 4][0], "width": shapes[i % 4][1]} for i, im in enumerate(images)]
        (root / "annotations" / f"instances_{split}2017.json").write_text(
            json.dumps({"images": sized, "annotations": anns, "categories": data["categories"]}))
    return root


def test_rates_after_training_are_measured_unpadded(scenes, tmp_path):
    """Detection at a shorter-side policy: val images of different shapes share padded batches; the
    rate the bundle states is still each image's own payload over its own pixels, as evaluate measures."""
    from splitserve.evaluation.methods import measure_bundle

    coco = _coco_of_varied_sizes(scenes, tmp_path / "coco")
    policy = ["--preprocessing", "shorter-side:32:64"]
    run("teacher", "--task", "det", "--data", coco, "--out", tmp_path / "det", "--arch", "resnet18", *policy,
        "--epochs", "0", *FAST)
    bundle = tmp_path / "bundle"
    run("distill", "--teacher", tmp_path / "det", "--data", coco, "--beta", "0.1", "--out", bundle, "--epochs", "1",
        "--train-limit", "4", *policy, *FAST, "--batch-size", "4", *NO_REFIT)
    manifest = read_manifest(bundle)
    det = measure_bundle(bundle, coco, progress=False).tasks["detection"]
    assert det["images"] == 8
    assert (det["bytes"], det["payload_bpp"]) == (manifest.metrics["bytes"], manifest.metrics["payload_bpp"])
    # the four shapes give four input sizes, so a val batch of 8 was padded
    assert len({manifest.policy.input_size(h, w) for h, w in [(64, 64), (64, 96), (96, 64), (48, 80)]}) == 4


def test_a_step_at_one_rate_leaves_every_other_rates_gains_alone():
    """Each rate's gains are their own parameters, as its prior is: after a step at rate 0, a step
    at rate 1 moves rate 1's gains and not rate 0's (a shared (K, C) parameter would get a zero
    gradient there and still move on Adam's momentum)."""
    from splitserve.models import build_codec
    from splitserve.training.optim import split_codec_params

    torch.manual_seed(0)
    codec = build_codec("rac", blocks=0, feature_channels=64, rates=3)
    main_params, _ = split_codec_params(codec)
    opt = torch.optim.Adam(main_params, lr=1e-2)
    x = torch.randn(2, 3, 64, 64)
    snapshots = []
    for rate in (0, 1):
        opt.zero_grad(set_to_none=True)
        out = codec(x, rate)
        (out.bits() + out.features.square().mean()).backward()
        opt.step()
        snapshots.append(codec.log_gain.detach().clone())
    assert torch.equal(snapshots[1][0], snapshots[0][0])  # rate 0 untouched by the step at rate 1
    assert not torch.equal(snapshots[1][1], snapshots[0][1])  # rate 1 trained
    assert torch.equal(snapshots[1][2], snapshots[0][2])  # rate 2 never drawn


def test_a_step_fits_every_other_rates_prior_to_its_latent_and_moves_nothing_else_for_it():
    """A step codes at one rate; ``fit_priors`` gives every other rate's prior the likelihoods of the
    same latent at that rate's own gain (what a step drawn at that rate would charge), and their
    bits reach only those priors' densities: not the transform, not a gain, not the drawn rate's prior."""
    from splitserve.models import build_codec

    torch.manual_seed(0)
    codec = build_codec("rac", blocks=0, feature_channels=64, rates=3).train()
    x = torch.randn(2, 3, 64, 64)
    out = codec(x, 0)
    torch.manual_seed(1)
    fits = codec.fit_priors(out.latent, 0)
    assert sorted(fits) == [1, 2]
    torch.manual_seed(1)  # the same noise: rate 1's own training path gives the same likelihoods
    _, own = codec.through_prior(out.latent.detach(), 1)
    torch.testing.assert_close(fits[1], own)
    sum(-torch.log2(lik).sum() for lik in fits.values()).backward()
    for name, p in codec.named_parameters():
        moved = p.grad is not None and bool(p.grad.abs().sum() > 0)
        assert moved == (name.startswith(("priors.1.", "priors.2.")) and not name.endswith("quantiles")), name
    assert codec.eval().fit_priors(out.latent, 0) == {}  # nothing to fit outside training
    assert build_codec("rac", blocks=0, rates=3, prior="shared").fit_priors(out.latent, 0) == {}  # one density
    assert build_codec("rac", blocks=0).fit_priors(out.latent, 0) == {}  # one rate


def test_prior_lr_gives_the_entropy_model_its_own_adam_and_leaves_the_rest_where_it_was():
    from types import SimpleNamespace

    from splitserve.models import build_codec
    from splitserve.training.optim import build_optimizers, split_codec_params, with_prior_optimizer

    codec = build_codec("rac", blocks=0, rates=3)
    head = torch.nn.Linear(4, 2)
    codec_params, aux = split_codec_params(codec)
    params = {"main": [{"params": codec_params, "weight_decay": 0.0}, head.weight, head.bias], "aux": aux}
    assert with_prior_optimizer(params, codec, None) is params
    split = with_prior_optimizer(params, codec, 1e-3)
    entropy = {name for name, p in codec.named_parameters() if any(p is q for q in split["prior"])}
    assert entropy == {name for name, _ in codec.named_parameters()
                       if name.startswith(("priors.", "gains.", "inverse_gains.")) and not name.endswith("quantiles")}
    assert any(n.startswith("gains.") for n in entropy) and any(n.startswith("inverse_gains.") for n in entropy)
    main = [p for g in split["main"] for p in (g["params"] if isinstance(g, dict) else [g])]
    every = main + split["aux"] + split["prior"]
    assert len({id(p) for p in every}) == len(every) == len(list(codec.parameters())) + 2  # each once, none lost
    cfg = SimpleNamespace(optimizer="sgd", lr=0.01, momentum=0.9, weight_decay=1e-4, aux_lr=1e-3, prior_lr=1e-3,
                          scheduler="cosine", epochs=2, min_lr_ratio=0.01, batch_size=4)
    optimizers, schedulers = build_optimizers(split, cfg, num_items=8, world_size=1)
    assert isinstance(optimizers["prior"], torch.optim.Adam) and optimizers["prior"].param_groups[0]["lr"] == 1e-3
    assert isinstance(optimizers["main"], torch.optim.SGD) and len(schedulers) == 2
    for _ in range(4):  # to the end of the cosine schedule: both fall to min_lr_ratio of their start
        for o in optimizers.values():
            o.step()  # no gradients: nothing moves
        for s in schedulers:
            s.scheduler.step()
    assert optimizers["main"].param_groups[0]["lr"] == pytest.approx(1e-4)
    assert optimizers["prior"].param_groups[0]["lr"] == pytest.approx(1e-5)


def test_gains_of_the_wrong_shape_are_refused_not_broadcast():
    from splitserve.models import build_codec

    codec = build_codec("rac", blocks=0, feature_channels=64, rates=3)
    for key in ("log_gain", "log_inverse_gain"):
        state = codec.prior_state()
        state[key] = state[key][0]  # (C,): copy_ would fill every rate's row with it
        with pytest.raises(RuntimeError, match=rf"{key} has shape \(\d+,\), expected \(3, \d+\)"):
            codec.load_prior_state(state)
    codec.load_prior_state(codec.prior_state())  # the right shapes load

