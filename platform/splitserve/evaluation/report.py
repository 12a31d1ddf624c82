"""The study's Markdown report and plots (matplotlib, no display needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def write_report(out: Path, points, summary: dict[str, Any], sweep, timings: dict[str, float], seconds: float) -> None:
    from ..bench.report import machine

    curves: dict[str, list] = {}
    for p in points:
        curves.setdefault(p.method, []).append(p)
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for name, c in curves.items():
        c = sorted(c, key=lambda p: p.bpp)
        ax.plot([p.bpp for p in c], [p.top1 for p in c], marker="o", label=name)
    ax.set_xlabel("bits per pixel of the model input")
    ax.set_ylabel("top-1 (%)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "rate_accuracy.png", dpi=120)
    plt.close(fig)

    es = curves.get(sweep.anchors.get("delta_accuracy", ""), [])
    base_ms = min((p.encode_ms for p in es), default=None)
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for name, value in summary["delta_accuracy"].items():
        if isinstance(value, float):
            ms = min(p.encode_ms for p in curves[name])
            ax.scatter([ms], [value])
            ax.annotate(name, (ms, value))
    ax.set_xlabel(f"encoder latency, ms (batch 1, {sweep.threads} thread)")
    ax.set_ylabel("Δ-accuracy (pp) vs " + sweep.anchors.get("delta_accuracy", "anchor"))
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "delta_accuracy_vs_latency.png", dpi=120)
    plt.close(fig)

    lines = ["# Rate–accuracy study", "", f"Machine: {machine()}. {points[0].images} images of `{sweep.data}` "
             f"({sweep.split}); teacher `{sweep.teacher}`. Total {seconds:.0f} s "
             f"({', '.join(f'{k} {v:.0f} s' for k, v in timings.items())}).", "",
             "Rate: real bytes (payload with header, or the image file) per image and in bits per pixel of the model "
             "input. Accuracy: bundles through the gateway runtime from payload bytes; input codecs decoded and fed to "
             "the uncompressed teacher. Summaries use PCHIP interpolation (see docs/evaluation.md).", "",
             "![rate–accuracy](rate_accuracy.png)", "",
             "| method | setting | bytes/image | bpp | top-1 % | encode ms | server ms | device params | device MACs |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for p in points:
        params = f"{p.device_params:,}" if p.device_params else "—"
        macs = f"{p.device_macs:,}" if p.device_macs else "—"
        lines.append(f"| {p.method} | {p.setting} | {p.bytes_per_image:.0f} | {p.bpp:.3f} | {p.top1:.1f} | "
                     f"{p.encode_ms:.2f} | {p.server_ms:.1f} | {params} | {macs} |")
    lines += ["", "| method | Δ-accuracy vs " + str(sweep.anchors.get("delta_accuracy")) + " (pp) | BD-rate vs "
              + str(sweep.anchors.get("bd_rate")) + " (%) | encoder latency vs anchor |", "|---|---:|---:|---:|"]
    for name in curves:
        d = summary["delta_accuracy"].get(name, "—")
        b = summary["bd_rate"].get(name, "—")
        ms = min(p.encode_ms for p in curves[name])
        ratio = f"{ms / base_ms:.2f}×" if base_ms else "—"
        lines.append(f"| {name} | {d if isinstance(d, str) else f'{d:+.2f}'} | "
                     f"{b if isinstance(b, str) else f'{b:+.1f}'} | {ratio} |")
    lines += ["", "![Δ-accuracy vs latency](delta_accuracy_vs_latency.png)", "",
              "End-to-end time per image (device encode + bytes ÷ link rate + server), ms:", "",
              "| point | " + " | ".join(f"{k} ({v:g} kbit/s)" for k, v in sweep.links_kbit_s.items()) + " |",
              "|---|" + "---:|" * len(sweep.links_kbit_s)]
    names = list(next(iter(summary["links"].values())).keys()) if summary["links"] else []
    for n in names:
        lines.append(f"| {n} | " + " | ".join(f"{summary['links'][k][n]:.0f}" for k in sweep.links_kbit_s) + " |")
    (out / "report.md").write_text("\n".join(lines) + "\n")


def plot_learning_curves(runs: dict[str, Path], out: Path, metric: str = "top1") -> Path:
    """Validation ``metric`` per epoch (and the training loss) of each run's ``metrics.jsonl``."""
    import json

    fig, (ax_val, ax_loss) = plt.subplots(1, 2, figsize=(10, 3.8))
    for label, workdir in runs.items():
        records = [json.loads(line) for line in (Path(workdir) / "metrics.jsonl").read_text().splitlines() if line.strip()]
        val = [r for r in records if r.get("kind") == "val" and metric in r]
        train = [r for r in records if r.get("kind") == "train" and "loss" in r]
        ax_val.plot([r["epoch"] for r in val], [r[metric] for r in val], marker="o", label=label)
        ax_loss.plot([r["global_step"] for r in train], [r["loss"] for r in train], alpha=0.7, label=label)
    ax_val.set_xlabel("epoch")
    ax_val.set_ylabel(f"validation {metric}")
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("training loss")
    for ax in (ax_val, ax_loss):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
