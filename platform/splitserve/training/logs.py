"""Metric logs of a run: ``metrics.jsonl``, ``train.csv``/``val.csv`` and TensorBoard, rank 0 only."""

from __future__ import annotations

import csv
import json
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
