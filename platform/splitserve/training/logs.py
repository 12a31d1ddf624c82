"""Metric logs of a run: ``metrics.jsonl``, ``train.csv``/``val.csv`` and TensorBoard, rank 0 only."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from typing import Any


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
            keep = [r for r in self.records() if r.get("global_step", 0) <= resume_step]
            tmp = self.path.with_name(f".{self.path.name}.tmp")  # a crash now must not cost the history
            tmp.write_text("".join(json.dumps(r, default=float) + "\n" for r in keep))
            os.replace(tmp, self.path)
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

    def records(self) -> list[dict[str, Any]]:
        """The records logged so far; a line cut short by a crash (power loss) is left out."""
        out = []
        for line in self.path.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
        return out

    def write_csv(self) -> None:
        if not self.enabled or not self.path.is_file():
            return
        rows: dict[str, list[dict]] = {"train": [], "val": []}
        for rec in self.records():
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
        """End the run's logging; records written afterwards (a final validation) still reach the
        JSON lines and CSV files."""
        self.write_csv()
        if self.writer is not None:
            self.writer.close()
            self.writer = None
