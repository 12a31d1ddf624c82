"""The skeleton every training command shares, written once.

A command is a :class:`Stage`. It says what is trained (:meth:`Stage.plan` returns a :class:`Plan`:
the objective, its parameter groups, the data, how the weights are measured) and what is written
(:meth:`Stage.write`). :meth:`Stage.run` does the rest the same way for every command: the
(distributed) session, the work dir, optimizers and schedules from the options, the engine with its
checkpoints and ``--resume``, the exit after SIGTERM/SIGINT, the final metrics, the provenance, and
removing the checkpoint once the outputs are written. A new training procedure (another loss,
several teachers) is a new :class:`~splitserve.training.objective.Objective` and a small Stage.
"""

from __future__ import annotations

import json
import signal
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from torch import nn

from ..bundle import default_provenance
from ..errors import SplitserveError, Stopped
from . import distributed as dist_utils
from .common import TaskData
from .distributed import DistInfo
from .engine import Engine, EngineConfig, FitResult
from .objective import Objective
from .optim import build_optimizers


@dataclass
class Plan:
    """What one run trains and how its weights are measured."""

    name: str  # the run's name: log prefix, and the command a checkpoint belongs to
    title: str  # the provenance's "stage"
    objective: Objective
    # "main" (--optimizer, --lr, --scheduler); "aux": a prior's quantiles; "prior": the entropy model (--prior-lr)
    params: Mapping[str, Sequence[nn.Parameter]]
    data: TaskData
    collate: Callable[[list], Any]
    validate: Callable[[], dict[str, float]]
    best_metric: str | None = None  # remember the best epoch's Objective.export_state() by this metric
    validate_epochs: bool = True  # validate after every epoch (False: only the weights written)
    provenance: dict[str, Any] = field(default_factory=dict)  # the stage's own provenance entries
    # after training, before the final metrics (rank 0): a change to the weights that is not training,
    # e.g. refitting the entropy model; returns provenance entries, and the final metrics are measured anew
    finish: Callable[[], dict[str, Any]] | None = None


class Stage(ABC):
    """A training command from its resolved options to its outputs."""

    refuse_restart = False  # without --resume, refuse a work dir holding a checkpoint (else start over)

    info: DistInfo  # this process's place in the run, set by run()

    def __init__(self, cfg: SimpleNamespace):
        self.cfg = cfg
        # (training, validation) seconds of the steps this command ran before this one (the
        # reference procedure's feature step), so provenance times the whole command
        self.earlier_seconds = (0.0, 0.0)
        self.engine: Engine | None = None  # set by run()
        self.result: FitResult | None = None  # set by run()

    @abstractmethod
    def default_workdir(self) -> Path:
        """Logs and checkpoints when ``--workdir`` is not given."""

    @abstractmethod
    def plan(self) -> Plan:
        """Build what the run trains (inside the session: ``self.info`` is set)."""

    @abstractmethod
    def write(self, plan: Plan, result: FitResult, metrics: dict[str, float],
              provenance: dict[str, Any]) -> str | None:
        """Write the outputs (rank 0); return the line that tells the user what was written."""

    def signature(self) -> dict[str, Any]:
        """The settings a ``--resume`` must share with the run it continues."""
        return signature(self.cfg)

    def note(self, text: str) -> None:
        """Tell the user something about the run, once (rank 0 under torchrun)."""
        if self.info.is_main:
            print(text, flush=True)

    def run(self) -> int:
        cfg = self.cfg
        with session(cfg) as info:
            self.info = info
            plan = self.plan()
            workdir = Path(cfg.workdir) if cfg.workdir else self.default_workdir()
            engine = Engine(engine_config(cfg, workdir, self.signature(), self.refuse_restart), info, plan.name)
            optimizers, schedulers = build_optimizers(plan.params, cfg, len(plan.data.train_set), info.world_size)
            result = engine.fit(plan.objective, optimizers, schedulers, plan.data.train_set, plan.collate,
                                plan.validate if plan.validate_epochs else None, plan.best_metric)
            self.engine, self.result = engine, result
            if result.status == "interrupted":  # a checkpoint was saved; the CLI exits 128 + signal
                raise Stopped(result.signum or signal.SIGTERM)
            if not info.is_main:  # only rank 0 writes outputs
                return 0
            finished = plan.finish() if plan.finish is not None else {}
            metrics = engine.final_metrics(result, plan.validate, fresh=bool(finished))
            line = self.write(plan, result, metrics, {**self.provenance(plan, result), **finished})
            if line:
                print(line, flush=True)
            engine.outputs_written(result)
            return 0

    def provenance(self, plan: Plan, result: FitResult) -> dict[str, Any]:
        """Where outputs came from: versions and time, the exact command, data, run length, seed."""
        cfg = self.cfg
        command = {"command": cfg.command_line} if getattr(cfg, "command_line", None) else {}
        data = plan.data
        return default_provenance(stage=plan.title, **command, data=str(data.root), train_images=len(data.train_set),
                                  val_images=len(data.val_set), epochs=cfg.epochs, steps=result.global_step,
                                  seed=cfg.seed, stopped_early=result.status == "max_steps",
                                  train_seconds=round(result.seconds + self.earlier_seconds[0], 1),
                                  val_seconds=round(result.val_seconds + self.earlier_seconds[1], 1), **plan.provenance)


@contextmanager
def session(cfg: SimpleNamespace) -> Iterator[DistInfo]:
    """The process group (under torchrun) or the single process, torn down whatever happens."""
    info = dist_utils.setup(cfg.device)
    try:
        yield info
    finally:
        dist_utils.teardown(info)


def engine_config(cfg: SimpleNamespace, workdir: Path, signature: Mapping[str, Any],
                  refuse_restart: bool = False) -> EngineConfig:
    for name in ("epochs", "batch_size", "num_workers", "log_every"):
        value = getattr(cfg, name)
        least = 0 if name in ("epochs", "num_workers") else 1
        if value < least:
            raise SplitserveError(f"--{name.replace('_', '-')} must be >= {least}, got {value}")
    if cfg.max_steps is not None and cfg.max_steps < 1:
        raise SplitserveError(f"--max-steps must be >= 1, got {cfg.max_steps}")
    given = {"workdir": Path(workdir), "signature": dict(signature), "refuse_restart": refuse_restart}
    options = {f.name: getattr(cfg, f.name) for f in fields(EngineConfig) if f.name not in given}  # same names
    return EngineConfig(**given, **options)


# Options that may differ between an interrupted run and its --resume.
_RESUME_FREE = {
    "resume", "max_steps", "num_workers", "progress", "tensorboard", "log_every", "checkpoint_every", "device",
    "workdir", "keep_checkpoint", "val_batch_size", "recipe", "command", "command_line", "given",
    "refit_steps",  # after training: a run may resume with another
}


def signature(cfg: SimpleNamespace) -> dict[str, Any]:
    return {k: v for k, v in json.loads(json.dumps(vars(cfg), default=str)).items() if k not in _RESUME_FREE}


def bundle_workdir(out: Path, name: str) -> Path:
    """Logs/checkpoints of a bundle-producing command live next to the bundle, not inside it
    (bundles are written atomically by replacing the directory)."""
    out = Path(out)
    return out.parent / f"{out.name}.runs" / name
