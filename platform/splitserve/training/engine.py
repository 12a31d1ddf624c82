"""The one training loop behind ``platform teacher``, ``distill``, ``finetune`` and ``train``.

A command builds an :class:`Objective` (an ``nn.Module`` whose ``forward(batch)`` returns named
loss terms), its optimizers and schedulers, and hands them to :meth:`Engine.fit`, which owns
everything else:

- **DDP**: under torchrun the objective is wrapped in ``DistributedDataParallel`` (the loss is
  computed inside ``forward``, so every trainable parameter, the prior's quantiles included, is
  synchronised); each rank reads its own shard of a seeded permutation; rank 0 logs, validates
  and saves; ranks meet at barriers.
- **Determinism**: epoch ``e`` visits the data in the order ``randperm(seed, e)``, and item ``i``
  of epoch ``e`` is augmented under its own RNG seed ``(seed, e, i)``, so the data a step sees
  depends neither on the number of workers nor on where a run was interrupted.
- **Checkpoints**: ``WORKDIR/checkpoint/`` every ``checkpoint_every`` steps, at each epoch end,
  on SIGTERM/SIGINT (the handler only sets a flag; the loop saves after the current step and
  returns), and at ``max_steps``. ``resume`` restores model, optimizers, schedulers, AMP scaler,
  epoch, position within the epoch (already-seen batches are skipped, not re-read), best-so-far
  and RNG states; an interrupted-and-resumed CPU run ends with bit-identical weights.
- **Mixed precision** (bf16/fp16 autocast, GradScaler for fp16) on CUDA only.
- **Logs**: ``metrics.jsonl`` (one JSON object per logged step / validation), ``train.csv`` and
  ``val.csv`` (regenerated from it), TensorBoard events when ``tensorboard`` is installed, tqdm
  bars on rank 0, and one summary line per epoch on stdout.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import json
import math
import os
import random
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Sampler

from ..errors import SplitserveError
from . import distributed as dist_utils
from .distributed import DistInfo

CHECKPOINT_FORMAT = "splitserve-checkpoint"
CHECKPOINT_VERSION = 1


class TrainingError(SplitserveError):
    """Training cannot go on (non-finite loss, incompatible checkpoint)."""


# ---------------------------------------------------------------------------------------------
# the objective: a module that returns its loss terms


class Objective(nn.Module):
    """Base class: ``forward(batch) -> (losses, logs)``.

    ``losses`` maps names to scalar tensors that are summed and back-propagated; names in
    ``aux_terms`` (the prior's quantile loss) are optimised too but not counted in the logged
    ``loss``. ``logs`` maps names to scalars that are only logged (e.g. ``bpp``).
    Submodules named in ``frozen`` stay in eval mode and are left out of checkpoints (they are
    rebuilt from the teacher/bundle on resume).
    """

    frozen: tuple[str, ...] = ()
    aux_terms: tuple[str, ...] = ("prior_aux",)

    def frozen_modules(self) -> list[str]:
        names = []
        for name in self.frozen:
            try:
                if self.get_submodule(name) is not None:
                    names.append(name)
            except AttributeError:
                continue
        return names

    def train(self, mode: bool = True) -> "Objective":
        super().train(mode)
        for name in self.frozen_modules():
            self.get_submodule(name).eval()
        return self

    def checkpoint_state(self) -> dict[str, Tensor]:
        skip = tuple(f"{n}." for n in self.frozen_modules())
        return {k: v for k, v in self.state_dict().items() if not k.startswith(skip)}

    def load_checkpoint_state(self, state: Mapping[str, Tensor]) -> None:
        missing, unexpected = self.load_state_dict(dict(state), strict=False)
        skip = tuple(f"{n}." for n in self.frozen_modules())
        missing = [k for k in missing if not k.startswith(skip)]
        if missing or unexpected:
            raise TrainingError(
                "the checkpoint does not fit this model (missing "
                f"{', '.join(missing[:3]) or 'nothing'}; unexpected {', '.join(unexpected[:3]) or 'nothing'}); "
                "was it written by a different command or configuration?"
            )

    def export_state(self) -> dict[str, Tensor] | None:
        """What to remember from the best epoch (e.g. the head being fine-tuned); None: nothing."""
        return None


def freeze(module: nn.Module | None) -> nn.Module | None:
    if module is not None:
        for p in module.parameters():
            p.requires_grad_(False)
        module.eval()
    return module


# ---------------------------------------------------------------------------------------------
# deterministic data order


def _mix(*values: int) -> int:
    """A well-spread 63-bit seed from a few ints (SplitMix64 steps)."""
    x = 0x9E3779B97F4A7C15
    for v in values:
        x = (x ^ (int(v) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        x ^= x >> 31
    return x & 0x7FFFFFFFFFFFFFFF


class SeededItems(Dataset):
    """Wraps a dataset so item ``(epoch, index)`` is produced under its own RNG seed.

    Random augmentations then depend only on (seed, epoch, index), not on which worker loads the
    item or on what ran before; the caller's RNG state is left untouched.
    """

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset = dataset
        self.seed = seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]):
        epoch, index = key
        with torch.random.fork_rng(devices=[]):
            s = _mix(self.seed, epoch, index)
            torch.manual_seed(s)
            state = random.getstate()
            random.seed(s)
            try:
                return self.dataset[index]
            finally:
                random.setstate(state)


class EpochBatches(Sampler):
    """Batches of ``(epoch, index)`` for one rank: a seeded permutation per epoch, padded so every
    rank gets the same number of batches (as ``DistributedSampler``), from batch ``start`` on."""

    def __init__(self, size: int, batch_size: int, *, seed: int, epoch: int, rank: int = 0, world: int = 1,
                 shuffle: bool = True, drop_last: bool = True, start: int = 0):
        g = torch.Generator().manual_seed(_mix(seed, epoch, 0x5EED))
        order = torch.randperm(size, generator=g).tolist() if shuffle else list(range(size))
        if world > 1:
            per = math.ceil(size / world)
            order = (order * math.ceil(per * world / max(size, 1)))[: per * world]
            order = order[rank::world]
        if drop_last and len(order) >= batch_size:
            n = len(order) // batch_size
        else:
            n = math.ceil(len(order) / batch_size)
        self.batches = [[(epoch, i) for i in order[b * batch_size:(b + 1) * batch_size]] for b in range(n)]
        self.start = start

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        return iter(self.batches[self.start:])

    def __len__(self) -> int:
        return max(0, len(self.batches) - self.start)

    @property
    def total(self) -> int:
        return len(self.batches)


def worker_init(worker_id: int) -> None:
    # Ctrl-C reaches the whole process group: let the main process handle it (checkpoint, then
    # stop) instead of the workers dying under the loader.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def move_to(obj: Any, device: torch.device) -> Any:
    """Tensors (inside dataclasses, dicts, lists, tuples) moved to ``device``."""
    if isinstance(obj, Tensor):
        return obj.to(device, non_blocking=True)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.replace(obj, **{f.name: move_to(getattr(obj, f.name), device) for f in dataclasses.fields(obj)
                                           if f.init})
    if isinstance(obj, dict):
        return {k: move_to(v, device) for k, v in obj.items()}
    if isinstance(obj, list):
        return [move_to(v, device) for v in obj]
    if isinstance(obj, tuple) and not hasattr(obj, "_fields"):
        return tuple(move_to(v, device) for v in obj)
    return obj


def batch_images(batch: Any) -> int:
    images = getattr(batch, "images", None)
    if isinstance(images, Tensor):
        return int(images.shape[0])
    if isinstance(batch, (list, tuple)) and batch and isinstance(batch[0], Tensor):
        return int(batch[0].shape[0])
    return 0


# ---------------------------------------------------------------------------------------------
# logs


class MetricsLog:
    """``metrics.jsonl`` + ``train.csv``/``val.csv`` + TensorBoard (when installed), rank 0 only."""

    def __init__(self, workdir: Path, *, enabled: bool, tensorboard: bool, resume_step: int | None):
        self.enabled = enabled
        self.path = workdir / "metrics.jsonl"
        self.writer = None
        if not enabled:
            return
        workdir.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            self.path.write_text("")
        elif self.path.is_file():  # drop what was logged after the checkpoint we resume from
            keep = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("global_step", 0) <= resume_step]
            self.path.write_text("".join(line + "\n" for line in keep))
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is optional
                SummaryWriter = None
            if SummaryWriter is not None:
                self.writer = SummaryWriter(str(workdir / "tensorboard"), purge_step=resume_step)

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record, default=float) + "\n")
        if self.writer is not None:
            step = int(record.get("global_step", 0))
            kind = record.get("kind", "train")
            for key, value in record.items():
                if key not in ("kind", "epoch", "global_step", "step", "time") and isinstance(value, (int, float)):
                    self.writer.add_scalar(f"{kind}/{key}", value, step)

    def write_csv(self) -> None:
        if not self.enabled or not self.path.is_file():
            return
        rows: dict[str, list[dict]] = {"train": [], "val": []}
        for line in self.path.read_text().splitlines():
            if line.strip():
                rec = json.loads(line)
                rows.setdefault(rec.get("kind", "train"), []).append(rec)
        for kind, records in rows.items():
            if not records:
                continue
            fields: list[str] = []
            for rec in records:
                fields += [k for k in rec if k not in fields]
            with (self.path.parent / f"{kind}.csv").open("w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=fields)
                w.writeheader()
                w.writerows(records)

    def close(self) -> None:
        self.write_csv()
        if self.writer is not None:
            self.writer.close()


# ---------------------------------------------------------------------------------------------
# signals


class StopFlag:
    """SIGTERM/SIGINT set a flag that the loop checks after each step; a second SIGINT aborts."""

    def __init__(self):
        self.signum: int | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> "StopFlag":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum
        print(f"\nreceived {signal.Signals(signum).name}: saving a checkpoint after this step "
              "(Ctrl-C again to abort without saving)", file=sys.stderr, flush=True)

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)

    @property
    def set(self) -> bool:
        return self.signum is not None


# ---------------------------------------------------------------------------------------------
# the engine


@dataclass
class EngineConfig:
    workdir: Path
    epochs: int
    batch_size: int
    num_workers: int = 2
    seed: int = 0
    max_steps: int | None = None
    checkpoint_every: int = 500
    resume: bool = False
    keep_checkpoint: bool = False
    log_every: int = 10
    progress: bool = True
    amp: str = "auto"
    clip_grad: float | None = None
    tensorboard: bool = True
    signature: dict[str, Any] = field(default_factory=dict)  # config a resumed run must share


@dataclass
class ScheduledLR:
    scheduler: Any
    interval: str = "epoch"  # "epoch" or "step"


@dataclass
class FitResult:
    status: str  # "done" (all epochs), "max_steps" (stopped early, resumable), "interrupted"
    epoch: int
    global_step: int
    history: list[dict[str, Any]]
    best: dict[str, Any] | None
    signum: int | None = None

    @property
    def last_metrics(self) -> dict[str, float]:
        return dict(self.history[-1]["metrics"]) if self.history else {}


def amp_dtype(mode: str, device: torch.device) -> torch.dtype | None:
    if device.type != "cuda" or mode == "off":
        return None
    if mode == "fp16":
        return torch.float16
    if mode == "bf16":
        return torch.bfloat16
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


class Engine:
    def __init__(self, cfg: EngineConfig, info: DistInfo, name: str):
        self.cfg = cfg
        self.info = info
        self.name = name
        self.ckpt_dir = Path(cfg.workdir) / "checkpoint"
        self.ckpt_path = self.ckpt_dir / "last.pt"
        self.autocast_dtype = amp_dtype(cfg.amp, info.device)

    # -- public ------------------------------------------------------------------------------
    def autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type="cuda", dtype=self.autocast_dtype)

    def has_checkpoint(self) -> bool:
        return self.ckpt_path.is_file()

    def fit(
        self,
        objective: Objective,
        optimizers: Mapping[str, torch.optim.Optimizer],
        schedulers: Sequence[ScheduledLR],
        train_set: Dataset,
        collate: Callable[[list], Any],
        validate: Callable[[int], dict[str, float]] | None = None,
        best_metric: str | None = None,
    ) -> FitResult:
        cfg, info = self.cfg, self.info
        objective.to(info.device)
        scaler = torch.amp.GradScaler("cuda", enabled=self.autocast_dtype == torch.float16)
        history: list[dict[str, Any]] = []
        best: dict[str, Any] | None = None
        start_epoch = start_batch = global_step = 0

        resumed = False
        if cfg.resume:
            if self.has_checkpoint():
                state = self._load(objective, optimizers, schedulers, scaler)
                start_epoch, start_batch, global_step = state["epoch"], state["batch"], state["global_step"]
                history, best = state["history"], state["best"]
                resumed = True
                if info.is_main:
                    print(f"[{self.name}] resuming from {self.ckpt_path} at epoch {start_epoch + 1}, "
                          f"batch {start_batch}, step {global_step}", flush=True)
            elif info.is_main:
                print(f"[{self.name}] --resume: no checkpoint in {self.ckpt_dir}; starting from scratch", flush=True)
        if not resumed:
            torch.manual_seed(_mix(cfg.seed, info.rank, 0x7A1))
            random.seed(cfg.seed + info.rank)
            np.random.seed((cfg.seed + info.rank) % 2**32)

        log = MetricsLog(Path(cfg.workdir), enabled=info.is_main, tensorboard=cfg.tensorboard,
                         resume_step=global_step if resumed else None)
        model: nn.Module = objective
        trainable = [p for p in objective.parameters() if p.requires_grad]
        if info.distributed and trainable:
            from torch.nn.parallel import DistributedDataParallel as DDP

            model = DDP(objective, device_ids=[info.device.index] if info.device.type == "cuda" else None)
        if cfg.epochs > 0 and not trainable:
            raise TrainingError("nothing to train: every parameter is frozen")

        data = SeededItems(train_set, cfg.seed)
        status, signum = "done", None
        epoch = start_epoch
        with StopFlag() as stop:
            try:
                for epoch in range(start_epoch, cfg.epochs):
                    first = start_batch if epoch == start_epoch else 0
                    sampler = EpochBatches(len(train_set), cfg.batch_size, seed=cfg.seed, epoch=epoch, rank=info.rank,
                                           world=info.world_size, start=first)
                    if sampler.total == 0:
                        raise TrainingError("the training set is empty")
                    loader = DataLoader(
                        data, batch_sampler=sampler, collate_fn=collate, num_workers=cfg.num_workers,
                        worker_init_fn=worker_init, pin_memory=info.device.type == "cuda",
                        generator=torch.Generator().manual_seed(_mix(cfg.seed, epoch, 0xD1)),
                        persistent_workers=False,
                    )
                    objective.train()
                    outcome, global_step = self._run_epoch(model, objective, optimizers, schedulers, scaler, loader,
                                                           sampler, epoch, first, global_step, log, stop, history, best)
                    if outcome != "continue":
                        status = outcome
                        signum = stop.signum
                        break
                    for s in schedulers:
                        if s.interval == "epoch":
                            s.scheduler.step()
                    metrics: dict[str, float] = {}
                    if validate is not None and info.is_main:
                        metrics = validate(epoch)
                        record = {"kind": "val", "epoch": epoch + 1, "global_step": global_step, **metrics}
                        history.append({"epoch": epoch + 1, "global_step": global_step, "metrics": metrics})
                        log.write(record)
                        if best_metric is not None and best_metric in metrics and (
                            best is None or metrics[best_metric] > best["value"]
                        ):
                            exported = objective.export_state()
                            best = {
                                "value": float(metrics[best_metric]),
                                "epoch": epoch + 1,
                                "metrics": dict(metrics),
                                "state": {k: v.detach().cpu().clone() for k, v in exported.items()} if exported else None,
                            }
                        self._epoch_line(epoch, metrics, best, best_metric)
                    self._save(objective, optimizers, schedulers, scaler, epoch + 1, 0, global_step, history, best)
                    log.write_csv()
                    if dist_utils.any_true(info, stop.set):
                        status, signum = "interrupted", stop.signum
                        epoch += 1
                        break
                    if cfg.max_steps is not None and global_step >= cfg.max_steps and epoch + 1 < cfg.epochs:
                        status = "max_steps"
                        epoch += 1
                        break
                else:
                    epoch = cfg.epochs
            finally:
                log.close()
        dist_utils.barrier(info)
        if status == "done" and not cfg.keep_checkpoint and info.is_main and self.has_checkpoint():
            for p in self.ckpt_dir.glob("*.pt"):
                p.unlink()
            with contextlib.suppress(OSError):
                self.ckpt_dir.rmdir()
        if status == "interrupted" and info.is_main:
            name = signal.Signals(signum).name if signum else "signal"
            print(f"[{self.name}] stopped by {name} at step {global_step}; checkpoint saved in {self.ckpt_dir}; "
                  "run the same command with --resume to continue", file=sys.stderr, flush=True)
        return FitResult(status, epoch, global_step, history, best, signum)

    # -- one epoch ---------------------------------------------------------------------------
    def _run_epoch(self, model, objective, optimizers, schedulers, scaler, loader, sampler, epoch, first, global_step,
                   log, stop, history, best) -> tuple[str, int]:
        from tqdm.auto import tqdm

        cfg, info = self.cfg, self.info
        show = cfg.progress and info.is_main
        bar = tqdm(total=sampler.total, initial=first, desc=f"{self.name} {epoch + 1}/{cfg.epochs}", unit="step",
                   disable=not show, dynamic_ncols=True, leave=False, file=sys.stderr,
                   mininterval=0.5 if sys.stderr.isatty() else 30.0)
        running: dict[str, float] = {}
        count = 0
        t_last, images_since = time.perf_counter(), 0
        try:
            for batch_index, batch in enumerate(loader, start=first):
                batch = move_to(batch, info.device)
                n_img = batch_images(batch)
                with self.autocast():
                    losses, logs = model(batch)
                main_terms = {k: v for k, v in losses.items() if k not in objective.aux_terms}
                loss = sum(main_terms.values())
                total = loss + sum(v for k, v in losses.items() if k in objective.aux_terms)
                if not torch.isfinite(total.detach()):
                    terms = ", ".join(f"{k} {float(v):.4g}" for k, v in losses.items())
                    raise TrainingError(f"non-finite loss at epoch {epoch + 1} step {global_step + 1} ({terms}); "
                                        "lower --lr or check the data")
                for opt in optimizers.values():
                    opt.zero_grad(set_to_none=True)
                scaler.scale(total).backward()
                if cfg.clip_grad and "main" in optimizers:
                    # Only the task/codec gradients: the prior's quantile (aux) optimizer is its own
                    # problem, and clipping both together would couple them through one norm.
                    scaler.unscale_(optimizers["main"])
                    torch.nn.utils.clip_grad_norm_(_params_of(optimizers["main"]), cfg.clip_grad)
                for opt in optimizers.values():
                    scaler.step(opt)
                scaler.update()
                for s in schedulers:
                    if s.interval == "step":
                        s.scheduler.step()
                global_step += 1
                images_since += n_img * info.world_size

                values = {"loss": float(loss.detach()), **{k: float(v.detach()) for k, v in losses.items()},
                          **{k: float(v) for k, v in logs.items()}}
                for k, v in values.items():
                    running[k] = running.get(k, 0.0) + v
                count += 1
                if info.is_main and (global_step % max(cfg.log_every, 1) == 0 or batch_index == sampler.total - 1):
                    now = time.perf_counter()
                    ips = images_since / max(now - t_last, 1e-9)
                    t_last, images_since = now, 0
                    lr = next(iter(optimizers.values())).param_groups[0]["lr"] if optimizers else 0.0
                    log.write({"kind": "train", "epoch": epoch + 1, "step": batch_index + 1, "global_step": global_step,
                               **values, "lr": lr, "images_per_s": ips, "time": time.time()})
                    post = {"loss": f"{values['loss']:.4f}"}
                    if "bpp" in values:
                        post["bpp"] = f"{values['bpp']:.3f}"
                    post["img/s"] = f"{ips:.1f}"
                    bar.set_postfix(post, refresh=False)
                bar.update(1)

                stopping = dist_utils.any_true(info, stop.set)
                at_max = cfg.max_steps is not None and global_step >= cfg.max_steps
                periodic = cfg.checkpoint_every > 0 and global_step % cfg.checkpoint_every == 0
                end_of_epoch = batch_index + 1 == sampler.total
                if (stopping or at_max or periodic) and not end_of_epoch:
                    self._save(objective, optimizers, schedulers, scaler, epoch, batch_index + 1, global_step,
                               history, best)
                if stopping and not end_of_epoch:
                    return "interrupted", global_step
                if at_max and not end_of_epoch:
                    return "max_steps", global_step
        finally:
            bar.close()
        if info.is_main and count:
            self._train_means = {k: v / count for k, v in running.items()}
        return "continue", global_step

    def _epoch_line(self, epoch: int, metrics: dict[str, float], best, best_metric) -> None:
        parts = [f"[{self.name}] epoch {epoch + 1}/{self.cfg.epochs}"]
        means = getattr(self, "_train_means", {})
        if "loss" in means:
            parts.append(f"train loss {means['loss']:.4f}")
        if "bpp" in means:
            parts.append(f"bpp {means['bpp']:.3f}")
        if metrics:
            parts.append("| val " + ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()))
        if best is not None and best_metric is not None and best["epoch"] == epoch + 1:
            parts.append("(best)")
        print("  ".join(parts), flush=True)

    # -- checkpoints -------------------------------------------------------------------------
    def _save(self, objective, optimizers, schedulers, scaler, epoch, batch, global_step, history, best) -> None:
        info = self.info
        self.ckpt_dir.mkdir(parents=True, exist_ok=True) if info.is_main else None
        dist_utils.barrier(info)
        rng = {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "python": random.getstate(),
            "numpy": _numpy_state(),
        }
        _atomic_save({"rng": rng}, self.ckpt_dir / f"rng-rank{info.rank}.pt")
        if info.is_main:
            state = {
                "format": CHECKPOINT_FORMAT,
                "version": CHECKPOINT_VERSION,
                "command": self.name,
                "signature": _plain(self.cfg.signature),
                "world_size": info.world_size,
                "epoch": epoch,
                "batch": batch,
                "global_step": global_step,
                "model": {k: v.detach().cpu() for k, v in objective.checkpoint_state().items()},
                "optimizers": {k: o.state_dict() for k, o in optimizers.items()},
                "schedulers": [s.scheduler.state_dict() for s in schedulers],
                "scaler": scaler.state_dict(),
                "history": _plain(history),
                "best": best,
            }
            _atomic_save(state, self.ckpt_path)
        dist_utils.barrier(info)

    def _load(self, objective, optimizers, schedulers, scaler) -> dict:
        try:
            state = torch.load(self.ckpt_path, map_location="cpu", weights_only=True)
        except Exception as e:  # corrupt/truncated file, or one with pickled code in it
            raise TrainingError(f"{self.ckpt_path}: cannot read the checkpoint ({type(e).__name__}: "
                                f"{str(e).splitlines()[0] if str(e) else ''})") from None
        if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
            raise TrainingError(f"{self.ckpt_path}: not a splitserve training checkpoint")
        if state.get("command") != self.name:
            raise TrainingError(f"{self.ckpt_path}: checkpoint of `{state.get('command')}`, not `{self.name}`")
        saved, now = state.get("signature", {}), _plain(self.cfg.signature)
        diff = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
        if diff:
            detail = "; ".join(f"{k}: checkpoint {saved.get(k)!r}, now {now.get(k)!r}" for k in diff[:4])
            raise TrainingError(f"{self.ckpt_path}: the checkpoint was made with different settings ({detail}); "
                                "use the same options to resume, or another --workdir to start over")
        objective.load_checkpoint_state(state["model"])
        objective.to(self.info.device)
        for name, opt in optimizers.items():
            opt.load_state_dict(state["optimizers"][name])
        for s, sd in zip(schedulers, state["schedulers"]):
            s.scheduler.load_state_dict(sd)
        scaler.load_state_dict(state["scaler"])
        rng_path = self.ckpt_dir / f"rng-rank{self.info.rank}.pt"
        if rng_path.is_file():
            rng = torch.load(rng_path, map_location="cpu", weights_only=True)["rng"]
            torch.set_rng_state(rng["torch"])
            if rng["cuda"] and torch.cuda.is_available() and len(rng["cuda"]) == torch.cuda.device_count():
                torch.cuda.set_rng_state_all(rng["cuda"])
            random.setstate(_tuplify(rng["python"]))
            _set_numpy_state(rng["numpy"])
        else:  # a different number of processes than before: reseed deterministically
            torch.manual_seed(_mix(self.cfg.seed, self.info.rank, state["global_step"]))
        if state.get("world_size") != self.info.world_size and self.info.is_main:
            print(f"[{self.name}] note: checkpoint written by {state.get('world_size')} processes, resuming with "
                  f"{self.info.world_size}; the data order of the current epoch changes", flush=True)
        return state


def _params_of(optimizer: torch.optim.Optimizer) -> list[Tensor]:
    return [p for group in optimizer.param_groups for p in group["params"]]


def _atomic_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _numpy_state() -> dict[str, Any]:
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
            "has_gauss": int(has_gauss), "cached": float(cached)}


def _set_numpy_state(s: Mapping[str, Any]) -> None:
    np.random.set_state((s["name"], s["keys"].numpy().astype(np.uint32), s["pos"], s["has_gauss"], s["cached"]))


def _tuplify(x: Any) -> Any:
    return tuple(_tuplify(v) for v in x) if isinstance(x, (list, tuple)) else x


def _plain(obj: Any) -> Any:
    """JSON-like values only (what ``weights_only`` loading accepts without allow-listing)."""
    return json.loads(json.dumps(obj, default=str))

