"""``platform evaluate``: a rate–accuracy study from a sweep file."""

from __future__ import annotations

from pathlib import Path

from . import add_command


def register(sub) -> None:
    p = add_command(sub, "evaluate", run, "Rate–accuracy study from a sweep file: bundles vs JPEG/WebP, report + plots.",
                    "Measure every point of a sweep (our bundles through the gateway runtime from real payload bytes; "
                    "JPEG/WebP through the uncompressed teacher), then write points.json/.csv, plots, Δ-accuracy, "
                    "BD-rate, encoder latency and a link model to OUT/report.md. See docs/evaluation.md.")
    p.add_argument("sweep", type=Path, help="sweep file (YAML)")
    p.add_argument("--out", type=Path, required=True, metavar="DIR", help="output directory")


def run(args) -> int:
    from ..evaluation.run import evaluate, load_sweep

    summary = evaluate(load_sweep(args.sweep), args.out)
    print(f"wrote {args.out}/report.md, points.json, points.csv, rate_accuracy.png, delta_accuracy_vs_latency.png")
    for name, value in summary["delta_accuracy"].items():
        print(f"  {name}: Δ-accuracy {value if isinstance(value, str) else f'{value:+.2f} pp'}")
    return 0
