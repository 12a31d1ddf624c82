"""Learned *image* codecs from CompressAI as baselines: the factorized prior (Ballé et al. 2018,
``bmshj2018-factorized``) and the mean-scale hyperprior (Minnen et al. 2018, ``mbt2018-mean``).

The architectures are CompressAI's own (``compressai.zoo`` configurations, untrained: no weights
can be downloaded here). :func:`train_image_codec` trains one with CompressAI's rate–distortion
loss on the study's train split, through the training commands' own loop and skeleton
(:mod:`splitserve.training.stage`: checkpoints, exact ``--resume``, logs, SIGTERM);
:class:`ImageCodec` loads the result and codes images.

A codec directory::

    codec.json          architecture, N, M, λ, preprocessing, metrics, provenance, weights sha256
    model.safetensors   the state dict after ``update()`` (CDF tables included)

Bytes on the wire (:meth:`ImageCodec.encode`): a minimal container, 2 + 2 bytes of image height
and width (big-endian), then the length of every string but the last as a LEB128 varint, then
CompressAI's strings (``y``; or ``y`` and ``z`` for the hyperprior). The image is padded
(replicating its edge) to the codec's size multiple and cropped after decoding.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from splitserve_edge.payload import encode_varint, read_varint

from ..errors import PayloadError, SplitserveError
from ..preprocess import Preprocessing, load_image
from ..training.common import TaskData
from ..training.objective import Objective
from ..training.optim import split_codec_params, with_prior_optimizer
from ..training.stage import Plan, Stage

FORMAT = "splitserve-image-codec"
VERSION = 1
ARCHITECTURES = ("bmshj2018-factorized", "mbt2018-mean", "bmshj2018-hyperprior")
PAD_MULTIPLE = {"bmshj2018-factorized": 16, "mbt2018-mean": 64, "bmshj2018-hyperprior": 64}
LAMBDAS = {1: 0.0018, 2: 0.0035, 3: 0.0067, 4: 0.0130, 5: 0.0250, 6: 0.0483, 7: 0.0932, 8: 0.1800}
"""CompressAI's MSE λ per quality level (its zoo's training settings)."""
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".ppm", ".tif", ".tiff"}


class ImageCodecError(SplitserveError):
    """An image-codec directory is missing or corrupt, or training options are invalid."""


def build_model(architecture: str, n: int, m: int) -> nn.Module:
    from compressai.zoo.image import model_architectures

    if architecture not in ARCHITECTURES:
        raise ImageCodecError(f"unknown image codec {architecture!r} (known: {', '.join(ARCHITECTURES)})")
    return model_architectures[architecture](N=n, M=m)


def channels_for(architecture: str, quality: int) -> tuple[int, int]:
    """(N, M) of CompressAI's zoo configuration at ``quality``."""
    from compressai.zoo.image import cfgs

    if architecture not in ARCHITECTURES:
        raise ImageCodecError(f"unknown image codec {architecture!r} (known: {', '.join(ARCHITECTURES)})")
    if quality not in cfgs[architecture]:
        raise ImageCodecError(f"{architecture}: quality {quality} is not one of {sorted(cfgs[architecture])}")
    return cfgs[architecture][quality]


# -- the container -------------------------------------------------------------------------------
def pack(height: int, width: int, strings: list[bytes]) -> bytes:
    head = bytearray(struct.pack(">HH", height, width))
    for s in strings[:-1]:
        encode_varint(len(s), head)  # the payload's own varints
    return bytes(head) + b"".join(strings)


def unpack(data: bytes, count: int) -> tuple[int, int, list[bytes]]:
    if len(data) < 4:
        raise ImageCodecError("image-codec container: shorter than its header")
    h, w = struct.unpack(">HH", data[:4])
    pos, lengths = 4, []
    view = memoryview(data)
    for _ in range(count - 1):
        try:
            n, pos = read_varint(view, pos, "string length")
        except PayloadError as e:
            raise ImageCodecError(f"image-codec container: {e}") from None
        lengths.append(n)
    strings = []
    for n in lengths:
        if pos + n > len(data):
            raise ImageCodecError("image-codec container: truncated string")
        strings.append(data[pos:pos + n])
        pos += n
    strings.append(data[pos:])
    return h, w, strings


# -- loading and coding ----------------------------------------------------------------------------
def to_unit_tensor(img: Image.Image) -> Tensor:
    """RGB PIL image → float (1, 3, H, W) in [0, 1]: CompressAI's input convention."""
    arr = np.asarray(img.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(255.0).unsqueeze(0)


def to_image(x: Tensor) -> Image.Image:
    """(1, 3, H, W) in [0, 1] → an 8-bit RGB image, as a decoded image file would be."""
    arr = x[0].clamp(0, 1).mul(255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(np.ascontiguousarray(arr))


def pad_to(x: Tensor, multiple: int) -> Tensor:
    h, w = x.shape[-2:]
    ph, pw = (-h) % multiple, (-w) % multiple
    return F.pad(x, (0, pw, 0, ph), mode="replicate") if ph or pw else x


@dataclass
class ImageCodec:
    """A trained CompressAI image codec: encode an image to bytes, decode bytes to an image."""

    model: nn.Module
    config: dict[str, Any]
    path: Path | None = None

    @property
    def architecture(self) -> str:
        return self.config["architecture"]

    @property
    def multiple(self) -> int:
        return PAD_MULTIPLE[self.architecture]

    @property
    def num_strings(self) -> int:
        return 1 if self.architecture == "bmshj2018-factorized" else 2

    @classmethod
    def load(cls, path: str | Path) -> "ImageCodec":
        from safetensors.torch import load as load_safetensors

        root = Path(path)
        try:
            config = json.loads((root / "codec.json").read_text())
        except FileNotFoundError:
            raise ImageCodecError(f"{root}: no codec.json (train one with `platform train-image-codec`)") from None
        except json.JSONDecodeError as e:
            raise ImageCodecError(f"{root}/codec.json: not valid JSON ({e.msg})") from None
        if not isinstance(config, dict) or config.get("format") != FORMAT:
            raise ImageCodecError(f"{root}/codec.json: not a {FORMAT} file")
        for key in ("architecture", "N", "M", "weights"):
            if key not in config:
                raise ImageCodecError(f"{root}/codec.json: missing {key!r}")
        weights = root / config["weights"]["path"]
        try:
            data = weights.read_bytes()
        except OSError:
            raise ImageCodecError(f"{root}: weights {config['weights']['path']} are missing") from None
        if hashlib.sha256(data).hexdigest() != config["weights"].get("sha256"):
            raise ImageCodecError(f"{root}: {weights.name} does not match codec.json (sha256)")
        model = build_model(config["architecture"], int(config["N"]), int(config["M"]))
        try:
            model.load_state_dict(load_safetensors(data))
        except Exception as e:  # noqa: BLE001 — shape mismatch or bad file: one line
            raise ImageCodecError(f"{root}: weights do not fit {config['architecture']}: {str(e).splitlines()[0]}") from None
        return cls(model.eval(), config, root)

    def save(self, path: str | Path, **extra: Any) -> Path:
        from safetensors.torch import save_file

        root = Path(path)
        root.mkdir(parents=True, exist_ok=True)
        self.model.update(force=True)
        state = {k: v.detach().cpu().contiguous() for k, v in self.model.state_dict().items()}
        tmp = root / ".model.safetensors.tmp"
        save_file(state, str(tmp))
        os.replace(tmp, root / "model.safetensors")
        config = {**self.config, **extra, "format": FORMAT, "format_version": VERSION,
                  "weights": {"path": "model.safetensors",
                              "sha256": hashlib.sha256((root / "model.safetensors").read_bytes()).hexdigest()}}
        (root / "codec.json").write_text(json.dumps(config, indent=2) + "\n")
        self.config, self.path = config, root
        return root

    # -- device side
    def device_modules(self) -> list[nn.Module]:
        """What a device must hold to encode: analysis transform (+ hyper-analysis and
        hyper-synthesis, which give the scales y is coded with) and the entropy models."""
        m = self.model
        mods = [m.g_a, m.entropy_bottleneck]
        if self.num_strings == 2:
            mods += [m.h_a, m.h_s, m.gaussian_conditional]
        return mods

    def device_forward(self, x: Tensor) -> None:
        """The transforms a device runs (for counting MACs)."""
        m = self.model
        y = m.g_a(pad_to(x, self.multiple))
        if self.num_strings == 2:
            m.h_s(torch.round(m.h_a(y)))

    @torch.inference_mode()
    def encode_tensor(self, x: Tensor) -> bytes:
        h, w = x.shape[-2:]
        out = self.model.compress(pad_to(x, self.multiple))
        strings = [s[0] for s in out["strings"]]
        return pack(int(h), int(w), strings)

    def encode(self, img: Image.Image) -> bytes:
        """An RGB image (already at the model-input size) → the bytes a device sends."""
        return self.encode_tensor(to_unit_tensor(img))

    @torch.inference_mode()
    def decode(self, data: bytes) -> Image.Image:
        h, w, strings = unpack(data, self.num_strings)
        m = self.multiple
        hp, wp = h + (-h) % m, w + (-w) % m
        down = 64 if self.num_strings == 2 else 16  # the shape decompress() expects: z's (or y's)
        out = self.model.decompress([[s] for s in strings], (hp // down, wp // down))
        return to_image(out["x_hat"][..., :h, :w])

    @torch.inference_mode()
    def bit_map(self, x: Tensor) -> np.ndarray:
        """Bits per latent position of y (−log2 likelihood of the rounded latent, summed over
        channels), cropped to the unpadded image's share; shape (h/16, w/16) rounded up."""
        out = self.model.eval()(pad_to(x, self.multiple))
        bits = -torch.log2(out["likelihoods"]["y"][0]).sum(0)
        h, w = x.shape[-2:]
        return bits[: math.ceil(h / 16), : math.ceil(w / 16)].cpu().numpy()


# -- training --------------------------------------------------------------------------------------
def find_images(root: Path, split: str) -> list[Path]:
    """Images of ``split`` under an fmnist-scenes tree (both its ImageFolder and COCO parts), an
    ImageFolder root (``root/split``), a COCO tree (``root/{split}2017``) or a flat folder."""
    root = Path(root)
    if not root.is_dir():
        raise ImageCodecError(f"{root}: no such data directory")
    candidates = [root / "imagefolder" / split, root / "coco" / f"{split}2017", root / split, root / f"{split}2017"]
    dirs = [d for d in candidates if d.is_dir()] or [root]
    files = sorted({p for d in dirs for p in d.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()})
    if not files:
        raise ImageCodecError(f"{root}: no images for split {split!r} (looked in {', '.join(map(str, dirs))})")
    return files


class _Images(torch.utils.data.Dataset):
    def __init__(self, files: list[Path], policy: Preprocessing, train: bool):
        self.files, self.policy, self.train = files, policy, train

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> Tensor:
        x = to_unit_tensor(self.policy.geometry(load_image(self.files[i])))[0]
        if self.train and torch.rand(()) < 0.5:
            x = x.flip(-1)
        return x


def _subset(files: list[Path], limit: int | None) -> list[Path]:
    if not limit or limit >= len(files):
        return files
    step = len(files) / limit
    return [files[int(i * step)] for i in range(limit)]


@torch.no_grad()
def measure(codec: ImageCodec, files: list[Path], policy: Preprocessing, progress: bool = False) -> dict[str, float]:
    """Real bytes per image, bpp of the input and PSNR (8-bit decoded image) over ``files``."""
    from tqdm.auto import tqdm

    total_bytes = bpp = psnr = 0.0
    for f in tqdm(files, desc="measure", unit="img", disable=not progress, leave=False):
        img = policy.geometry(load_image(f))
        data = codec.encode(img)
        ref = np.asarray(img, dtype=np.float64)
        dec = np.asarray(codec.decode(data), dtype=np.float64)
        mse = float(np.mean((ref - dec) ** 2))
        psnr += 10 * math.log10(255.0 ** 2 / max(mse, 1e-10))
        total_bytes += len(data)
        bpp += 8 * len(data) / (img.height * img.width)
    n = len(files)
    return {"bytes_per_image": total_bytes / n, "bpp": bpp / n, "psnr": psnr / n, "images": n}


def train_image_codec(
    architecture: str,
    data: Path,
    out: Path,
    *,
    quality: int | None = 1,
    channels: tuple[int, int] | None = None,
    lmbda: float | None = None,
    preprocessing: Preprocessing | None = None,
    epochs: int = 10,
    max_steps: int | None = None,
    batch_size: int = 16,
    lr: float = 1e-4,
    aux_lr: float = 1e-3,
    prior_lr: float | None = None,
    lr_drop: tuple[int, ...] = (),
    clip: float = 1.0,
    train_limit: int | None = None,
    val_limit: int | None = 200,
    workdir: Path | None = None,
    resume: bool = False,
    checkpoint_every: int = 200,
    log_every: int = 20,
    num_workers: int = 2,
    seed: int = 0,
    progress: bool = True,
) -> Path:
    """Train a CompressAI image codec with λ·255²·MSE + bpp (Adam; the entropy bottleneck's
    quantiles by a second Adam on its aux loss every step; with ``prior_lr`` its density on a third
    Adam at that rate, as ``--prior-lr`` does for feature codecs) and write the codec directory ``out``.

    The run is a training :class:`~splitserve.training.stage.Stage` like ``platform distill``:
    checkpoints in ``WORKDIR/checkpoint/`` (every ``checkpoint_every`` steps, at every epoch end, on
    SIGTERM/Ctrl-C, which then raise :class:`~splitserve.errors.Stopped`), ``resume`` continuing
    from the exact batch and refusing a checkpoint made with other settings, ``metrics.jsonl``.
    A work dir that holds a checkpoint is not started over without ``resume``.
    """
    if channels is None:
        if quality is None:
            raise ImageCodecError("give a quality (CompressAI's N, M and λ) or explicit channels")
        channels = channels_for(architecture, quality)
    if lmbda is None:
        if quality not in LAMBDAS:
            raise ImageCodecError(f"no default λ for quality {quality}: give --lmbda")
        lmbda = LAMBDAS[quality]
    if epochs < 1 or batch_size < 1 or lmbda <= 0:
        raise ImageCodecError("epochs and batch size must be >= 1 and λ > 0")
    cfg = SimpleNamespace(
        architecture=architecture, data=Path(data), out=Path(out), quality=quality, channels=channels, lmbda=lmbda,
        policy=preprocessing or Preprocessing.fixed(64, 64), train_limit=train_limit, val_limit=val_limit,
        # the training options every stage reads: Adam, ×0.1 at the lr_drop epochs, on the CPU
        epochs=epochs, max_steps=max_steps, batch_size=batch_size, optimizer="adam", lr=lr, weight_decay=0.0,
        scheduler="multistep", milestones=list(lr_drop), gamma=0.1, aux_lr=aux_lr,
        prior_lr=prior_lr,
        clip_grad=clip if clip > 0 else None, workdir=workdir, resume=resume, keep_checkpoint=False,
        checkpoint_every=checkpoint_every, log_every=log_every, num_workers=num_workers, seed=seed,
        progress=progress, tensorboard=False, amp="off", device="cpu")
    ImageCodecStage(cfg).run()
    return cfg.out


class RateDistortion(Objective):
    """CompressAI's rate–distortion loss, λ·255²·MSE + bpp (bits over the input pixels), and the
    entropy bottleneck's quantile (aux) loss, which the engine steps on its own optimizer."""

    def __init__(self, model: nn.Module, lmbda: float):
        super().__init__()
        self.model = model
        self.lmbda = float(lmbda)

    def forward(self, x: Tensor):
        out = self.model(x)
        n, _, h, w = x.shape
        bpp = sum(-torch.log2(lk).sum() for lk in out["likelihoods"].values()) / (n * h * w)
        mse = F.mse_loss(out["x_hat"], x)
        losses = {"distortion": self.lmbda * 255 ** 2 * mse, "rate": bpp, "prior_aux": self.model.aux_loss()}
        return losses, {"mse": mse.detach(), "bpp": bpp.detach()}


class ImageCodecStage(Stage):
    refuse_restart = True  # as before it ran through the engine: never start over a checkpoint silently

    def default_workdir(self) -> Path:
        return self.cfg.out

    def signature(self) -> dict[str, Any]:
        cfg = self.cfg
        return {"architecture": cfg.architecture, "N": cfg.channels[0], "M": cfg.channels[1], "lambda": cfg.lmbda,
                "preprocessing": cfg.policy.to_dict(), "epochs": cfg.epochs, "batch_size": cfg.batch_size,
                "lr": cfg.lr, "aux_lr": cfg.aux_lr, "lr_drop": cfg.milestones,
                **({"prior_lr": cfg.prior_lr} if cfg.prior_lr else {}),  # absent: as before the option existed
                "train_images": len(self.train_files), "seed": cfg.seed}

    def plan(self) -> Plan:
        cfg = self.cfg
        legacy = Path(cfg.workdir or cfg.out) / "checkpoint.pt"
        if cfg.resume and legacy.is_file():
            raise ImageCodecError(f"{legacy} was written by an older splitserve, which this one cannot resume; "
                                  "use another --workdir (or remove it) to start over")
        self.started = time.perf_counter()
        self.train_files = _subset(find_images(cfg.data, "train"), cfg.train_limit)
        try:
            self.val_files = _subset(find_images(cfg.data, "val"), cfg.val_limit)
        except ImageCodecError:
            self.val_files = []
        torch.manual_seed(cfg.seed)
        objective = RateDistortion(build_model(cfg.architecture, *cfg.channels), cfg.lmbda)
        main, aux = split_codec_params(objective.model)
        self.codec = ImageCodec(objective.model, {"architecture": cfg.architecture, "N": cfg.channels[0],
                                                  "M": cfg.channels[1]})

        def validate() -> dict[str, float]:  # real bytes: the coding tables first
            objective.eval()
            self.codec.model.update(force=True)
            return measure(self.codec, self.val_files, cfg.policy, cfg.progress) if self.val_files else {}

        provenance = {"batch_size": cfg.batch_size, "lr": cfg.lr, "aux_lr": cfg.aux_lr, "prior_lr": cfg.prior_lr,
                      "lr_drop": cfg.milestones,
                      "loss": "lambda*255^2*MSE + bpp (CompressAI)"}
        data = TaskData(cfg.policy, _Images(self.train_files, cfg.policy, train=True), self.val_files, cfg.data, {})
        return Plan("train-image-codec", f"train-image-codec ({cfg.architecture})", objective,
                    with_prior_optimizer({"main": main, "aux": aux}, objective.model, cfg.prior_lr), data,
                    torch.utils.data.default_collate, validate,
                    validate_epochs=False, provenance=provenance)

    def write(self, plan, result, metrics, provenance) -> None:  # the caller reports what was written
        provenance.update(epochs_done=result.epoch, seconds=round(time.perf_counter() - self.started, 1))
        self.codec.save(self.cfg.out, quality=self.cfg.quality, **{"lambda": self.cfg.lmbda},
                        preprocessing=self.cfg.policy.to_dict(), metrics=metrics, provenance=provenance)
