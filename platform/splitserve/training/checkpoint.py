"""Checkpoints of a run: model, optimizers, schedulers, AMP scaler, position, history, RNG states.

``WORKDIR/checkpoint/last.pt`` (rank 0) plus one ``rng-rank{r}.pt`` per process. Loading uses
``torch.load(weights_only=True)``, which refuses pickled code, and refuses a checkpoint made by
another command or with other settings (the run's *signature*), naming what differs.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from . import distributed as dist_utils
from .distributed import DistInfo
from .objective import TrainingError
from .sampling import mix_seed

if TYPE_CHECKING:
    from .engine import TrainState

CHECKPOINT_FORMAT = "splitserve-checkpoint"
CHECKPOINT_VERSION = 1


class CheckpointStore:
    """Where one run's checkpoint lives, and how a :class:`TrainState` goes in and comes back."""

    def __init__(self, workdir: Path, info: DistInfo, command: str, signature: Mapping[str, Any], seed: int):
        self.dir = Path(workdir) / "checkpoint"
        self.path = self.dir / "last.pt"
        self.info = info
        self.command = command
        self.signature = _plain(signature)
        self.seed = seed

    def exists(self) -> bool:
        return self.path.is_file()

    def clear(self) -> None:
        for p in self.dir.glob("*.pt"):
            p.unlink()
        with contextlib.suppress(OSError):
            self.dir.rmdir()

    def save(self, state: "TrainState", epoch: int, batch: int) -> None:
        """Save ``state`` as being at ``batch`` of ``epoch`` (all ranks call this together)."""
        info = self.info
        if info.is_main:
            self.dir.mkdir(parents=True, exist_ok=True)
        dist_utils.barrier(info)
        rng = {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "python": random.getstate(),
            "numpy": _numpy_state(),
        }
        _atomic_save({"rng": rng}, self.dir / f"rng-rank{info.rank}.pt")
        if info.is_main:
            _atomic_save({
                "format": CHECKPOINT_FORMAT,
                "version": CHECKPOINT_VERSION,
                "command": self.command,
                "signature": self.signature,
                "world_size": info.world_size,
                "epoch": epoch,
                "batch": batch,
                "global_step": state.global_step,
                "model": {k: v.detach().cpu() for k, v in state.objective.checkpoint_state().items()},
                "optimizers": {k: o.state_dict() for k, o in state.optimizers.items()},
                "schedulers": [s.scheduler.state_dict() for s in state.schedulers],
                "scaler": state.scaler.state_dict(),
                "history": _plain(state.history),
                "best": state.best,
            }, self.path)
        dist_utils.barrier(info)

    def load(self, state: "TrainState") -> tuple[int, int]:
        """Restore ``state`` in place; returns (epoch, batch) to continue from."""
        try:
            saved = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as e:  # corrupt/truncated file, or one with pickled code in it
            raise TrainingError(f"{self.path}: cannot read the checkpoint ({type(e).__name__}: "
                                f"{str(e).splitlines()[0] if str(e) else ''})") from None
        if not isinstance(saved, dict) or saved.get("format") != CHECKPOINT_FORMAT:
            raise TrainingError(f"{self.path}: not a splitserve training checkpoint")
        if saved.get("command") != self.command:
            raise TrainingError(f"{self.path}: checkpoint of `{saved.get('command')}`, not `{self.command}`")
        old = saved.get("signature", {})
        diff = sorted(k for k in set(old) | set(self.signature) if old.get(k) != self.signature.get(k))
        if diff:
            detail = "; ".join(f"{k}: checkpoint {old.get(k)!r}, now {self.signature.get(k)!r}" for k in diff[:4])
            raise TrainingError(f"{self.path}: the checkpoint was made with different settings ({detail}); "
                                "use the same options to resume, or another --workdir to start over")
        state.objective.load_checkpoint_state(saved["model"])
        state.objective.to(self.info.device)
        for name, opt in state.optimizers.items():
            opt.load_state_dict(saved["optimizers"][name])
        for s, sd in zip(state.schedulers, saved["schedulers"]):
            s.scheduler.load_state_dict(sd)
        state.scaler.load_state_dict(saved["scaler"])
        state.global_step = saved["global_step"]
        state.history, state.best = saved["history"], saved["best"]
        self._restore_rng(saved)
        if saved.get("world_size") != self.info.world_size and self.info.is_main:
            print(f"[{self.command}] note: checkpoint written by {saved.get('world_size')} processes, resuming with "
                  f"{self.info.world_size}; the data order of the current epoch changes", flush=True)
        return saved["epoch"], saved["batch"]

    def _restore_rng(self, saved: Mapping[str, Any]) -> None:
        rng_path = self.dir / f"rng-rank{self.info.rank}.pt"
        if not rng_path.is_file():  # a different number of processes than before: reseed deterministically
            torch.manual_seed(mix_seed(self.seed, self.info.rank, saved["global_step"]))
            return
        rng = torch.load(rng_path, map_location="cpu", weights_only=True)["rng"]
        torch.set_rng_state(rng["torch"])
        if rng["cuda"] and torch.cuda.is_available() and len(rng["cuda"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(rng["cuda"])
        random.setstate(_tuplify(rng["python"]))
        _set_numpy_state(rng["numpy"])


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
