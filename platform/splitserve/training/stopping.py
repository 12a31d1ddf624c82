"""Stopping a training run cleanly: SIGTERM (a timeout, systemd, `kill -- -PGID`) and Ctrl-C set a flag
that the loop checks after each step, so it checkpoints before it exits; a validation, which a
resumed run can redo, is cut short instead of waited for; DataLoader workers leave those signals to
the main process instead of dying under the loader."""

from __future__ import annotations

import contextlib
import random
import signal
import sys
import threading
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}


def worker_init(worker_id: int) -> None:
    # Ctrl-C, and a SIGTERM sent to the process group (timeout, systemd, `kill -- -PGID`), reach the
    # workers too: let the main process handle them (checkpoint, then stop) instead of the workers
    # dying under the loader; the loader ends its workers when the main process exits. A signal
    # that arrived since the fork is pending (StopSafeLoader blocks them); ignoring discards it.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


class StopSafeLoader(DataLoader):
    """A DataLoader whose workers leave stop signals to the main process, from their first instant.

    torch's worker sets a SIGTERM handler that kills it before ``worker_init_fn`` runs; a group
    SIGTERM landing in that window (workers start at every epoch and validation) killed the loader.
    Stop signals are blocked while the workers fork, so they inherit the block, and
    :func:`worker_init` ignores then unblocks them. The main process gets its pending signal as
    soon as the workers have started."""

    def __init__(self, *args: Any, worker_init_fn=worker_init, **kwargs: Any):
        super().__init__(*args, worker_init_fn=worker_init_fn, **kwargs)

    def __iter__(self):
        if self.num_workers == 0 or threading.current_thread() is not threading.main_thread():
            return super().__iter__()
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        try:
            return super().__iter__()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)


class StopRequested(BaseException):
    """A stop signal ended work that a resumed run redoes (a validation) rather than wait for it.
    A BaseException, as KeyboardInterrupt is, so that no ``except Exception`` on the way swallows it."""


class StopFlag:
    """SIGTERM/SIGINT set a flag that the loop checks after each step; a second SIGINT aborts.
    Inside :meth:`interrupting` the signal also raises :class:`StopRequested` at once."""

    def __init__(self):
        self.signum: int | None = None
        self._old: dict[int, Any] = {}
        self._interrupting = False

    def __enter__(self) -> "StopFlag":
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum
        if self._interrupting:
            self._interrupting = False
            print(f"\nreceived {signal.Signals(signum).name}: stopping this validation and saving a checkpoint "
                  "(a resumed run validates this epoch first)", file=sys.stderr, flush=True)
            raise StopRequested
        print(f"\nreceived {signal.Signals(signum).name}: saving a checkpoint after this step "
              "(Ctrl-C again to abort without saving)", file=sys.stderr, flush=True)

    @contextlib.contextmanager
    def interrupting(self):
        """A block that a stop signal ends at once with :class:`StopRequested`: a validation of a
        variable-rate, multi-task run takes minutes, longer than a SIGTERM's grace period, and a
        resumed run can redo it from the checkpoint."""
        if self.set:
            raise StopRequested
        self._interrupting = True
        try:
            yield
        finally:
            self._interrupting = False

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)

    @property
    def set(self) -> bool:
        return self.signum is not None


def report_stopped(run: str, signum: int | None, step: int, checkpoint: object) -> None:
    """The line every stopped run prints: what stopped it, where its checkpoint is, how to resume."""
    name = signal.Signals(signum).name if signum else "signal"
    print(f"[{run}] stopped by {name} at step {step}; checkpoint saved in {checkpoint}; "
          "run the same command with --resume to continue", file=sys.stderr, flush=True)
