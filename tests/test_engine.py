"""The training loop's checkpoints, in process: a tiny codec-like model (conv encoder → entropy
bottleneck → classifier, main and aux optimizers, noise drawn from the RNG) trained on crops of
real photos. A resumed run must end with exactly the weights of an uninterrupted one, also when
``last.pt`` was truncated or corrupted (then ``previous.pt`` is used, said in one line), and when
the checkpoint was written by the previous format. The SIGKILL tests are in test_crash_safe.py.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
import torch.nn.functional as F
from compressai.entropy_models import EntropyBottleneck
from torch import nn
from torch.utils.data import TensorDataset, default_collate

from splitserve.training.checkpoint import content_digest
from splitserve.training.distributed import DistInfo
from splitserve.training.engine import Engine, EngineConfig, ScheduledLR
from splitserve.training.objective import Objective, TrainingError
from splitserve.training.optim import split_codec_params

EPOCHS, BATCH, IMAGES = 3, 4, 24  # 6 steps per epoch, 18 in all


def photo_crops(n: int, size: int = 16) -> TensorDataset:
    """``n`` crops of three texture photos (scikit-image's brick, grass, gravel); the label is the photo."""
    from skimage import data

    photos = [torch.from_numpy(getattr(data, name)()).float().div(255) for name in ("brick", "grass", "gravel")]
    g = torch.Generator().manual_seed(0)
    crops, labels = [], []
    for i in range(n):
        y, x = torch.randint(0, 512 - size, (2,), generator=g).tolist()
        crops.append(photos[i % 3][y:y + size, x:x + size].unsqueeze(0))
        labels.append(i % 3)
    return TensorDataset(torch.stack(crops), torch.tensor(labels))


class TextureCodec(Objective):
    """Encoder → entropy bottleneck (noisy latent while training) → classifier: a codec's loop in small."""

    def __init__(self):
        super().__init__()
        self.encoder = nn.Sequential(nn.Conv2d(1, 4, 3, stride=2, padding=1), nn.ReLU(),
                                     nn.Conv2d(4, 4, 3, stride=2, padding=1))
        self.prior = EntropyBottleneck(4)
        self.classifier = nn.Linear(4 * 4 * 4, 3)

    def forward(self, batch):
        x, labels = batch
        latent, likelihoods = self.prior(self.encoder(x))
        bits = -torch.log2(likelihoods).sum() / x.shape[0]
        ce = F.cross_entropy(self.classifier(latent.flatten(1)), labels)
        return {"ce": ce, "rate": 0.01 * bits, "prior_aux": self.prior.loss()}, {"bpp": bits.detach() / 256}


DATA = photo_crops(IMAGES)


def fit(workdir, *, max_steps=None, resume=False, refuse_restart=False, seed=1, validate=None):
    """``validate``, if given, is called with the objective being trained."""
    torch.manual_seed(0)
    objective = TextureCodec()
    main, aux = split_codec_params(objective)
    optimizers = {"main": torch.optim.SGD(main, lr=0.1, momentum=0.9), "aux": torch.optim.Adam(aux, lr=1e-2)}
    schedulers = [ScheduledLR(torch.optim.lr_scheduler.MultiStepLR(optimizers["main"], [1, 2], gamma=0.5))]
    config = EngineConfig(workdir=workdir, epochs=EPOCHS, batch_size=BATCH, num_workers=0, seed=seed,
                          max_steps=max_steps, checkpoint_every=1, resume=resume, progress=False, tensorboard=False,
                          refuse_restart=refuse_restart)
    result = Engine(config, DistInfo(), "texture").fit(objective, optimizers, schedulers, DATA, default_collate,
                                                       validate and (lambda: validate(objective)))
    return result, {k: v.detach().clone() for k, v in objective.state_dict().items()}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run's final weights."""
    result, weights = fit(tmp_path_factory.mktemp("straight"))
    assert result.status == "done" and result.global_step == EPOCHS * IMAGES // BATCH
    return weights


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def interrupted(tmp_path, steps: int = 8):
    """A run stopped after ``steps`` steps (checkpoint every step): last.pt = step 8, previous.pt = step 7."""
    result, _ = fit(tmp_path, max_steps=steps)
    assert result.status == "max_steps"
    ckpt = tmp_path / "checkpoint"
    assert torch.load(ckpt / "last.pt", weights_only=True)["global_step"] == steps
    assert torch.load(ckpt / "previous.pt", weights_only=True)["global_step"] == steps - 1
    return ckpt


def test_resume_from_a_good_checkpoint_is_exact(tmp_path, reference, capsys):
    interrupted(tmp_path)
    capsys.readouterr()
    result, weights = fit(tmp_path, resume=True)
    out = capsys.readouterr()
    assert "last.pt at epoch 2, batch 2, step 8" in out.out and "warning" not in out.err
    assert_same(weights, reference)
    _, at_step_8 = fit(tmp_path / "short", max_steps=8)
    assert any(not torch.equal(weights[k], at_step_8[k]) for k in weights), "the resumed run trained on"


def test_validation_time_is_kept_apart_from_training_time_over_a_resume(tmp_path):
    """``seconds`` (what provenance calls ``train_seconds``) leaves validation out, ``val_seconds``
    counts it, and both carry over a resume: a variable-rate run validates every rate, which must
    not count as training when its time is compared with single-rate runs'."""
    import time

    def validate(_):
        time.sleep(0.3)
        return {"x": 1.0}

    began = time.perf_counter()
    first, _ = fit(tmp_path, max_steps=8, validate=validate)  # epochs 1 and 2 validated (steps 6 and 12 > 8: one)
    result, _ = fit(tmp_path, resume=True, validate=validate)  # then epochs 2 and 3
    wall = time.perf_counter() - began
    assert first.val_seconds == pytest.approx(0.3, abs=0.1)
    assert result.status == "done" and result.val_seconds == pytest.approx(3 * 0.3, abs=0.15)
    assert result.seconds > 0 and result.seconds + result.val_seconds <= wall


def classifier_sum(objective) -> dict[str, float]:
    """A validation whose value depends on the weights, so two histories can be compared."""
    return {"w": float(objective.classifier.weight.detach().sum())}


def test_a_stop_signal_ends_a_validation_at_once_and_the_resumed_run_validates_that_epoch(tmp_path, reference,
                                                                                           capsys):
    """A SIGTERM or Ctrl-C during a validation (minutes for a variable-rate, multi-task run, longer
    than a grace period) stops the run at once with a checkpoint; the resumed run validates that
    epoch before it trains on, and ends as an uninterrupted one: same weights, same history."""
    import signal
    import time

    straight, _ = fit(tmp_path / "straight", validate=classifier_sum)
    calls = []

    def validate_signalled_in_epoch_2(objective):
        calls.append(len(calls) + 1)
        if len(calls) == 2:
            try:
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(60)  # the rest of a long validation: the signal must end it
            except Exception:  # ... even through evaluation code that catches broadly
                pass
            calls.append("finished")
        return classifier_sum(objective)

    stopped, _ = fit(tmp_path / "run", validate=validate_signalled_in_epoch_2)
    assert calls == [1, 2] and stopped.status == "interrupted" and stopped.epoch == 2
    assert [h["epoch"] for h in stopped.history] == [1]
    assert "stopping this validation" in capsys.readouterr().err
    result, weights = fit(tmp_path / "run", resume=True, validate=classifier_sum)
    assert result.status == "done"
    assert [(h["epoch"], h["global_step"], h["metrics"]) for h in result.history] == \
        [(h["epoch"], h["global_step"], h["metrics"]) for h in straight.history]
    assert_same(weights, reference)
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in logged if r["kind"] == "val"] == [1, 2, 3]


def test_truncated_last_checkpoint_resumes_from_previous(tmp_path, reference, capsys):
    last = interrupted(tmp_path) / "last.pt"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])  # as a crash in place would leave it
    capsys.readouterr()
    _, weights = fit(tmp_path, resume=True)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "last.pt cannot be read" in err[0] and "resuming from previous.pt (step 7)" in err[0]
    assert_same(weights, reference)


def test_a_changed_byte_is_caught_by_the_checksum(tmp_path, reference, capsys):
    """One bit of one weight flipped: the file still loads, and only the SHA-256 tells."""
    last = interrupted(tmp_path) / "last.pt"
    saved = torch.load(last, weights_only=True)
    raw = last.read_bytes()
    at = raw.find(saved["model"]["classifier.weight"].numpy().tobytes())
    assert at > 0
    flipped = bytearray(raw)
    flipped[at + 2] ^= 0x10  # a mantissa bit of the first weight: still a valid float
    last.write_bytes(bytes(flipped))
    changed = torch.load(last, weights_only=True)["model"]["classifier.weight"]
    assert not torch.equal(changed, saved["model"]["classifier.weight"])
    capsys.readouterr()
    _, weights = fit(tmp_path, resume=True)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "last.pt is corrupt (its content does not match its SHA-256)" in err[0]
    assert_same(weights, reference)


def test_a_log_line_cut_by_a_crash_is_dropped_on_resume(tmp_path, reference):
    interrupted(tmp_path)
    log = tmp_path / "metrics.jsonl"
    logged = log.read_text()
    log.write_text(logged + '{"kind": "train", "epoch": 2, "glo')  # power lost in the middle of a line
    _, weights = fit(tmp_path, resume=True)
    assert_same(weights, reference)
    lines = log.read_text().splitlines()
    assert lines[: len(logged.splitlines())] == logged.splitlines() and all(line.endswith("}") for line in lines)


def test_no_good_checkpoint_is_a_one_line_error(tmp_path):
    ckpt = interrupted(tmp_path)
    (ckpt / "last.pt").write_bytes(b"")
    (ckpt / "previous.pt").write_bytes((ckpt / "previous.pt").read_bytes()[:100])
    with pytest.raises(TrainingError) as e:
        fit(tmp_path, resume=True)
    message = str(e.value)
    assert "\n" not in message and "no usable checkpoint" in message
    assert "last.pt cannot be read" in message and "previous.pt cannot be read" in message


def test_a_version_1_checkpoint_resumes_unverified_with_a_note(tmp_path, reference, capsys):
    """What the previous release wrote (no checksum; RNG states in rng-rank0.pt, no previous.pt)
    still resumes exactly, as a run interrupted before an upgrade must."""
    ckpt = interrupted(tmp_path)
    saved = torch.load(ckpt / "last.pt", weights_only=True)
    del saved["sha256"]
    rng = saved.pop("rng")[0]
    saved["version"] = 1
    torch.save(saved, ckpt / "last.pt")
    torch.save({"rng": rng}, ckpt / "rng-rank0.pt")
    (ckpt / "previous.pt").unlink()
    capsys.readouterr()
    _, weights = fit(tmp_path, resume=True)
    assert "has no checksum (written by an older splitserve); loading it unverified" in capsys.readouterr().out
    assert_same(weights, reference)


def test_a_new_run_replaces_another_runs_checkpoints(tmp_path):
    """Without --resume a run starts over: at its first save the old run's previous.pt goes, so a
    later fallback can never continue from another run's weights."""
    interrupted(tmp_path)
    fit(tmp_path, max_steps=1, seed=2)
    ckpt = tmp_path / "checkpoint"
    assert not (ckpt / "previous.pt").exists()
    assert torch.load(ckpt / "last.pt", weights_only=True)["signature"] == {}
    assert torch.load(ckpt / "last.pt", weights_only=True)["global_step"] == 1


def test_refuse_restart_keeps_a_checkpoint_from_being_started_over(tmp_path):
    interrupted(tmp_path, steps=2)
    before = (tmp_path / "checkpoint" / "last.pt").read_bytes()
    with pytest.raises(TrainingError, match="holds a checkpoint: pass --resume"):
        fit(tmp_path, refuse_restart=True)
    assert (tmp_path / "checkpoint" / "last.pt").read_bytes() == before


def test_a_save_reaches_the_disk_before_it_replaces_the_last_one(tmp_path, monkeypatch):
    """The order that makes a save crash-safe: the new file's bytes are fsynced before any rename,
    the current last.pt becomes previous.pt, the new one is renamed into place, the directory is
    fsynced. (Recorded around the real calls.)"""
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.path.basename(os.readlink(f"/proc/self/fd/{fd}"))))
        return real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", os.path.basename(src), os.path.basename(dst)))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    fit(tmp_path, max_steps=2)
    second = events[events.index(("fsync", "checkpoint")) + 1:]
    assert second == [("fsync", ".last.pt.tmp"), ("replace", "last.pt", "previous.pt"),
                      ("replace", ".last.pt.tmp", "last.pt"), ("fsync", "checkpoint")]


def test_the_checksum_covers_every_value():
    content = {"model": {"w": torch.arange(6.0).reshape(2, 3)}, "history": [{"epoch": 1, "top1": 50.0}],
               "scheduler": {"milestones": __import__("collections").Counter({2: 1}), "flag": False}}
    digest = content_digest(content)
    assert content_digest({**content}) == digest  # stable
    for changed in ({**content, "model": {"w": torch.arange(6.0).reshape(3, 2)}},  # shape
                    {**content, "model": {"w": torch.arange(6.0).reshape(2, 3).double()}},  # dtype
                    {**content, "history": [{"epoch": 1, "top1": 50.5}]},
                    {**content, "scheduler": {"milestones": {2: 2}, "flag": False}}):
        assert content_digest(changed) != digest


def test_clip_each_clips_main_and_prior_each_to_its_own_norm_and_leaves_aux():
    """``--clip-grad`` bounds each of the task/codec and the entropy model's steps on its own: a
    large prior gradient must not shrink the main one (as one joint norm would), and the quantiles'
    aux gradient is not clipped."""
    from splitserve.training.engine import clip_each

    main, prior, aux = (nn.Parameter(torch.zeros(4)) for _ in range(3))
    main.grad = torch.tensor([0.3, 0.4, 0.0, 0.0])  # norm 0.5, under the bound: untouched
    prior.grad = torch.tensor([6.0, 8.0, 0.0, 0.0])  # norm 10: scaled to norm 1
    aux.grad = torch.tensor([30.0, 40.0, 0.0, 0.0])  # norm 50: aux is never clipped
    optimizers = {name: torch.optim.SGD([p], lr=0.1) for name, p in (("main", main), ("prior", prior), ("aux", aux))}
    clip_each(optimizers, torch.amp.GradScaler("cuda", enabled=False), 1.0)
    torch.testing.assert_close(main.grad, torch.tensor([0.3, 0.4, 0.0, 0.0]))
    torch.testing.assert_close(prior.grad, torch.tensor([0.6, 0.8, 0.0, 0.0]), rtol=0, atol=1e-5)
    torch.testing.assert_close(aux.grad, torch.tensor([30.0, 40.0, 0.0, 0.0]))
