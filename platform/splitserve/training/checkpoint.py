"""Checkpoints of a run: model, optimizers, schedulers, AMP scaler, position, history, RNG states.

One file holds one checkpoint, ``WORKDIR/checkpoint/last.pt``; under torchrun rank 0 gathers every
rank's RNG state into it, so a checkpoint's weights and RNG states always come from the same save.

Losing a checkpoint is losing hours of training, so a save never leaves the run without a good one:

1. the new checkpoint is written to a temporary file in the same directory and fsynced;
2. the current ``last.pt`` (when it is this run's and good) becomes ``previous.pt``;
3. the temporary file is renamed to ``last.pt``, and the directory is fsynced.

A kill at any instant leaves ``last.pt`` or ``previous.pt`` complete, and a power cut cannot leave
a renamed file whose bytes never reached the disk. Each checkpoint also carries the SHA-256 of its
content: ``--resume`` reports a truncated or corrupted ``last.pt`` in one line and continues from
``previous.pt``. A checkpoint of format version 1 (before checksums: RNG states in
``rng-rank{r}.pt``) still resumes, unverified, with a note.

Loading uses ``torch.load(weights_only=True)``, which refuses pickled code, and refuses a checkpoint
made by another command or with other settings (the run's *signature*), naming what differs.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import random
import sys
import time
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
CHECKPOINT_VERSION = 2  # 2: SHA-256 of the content, every rank's RNG state inside, previous.pt kept


class CorruptCheckpoint(TrainingError):
    """A checkpoint file that cannot be read or whose content does not match its checksum."""


class CheckpointStore:
    """Where one run's checkpoint lives, and how a :class:`TrainState` goes in and comes back."""

    def __init__(self, workdir: Path, info: DistInfo, command: str, signature: Mapping[str, Any], seed: int):
        self.dir = Path(workdir) / "checkpoint"
        self.path = self.dir / "last.pt"
        self.previous = self.dir / "previous.pt"
        self.info = info
        self.command = command
        self.signature = _plain(signature)
        self.seed = seed
        # Which files hold good checkpoints of *this* run (written or verified here). Only those are
        # kept as the fallback; another run's files are replaced at the first save.
        self._good = {"last": False, "previous": False}
        self.loaded: Path | None = None  # the file the run resumed from

    def exists(self) -> bool:
        return self.path.is_file() or self.previous.is_file()

    def clear(self) -> None:
        for p in [*self.dir.glob("*.pt"), *self.dir.glob(".*.tmp")]:
            p.unlink()
        with contextlib.suppress(OSError):
            self.dir.rmdir()

    def save(self, state: "TrainState", epoch: int, batch: int) -> None:
        """Save ``state`` as being at ``batch`` of ``epoch`` (all ranks call this together)."""
        info = self.info
        rng = dist_utils.gather_object(info, _rng_state())
        if info.is_main:
            content = {
                "format": CHECKPOINT_FORMAT,
                "version": CHECKPOINT_VERSION,
                "command": self.command,
                "signature": self.signature,
                "world_size": info.world_size,
                "epoch": epoch,
                "batch": batch,
                "global_step": state.global_step,
                "seconds": state.elapsed(),
                "val_seconds": state.val_seconds,
                "model": {k: v.detach().cpu() for k, v in state.objective.checkpoint_state().items()},
                "optimizers": {k: o.state_dict() for k, o in state.optimizers.items()},
                "schedulers": [s.scheduler.state_dict() for s in state.schedulers],
                "scaler": state.scaler.state_dict(),
                "history": _plain(state.history),
                "best": state.best,
                "rng": rng,
            }
            content["sha256"] = content_digest(content)
            buffer = io.BytesIO()
            torch.save(content, buffer)
            self._install(buffer.getbuffer())
        dist_utils.barrier(info)

    def _install(self, data: memoryview) -> None:
        """Put ``data`` in place as ``last.pt`` without ever leaving the run without a good checkpoint."""
        if not self.dir.is_dir():
            self.dir.mkdir(parents=True)
            fsync_dir(self.dir.parent)  # the directory itself must survive a power cut too
        tmp = write_synced(self.dir / f".{self.path.name}.tmp", data)
        if self._good["last"]:
            os.replace(self.path, self.previous)
        elif not self._good["previous"]:  # another run's, or none
            self.previous.unlink(missing_ok=True)
        os.replace(tmp, self.path)
        fsync_dir(self.dir)
        self._good = {"last": True, "previous": self._good["last"] or self._good["previous"]}

    def load(self, state: "TrainState") -> tuple[int, int]:
        """Restore ``state`` in place from the newest good checkpoint; returns (epoch, batch) to
        continue from."""
        saved = self._newest_good()
        if saved.get("command") != self.command:
            raise TrainingError(f"{self.dir}: checkpoint of `{saved.get('command')}`, not `{self.command}`")
        old = saved.get("signature", {})
        diff = sorted(k for k in set(old) | set(self.signature) if old.get(k) != self.signature.get(k))
        if diff:
            detail = "; ".join(f"{k}: checkpoint {old.get(k)!r}, now {self.signature.get(k)!r}" for k in diff[:4])
            raise TrainingError(f"{self.dir}: the checkpoint was made with different settings ({detail}); "
                                "use the same options to resume, or another --workdir to start over")
        state.objective.load_checkpoint_state(saved["model"])
        state.objective.to(self.info.device)
        for name, opt in state.optimizers.items():
            opt.load_state_dict(saved["optimizers"][name])
        for s, sd in zip(state.schedulers, saved["schedulers"]):
            s.scheduler.load_state_dict(sd)
        state.scaler.load_state_dict(saved["scaler"])
        state.global_step = saved["global_step"]
        state.seconds, state.started = float(saved.get("seconds", 0.0)), time.perf_counter()
        state.val_seconds = float(saved.get("val_seconds", 0.0))
        state.history, state.best = saved["history"], saved["best"]
        self._restore_rng(saved)
        if saved.get("world_size") != self.info.world_size and self.info.is_main:
            print(f"[{self.command}] note: checkpoint written by {saved.get('world_size')} processes, resuming with "
                  f"{self.info.world_size}; the data order of the current epoch changes", flush=True)
        return saved["epoch"], saved["batch"]

    def _newest_good(self) -> dict[str, Any]:
        """``last.pt``, else ``previous.pt`` when ``last.pt`` is missing, truncated or corrupt (said in one line)."""
        problems = []
        for key, path in (("last", self.path), ("previous", self.previous)):
            if not path.is_file():
                problems.append(f"{path.name} is missing")
                continue
            try:
                saved = self._read(path)
            except CorruptCheckpoint as e:
                problems.append(str(e))
                continue
            self._good[key] = True
            self.loaded = path
            if key == "previous" and self.info.is_main:
                print(f"[{self.command}] warning: {self.dir}: {problems[0]}; resuming from {path.name} "
                      f"(step {saved.get('global_step')})", file=sys.stderr, flush=True)
            return saved
        raise TrainingError(f"{self.dir}: no usable checkpoint ({'; '.join(problems)}); "
                            "use another --workdir, or drop --resume to start over")

    def _read(self, path: Path) -> dict[str, Any]:
        try:
            saved = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # truncated or garbled file, or one with pickled code in it
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            raise CorruptCheckpoint(f"{path.name} cannot be read ({type(e).__name__}: {first[:120]})") from None
        if not isinstance(saved, dict) or saved.get("format") != CHECKPOINT_FORMAT:
            raise CorruptCheckpoint(f"{path.name} is not a splitserve training checkpoint")
        version = saved.get("version")
        if version not in (1, CHECKPOINT_VERSION):
            raise TrainingError(f"{path}: checkpoint format version {version!r}; this splitserve reads versions "
                                f"1 and {CHECKPOINT_VERSION}")
        digest = saved.pop("sha256", None)
        if version == 1:
            if self.info.is_main:
                print(f"[{self.command}] note: {path} has no checksum (written by an older splitserve); "
                      "loading it unverified", flush=True)
        elif digest != content_digest(saved):
            raise CorruptCheckpoint(f"{path.name} is corrupt (its content does not match its SHA-256)")
        return saved

    def _restore_rng(self, saved: Mapping[str, Any]) -> None:
        rank = self.info.rank
        if "rng" in saved:  # version 2: every rank's state in the checkpoint
            rng = saved["rng"][rank] if rank < len(saved["rng"]) else None
        else:  # version 1: one file per rank beside it
            rng_path = self.dir / f"rng-rank{rank}.pt"
            rng = torch.load(rng_path, map_location="cpu", weights_only=True)["rng"] if rng_path.is_file() else None
        if rng is None:  # a different number of processes than before: reseed deterministically
            torch.manual_seed(mix_seed(self.seed, rank, saved["global_step"]))
            return
        torch.set_rng_state(rng["torch"])
        if rng["cuda"] and torch.cuda.is_available() and len(rng["cuda"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(rng["cuda"])
        random.setstate(_tuplify(rng["python"]))
        _set_numpy_state(rng["numpy"])


# -- durable files ---------------------------------------------------------------------------------
def write_synced(path: Path, data: memoryview | bytes) -> Path:
    """Write ``data`` to ``path`` (replacing it) and fsync it: its bytes are on the disk, not only in
    the page cache, before anything renames it."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        view = memoryview(data).cast("B")
        while view:
            view = view[os.write(fd, view[: 1 << 20]):]
        os.fsync(fd)
    finally:
        os.close(fd)
    return path


def fsync_dir(path: Path) -> None:
    """Make renames inside ``path`` durable (POSIX; a no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def content_digest(obj: Any) -> str:
    """SHA-256 of a checkpoint's content (tensors by dtype, shape and bytes; mapping keys in a fixed
    order), so the same content read back gives the same digest whatever container order pickling
    used, and any changed byte gives another."""
    h = hashlib.sha256()
    _feed(h, obj)
    return h.hexdigest()


def _feed(h: Any, obj: Any) -> None:
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous().reshape(-1)
        h.update(f"T{t.dtype}{tuple(obj.shape)}:".encode())
        h.update(t.view(torch.uint8).numpy().data)
    elif isinstance(obj, Mapping):
        h.update(f"M{len(obj)}:".encode())
        for key in sorted(obj, key=repr):
            _feed(h, key)
            _feed(h, obj[key])
    elif isinstance(obj, (list, tuple)):
        h.update(f"L{len(obj)}:".encode())
        for value in obj:
            _feed(h, value)
    else:
        h.update(f"V{obj!r};".encode())


# -- RNG states ------------------------------------------------------------------------------------
def _rng_state() -> dict[str, Any]:
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": random.getstate(),
        "numpy": _numpy_state(),
    }


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
