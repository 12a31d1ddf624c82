"""The skeleton every training command shares: a (distributed) session, what an interrupted or
non-main process returns, and the provenance record written with the outputs."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from torch.utils.data import Dataset

from ..bundle import default_provenance
from . import distributed as dist_utils
from .distributed import DistInfo
from .engine import FitResult


@contextmanager
def session(cfg: SimpleNamespace) -> Iterator[DistInfo]:
    """The process group (under torchrun) or the single process, torn down whatever happens."""
    info = dist_utils.setup(cfg.device)
    try:
        yield info
    finally:
        dist_utils.teardown(info)


def early_exit(result: FitResult, info: DistInfo) -> int | None:
    """The exit status when the command must stop here: 128 + signal after SIGTERM/SIGINT (a
    checkpoint was saved), 0 on ranks other than 0 (only rank 0 writes outputs); None: go on."""
    if result.status == "interrupted":
        return 128 + (result.signum or 15)
    if not info.is_main:
        return 0
    return None


def provenance(stage: str, cfg: SimpleNamespace, result: FitResult, *, data_root: Path, train_set: Dataset | None,
               val_set: Dataset, **extra: Any) -> dict[str, Any]:
    """Where outputs came from: versions and time, the exact command, data, run length, seed."""
    return default_provenance(
        stage=stage,
        command=cfg.command_line,
        data=str(data_root),
        train_images=len(train_set) if train_set is not None else 0,
        val_images=len(val_set),
        epochs=cfg.epochs,
        steps=result.global_step,
        seed=cfg.seed,
        stopped_early=result.status == "max_steps",
        **extra,
    )
