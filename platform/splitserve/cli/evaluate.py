"""``platform evaluate``: a rate–accuracy study from a sweep file."""

from __future__ import annotations

from pathlib import Path

from . import add_command


def register(sub) -> None:
    p = add_command(sub, "evaluate", run, "Rate–accuracy study from a sweep file: bundles vs JPEG/WebP, report + plots.",
                    "Measure every point of a sweep (our bundles through the gateway runtime from real payload bytes; "
                    "JPEG/WebP through the uncompressed teacher), then write points.json/.csv, plots, Δ-accuracy, "
                    "BD-rate, encoder latency and a link model to OUT/report.md. See docs/evaluation.md.")
    p.add_argument("sweep", type=Path, nargs="?", help="sweep file (YAML)")
    p.add_argument("--out", type=Path, required=True, metavar="DIR", help="output directory")
    p.add_argument("--curves", nargs="+", metavar="LABEL=WORKDIR",
                   help="also plot the learning curves of these runs (their metrics.jsonl) to OUT/learning_curves.png")
    p.add_argument("--metric", default="top1", help="validation metric of --curves (default %(default)s)")


def run(args) -> int:
    from ..errors import SplitserveError
    from ..evaluation.report import plot_learning_curves
    from ..evaluation.run import evaluate, load_sweep

    if args.curves:
        runs = dict(item.split("=", 1) if "=" in item else (Path(item).name, item) for item in args.curves)
        missing = [d for d in runs.values() if not (Path(d) / "metrics.jsonl").is_file()]
        if missing:
            raise SplitserveError(f"{missing[0]}: no metrics.jsonl (a training run's work directory)")
        print(f"wrote {plot_learning_curves({k: Path(v) for k, v in runs.items()}, args.out / 'learning_curves.png', args.metric)}")
    if args.sweep is None:
        return 0
    summary = evaluate(load_sweep(args.sweep), args.out)
    print(f"wrote {args.out}/report.md, points.json, points.csv, rate_accuracy.png, delta_accuracy_vs_latency.png")
    for name, value in summary["delta_accuracy"].items():
        print(f"  {name}: Δ-accuracy {value if isinstance(value, str) else f'{value:+.2f} pp'}")
    return 0
