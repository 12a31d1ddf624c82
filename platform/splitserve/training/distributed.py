"""torchrun / DDP plumbing: one process per GPU (or per CPU worker), rank 0 logs and saves.

Without torchrun (no ``WORLD_SIZE`` in the environment) everything runs in one process and
none of this touches ``torch.distributed``.
"""

from __future__ import annotations

import datetime as _dt
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..errors import SplitserveError


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    initialized: bool = False  # True when this module started a process group

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def pick_device(spec: str | None, local_rank: int = 0) -> torch.device:
    """``auto`` → ``cuda:LOCAL_RANK`` when CUDA is available, else ``cpu``."""
    spec = (spec or "auto").strip().lower()
    if spec == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    if spec.startswith("cuda"):
        if not torch.cuda.is_available():
            raise SplitserveError(f"--device {spec}: CUDA is not available on this machine (use --device cpu)")
        if spec == "cuda":
            return torch.device(f"cuda:{local_rank}")
    try:
        return torch.device(spec)
    except RuntimeError:
        raise SplitserveError(f"--device {spec!r}: not a device (auto, cpu, cuda, cuda:N)") from None


def setup(device: str | None = "auto") -> DistInfo:
    """Read RANK/WORLD_SIZE/LOCAL_RANK (set by torchrun); start the process group when > 1 process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = pick_device(device, local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world <= 1:
        return DistInfo(0, 1, 0, dev, False)
    started = False
    if not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        # validation runs on rank 0 only while the others wait: allow it time
        dist.init_process_group(backend=backend, timeout=_dt.timedelta(hours=2))
        started = True
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, dev, started)


def barrier(info: DistInfo) -> None:
    if info.distributed and dist.is_initialized():
        if info.device.type == "cuda":
            dist.barrier(device_ids=[info.device.index or 0])
        else:
            dist.barrier()


def any_true(info: DistInfo, flag: bool) -> bool:
    """True on every rank if ``flag`` is true on any (so all ranks stop at the same step)."""
    if not info.distributed:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=info.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def gather_object(info: DistInfo, obj: object) -> list | None:
    """Every rank's ``obj``, in rank order, on rank 0 (None on the others); ``[obj]`` in one process.
    Pickled between the processes of one job, never read from a file or a network."""
    if not info.distributed:
        return [obj]
    out = [None] * info.world_size if info.is_main else None
    dist.gather_object(obj, out, dst=0)
    return out


def teardown(info: DistInfo) -> None:
    if info.initialized and dist.is_initialized():
        barrier(info)
        dist.destroy_process_group()
