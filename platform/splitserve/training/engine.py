"""The one training loop behind ``platform teacher``, ``distill``, ``finetune`` and ``train``.

A command builds an :class:`~splitserve.training.objective.Objective` (an ``nn.Module`` whose
``forward(batch)`` returns named loss terms), its optimizers and schedulers, and hands them to
:meth:`Engine.fit`, which runs the loop. The rest lives in one module per concern:
:mod:`.objective` (loss terms, frozen parts), :mod:`.sampling` (deterministic data order),
:mod:`.checkpoint` (save/resume incl. RNG state), :mod:`.stopping` (SIGTERM/Ctrl-C), :mod:`.logs`
(metric logs).

- **DDP**: under torchrun the objective is wrapped in ``DistributedDataParallel`` (the loss is
  computed inside ``forward``, so every trainable parameter, the prior's quantiles included, is
  synchronised); each rank reads its own shard of a seeded permutation; rank 0 logs, validates
  and saves; ranks meet at barriers.
- **Checkpoints**: every ``checkpoint_every`` steps, at each epoch end, on SIGTERM/SIGINT (the
  handler only sets a flag; the loop saves after the current step and returns; a signal during a
  validation ends it at once, and the resumed run validates that epoch first), and at
  ``max_steps``; written so that a kill at any instant leaves a good one (:mod:`.checkpoint`);
  ``resume`` continues exactly (an interrupted-and-resumed CPU run ends with bit-identical weights).
- **Mixed precision**: bf16/fp16 autocast on CUDA (GradScaler for fp16), bf16 on CPU when asked.
"""

from __future__ import annotations

import contextlib
import random
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from . import distributed as dist_utils
from .checkpoint import CheckpointStore
from .distributed import DistInfo
from .logs import MetricsLog
from .objective import Objective, TrainingError
from .sampling import EpochBatches, SeededItems, batch_images, mix_seed, move_to
from .stopping import StopFlag, StopRequested, StopSafeLoader, report_stopped

__all__ = ["Engine", "EngineConfig", "FitResult", "ScheduledLR", "TrainState"]


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
    refuse_restart: bool = False  # without resume, refuse a work dir holding a checkpoint (else start over)


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
    seconds: float = 0.0  # wall time spent training in fit (validation not counted), summed over resumes
    val_seconds: float = 0.0  # wall time spent validating, summed over resumes


@dataclass
class TrainState:
    """Everything the loop changes as it runs; what a checkpoint saves and a resume restores."""

    objective: Objective
    model: nn.Module  # the objective, or its DistributedDataParallel wrapper
    optimizers: dict[str, torch.optim.Optimizer]
    schedulers: list[ScheduledLR]
    scaler: torch.amp.GradScaler
    global_step: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    best: dict[str, Any] | None = None
    seconds: float = 0.0  # wall time in fit before this process (from the checkpoint) ...
    started: float = field(default_factory=time.perf_counter)  # ... and when this process began fitting
    val_seconds: float = 0.0  # of all that, the time spent validating (over every resume)

    def elapsed(self) -> float:
        """Training wall time so far, over every resume: what a checkpoint stores as ``seconds``."""
        return self.seconds + time.perf_counter() - self.started


def amp_dtype(mode: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of ``--amp`` on ``device``. On CUDA ``auto`` picks bf16 where supported,
    else fp16. On CPU only an explicit ``bf16`` turns autocast on: CPUs with AVX512-BF16/AMX train
    ResNets about 1.4x faster with it, older ones slower, so it is never a silent default."""
    if mode == "off":
        return None
    if device.type == "cuda":
        if mode == "fp16":
            return torch.float16
        if mode == "bf16":
            return torch.bfloat16
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if mode == "fp16":
        raise TrainingError(f"--amp fp16 needs a CUDA device (training on {device.type}); use --amp bf16 or off")
    return torch.bfloat16 if mode == "bf16" and device.type == "cpu" else None


class Engine:
    def __init__(self, cfg: EngineConfig, info: DistInfo, name: str):
        self.cfg = cfg
        self.info = info
        self.name = name
        self.checkpoints = CheckpointStore(cfg.workdir, info, name, cfg.signature, cfg.seed)
        self.autocast_dtype = amp_dtype(cfg.amp, info.device)
        self.log: MetricsLog | None = None

    def autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.info.device.type, dtype=self.autocast_dtype)

    def fit(
        self,
        objective: Objective,
        optimizers: Mapping[str, torch.optim.Optimizer],
        schedulers: Sequence[ScheduledLR],
        train_set: Dataset,
        collate: Callable[[list], Any],
        validate: Callable[[], dict[str, float]] | None = None,
        best_metric: str | None = None,
    ) -> FitResult:
        cfg, info = self.cfg, self.info
        objective.to(info.device)
        scaler = torch.amp.GradScaler("cuda", enabled=self.autocast_dtype == torch.float16)
        state = TrainState(objective, objective, dict(optimizers), list(schedulers), scaler)
        start_epoch = start_batch = 0

        resumed = False
        if cfg.resume:
            if self.checkpoints.exists():
                start_epoch, start_batch = self.checkpoints.load(state)
                resumed = True
                if info.is_main and start_epoch >= cfg.epochs:
                    print(f"[{self.name}] {self.checkpoints.loaded} holds the finished run (step {state.global_step}); "
                          "writing its outputs", flush=True)
                elif info.is_main:
                    print(f"[{self.name}] resuming from {self.checkpoints.loaded} at epoch {start_epoch + 1}, "
                          f"batch {start_batch}, step {state.global_step}", flush=True)
            elif info.is_main:
                print(f"[{self.name}] --resume: no checkpoint in {self.checkpoints.dir}; starting from scratch",
                      flush=True)
        elif cfg.refuse_restart and self.checkpoints.exists():
            raise TrainingError(f"{self.checkpoints.dir} holds a checkpoint: pass --resume to continue it, "
                                "or use another --workdir")
        if not resumed:
            torch.manual_seed(mix_seed(cfg.seed, info.rank, 0x7A1))
            random.seed(cfg.seed + info.rank)
            np.random.seed((cfg.seed + info.rank) % 2**32)

        log = self.log = MetricsLog(Path(cfg.workdir), enabled=info.is_main, tensorboard=cfg.tensorboard,
                                    resume_step=state.global_step if resumed else None)
        trainable = [p for p in objective.parameters() if p.requires_grad]
        if info.distributed and trainable:
            from torch.nn.parallel import DistributedDataParallel as DDP

            state.model = DDP(objective, device_ids=[info.device.index] if info.device.type == "cuda" else None,
                              find_unused_parameters=objective.unused_parameters)
        if cfg.epochs > 0 and not trainable:
            raise TrainingError("nothing to train: every parameter is frozen")

        data = SeededItems(train_set, cfg.seed)
        status, signum = "done", None
        # an epoch-end checkpoint whose epoch has no validation: a stop signal cut it short
        pending_validation = (resumed and validate is not None and start_batch == 0 and start_epoch > 0
                              and (not state.history or state.history[-1]["epoch"] < start_epoch))
        epoch = start_epoch
        with StopFlag() as stop:
            try:
                if pending_validation:  # a stop signal cut the last epoch's validation short: do it now
                    if info.is_main and self._validate(state, start_epoch - 1, validate, best_metric, log, stop):
                        self.checkpoints.save(state, start_epoch, 0)
                    if dist_utils.any_true(info, stop.set):
                        status, signum = "interrupted", stop.signum
                if status == "done":
                    for epoch in range(start_epoch, cfg.epochs):
                        first = start_batch if epoch == start_epoch else 0
                        sampler = EpochBatches(len(train_set), cfg.batch_size, seed=cfg.seed, epoch=epoch,
                                               rank=info.rank, world=info.world_size, start=first)
                        if sampler.total == 0:
                            raise TrainingError("the training set is empty")
                        loader = StopSafeLoader(
                            data, batch_sampler=sampler, collate_fn=collate, num_workers=cfg.num_workers,
                            pin_memory=info.device.type == "cuda",
                            generator=torch.Generator().manual_seed(mix_seed(cfg.seed, epoch, 0xD1)),
                            persistent_workers=False,
                        )
                        objective.train()
                        outcome = self._run_epoch(state, loader, sampler, epoch, first, log, stop)
                        if outcome != "continue":
                            status = outcome
                            signum = stop.signum
                            break
                        for s in state.schedulers:
                            if s.interval == "epoch":
                                s.scheduler.step()
                        if validate is not None and info.is_main:
                            self._validate(state, epoch, validate, best_metric, log, stop)
                        self.checkpoints.save(state, epoch + 1, 0)
                        log.write_csv()
                        if dist_utils.any_true(info, stop.set):
                            status, signum = "interrupted", stop.signum
                            epoch += 1
                            break
                        if cfg.max_steps is not None and state.global_step >= cfg.max_steps and epoch + 1 < cfg.epochs:
                            status = "max_steps"
                            epoch += 1
                            break
                    else:
                        epoch = cfg.epochs
            finally:
                log.close()
        dist_utils.barrier(info)
        if status == "interrupted" and info.is_main:
            report_stopped(self.name, signum, state.global_step, self.checkpoints.dir)
        return FitResult(status, epoch, state.global_step, state.history, state.best, signum,
                         state.elapsed() - state.val_seconds, state.val_seconds)

    def _validate(self, state: TrainState, epoch: int, validate: Callable[[], dict[str, float]],
                  best_metric: str | None, log: MetricsLog, stop: StopFlag) -> bool:
        """Validate after epoch ``epoch`` (0-based): log it, keep the best weights so far. False when a
        stop signal cut it short: nothing is recorded, so a resume from the epoch-end checkpoint
        validates that epoch before it trains on."""
        began = time.perf_counter()
        try:
            with stop.interrupting():
                metrics = validate()
        except StopRequested:
            return False
        finally:
            state.val_seconds += time.perf_counter() - began
        log.write({"kind": "val", "epoch": epoch + 1, "global_step": state.global_step, **metrics})
        state.history.append({"epoch": epoch + 1, "global_step": state.global_step, "metrics": metrics})
        if best_metric is not None and best_metric in metrics and (
            state.best is None or metrics[best_metric] > state.best["value"]
        ):
            exported = state.objective.export_state()
            state.best = {
                "value": float(metrics[best_metric]),
                "epoch": epoch + 1,
                "metrics": dict(metrics),
                "state": {k: v.detach().cpu().clone() for k, v in exported.items()} if exported else None,
            }
        self._epoch_line(epoch, metrics, state.best, best_metric)
        return True

    def final_metrics(self, result: FitResult, validate: Callable[[], dict[str, float]],
                      fresh: bool = False) -> dict[str, float]:
        """The metrics of the weights a command writes (rank 0): the last validation's when it saw
        them (it ran at the last step and nothing changed them since: not ``fresh``), else a new
        validation, logged like the others."""
        last = result.history[-1] if result.history else None
        if not fresh and last is not None and last["global_step"] == result.global_step:
            return dict(last["metrics"])
        metrics = validate()
        if self.log is not None:
            self.log.write({"kind": "val", "epoch": result.epoch, "global_step": result.global_step, **metrics})
            self.log.write_csv()
        return metrics

    def outputs_written(self, result: FitResult) -> None:
        """The command wrote what it trained: a finished run's checkpoint goes (``--keep-checkpoint``
        keeps it). Not before: a crash or SIGTERM while the outputs are measured and written must
        not cost the training, ``--resume`` then starts after the last epoch."""
        if result.status == "done" and not self.cfg.keep_checkpoint and self.info.is_main and self.checkpoints.exists():
            self.checkpoints.clear()

    def _run_epoch(self, state: TrainState, loader, sampler: EpochBatches, epoch: int, first: int, log: MetricsLog,
                   stop: StopFlag) -> str:
        """One epoch from batch ``first``: "continue", or "interrupted"/"max_steps" after a checkpoint."""
        from tqdm.auto import tqdm

        cfg, info = self.cfg, self.info
        objective, optimizers, scaler = state.objective, state.optimizers, state.scaler
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
                objective.begin_step(state.global_step)
                with self.autocast():
                    losses, logs = state.model(batch)
                main_terms = {k: v for k, v in losses.items() if k not in objective.aux_terms}
                loss = sum(main_terms.values())
                total = loss + sum(v for k, v in losses.items() if k in objective.aux_terms)
                if not torch.isfinite(total.detach()):
                    terms = ", ".join(f"{k} {float(v):.4g}" for k, v in losses.items())
                    raise TrainingError(f"non-finite loss at epoch {epoch + 1} step {state.global_step + 1} ({terms}); "
                                        "lower --lr or check the data")
                for opt in optimizers.values():
                    opt.zero_grad(set_to_none=True)
                scaler.scale(total).backward()
                if cfg.clip_grad:
                    clip_each(optimizers, scaler, cfg.clip_grad)
                for opt in optimizers.values():
                    scaler.step(opt)
                scaler.update()
                for s in state.schedulers:
                    if s.interval == "step":
                        s.scheduler.step()
                state.global_step += 1
                global_step = state.global_step
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
                    self.checkpoints.save(state, epoch, batch_index + 1)
                if stopping and not end_of_epoch:
                    return "interrupted"
                if at_max and not end_of_epoch:
                    return "max_steps"
        finally:
            bar.close()
        if info.is_main and count:
            self._train_means = {k: v / count for k, v in running.items()}
        return "continue"

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


def _params_of(optimizer: torch.optim.Optimizer) -> list[Tensor]:
    return [p for group in optimizer.param_groups for p in group["params"]]


def clip_each(optimizers: dict[str, torch.optim.Optimizer], scaler, max_norm: float) -> None:
    """Clip the task/codec (``main``) and the entropy model's (``prior``) gradients each to its own
    norm: one norm over both would let the larger scale the other's step. The quantiles' ``aux``
    optimizer is its own problem and is not clipped."""
    for name in ("main", "prior"):
        if name in optimizers:
            scaler.unscale_(optimizers[name])
            torch.nn.utils.clip_grad_norm_(_params_of(optimizers[name]), max_norm)
