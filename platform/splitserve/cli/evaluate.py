"""``platform evaluate`` (a rate–accuracy study from a sweep file) and ``platform train-image-codec``
(the CompressAI image-codec baselines those studies compare against)."""

from __future__ import annotations

from pathlib import Path

from . import add_command


def register(sub) -> None:
    p = add_command(sub, "evaluate", run, "Rate–accuracy study from a sweep file: bundles vs JPEG/WebP/learned image codecs.",
                    "Measure every point of a sweep — our bundles from real payload bytes through the gateway runtime; "
                    "JPEG, WebP and CompressAI image codecs through the uncompressed teacher — on each task with "
                    "the metric its plugin scores (its EvaluationHooks). Writes OUT/points.json, points.csv, "
                    "rate-accuracy and Δ-accuracy-vs-latency plots, bit-allocation maps and report.md with "
                    "Δ-accuracy, BD-rate, device parameters/MACs/latency and a link model. See docs/evaluation.md.")
    p.add_argument("sweep", type=Path, nargs="?", help="sweep file (YAML)")
    p.add_argument("--out", type=Path, metavar="DIR", help="output directory (not needed with --check)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--check", action="store_true", help="only validate the sweep file and exit")
    p.add_argument("--split", metavar="NAME", help="evaluate on this split instead of the sweep's, e.g. val_seen "
                                                   "(fmnist-scenes: val objects on the train photographs)")
    p.add_argument("--curves", nargs="+", metavar="LABEL=WORKDIR",
                   help="also plot the learning curves of these runs (their metrics.jsonl) to "
                        "OUT/learning_curves.png (learning_curves_METRIC.png for a --metric other than top1)")
    p.add_argument("--metric", default="top1", help="validation metric of --curves, e.g. mAP or mIoU (default %(default)s); a run that trains several heads logs detection/mAP, which mAP finds")

    t = add_command(sub, "train-image-codec", train_image_codec,
                    "Train a CompressAI image codec (factorized prior / mean-scale hyperprior) as a baseline.",
                    "Train CompressAI's bmshj2018-factorized or mbt2018-mean architecture with its rate–distortion "
                    "loss (λ·255²·MSE + bpp; Adam, plus an aux optimizer for the entropy bottleneck) on the train "
                    "split of DATA at the model-input size, then write OUT/codec.json + model.safetensors for the "
                    "`compressai` method of `platform evaluate`. Checkpoints to --workdir; --resume continues.")
    t.add_argument("--arch", required=True, choices=("bmshj2018-factorized", "mbt2018-mean", "bmshj2018-hyperprior"))
    t.add_argument("--data", type=Path, required=True, metavar="DIR",
                   help="fmnist-scenes tree, ImageFolder root or COCO tree (its train split is used)")
    t.add_argument("--out", type=Path, required=True, metavar="DIR", help="codec directory to write")
    t.add_argument("--quality", type=int, default=1, help="CompressAI quality: sets N, M and the default λ (1..8)")
    t.add_argument("--lmbda", type=float, default=None, help="rate–distortion trade-off λ (default: CompressAI's for --quality)")
    t.add_argument("--channels", default=None, metavar="N,M", help="override N,M (e.g. small codecs for tests)")
    t.add_argument("--image-size", type=int, default=64, help="square model-input size (fixed policy), default %(default)s")
    t.add_argument("--preprocessing", default=None, metavar="SPEC",
                   help="model-input policy instead of --image-size: fixed:H[xW], resize-crop:R:H[xW]")
    t.add_argument("--epochs", type=int, default=10)
    t.add_argument("--max-steps", type=int, default=None, help="stop after this many steps in all")
    t.add_argument("--batch-size", type=int, default=16)
    t.add_argument("--lr", type=float, default=1e-4)
    t.add_argument("--aux-lr", type=float, default=1e-3)
    t.add_argument("--prior-lr", type=float, default=None, metavar="LR",
                   help="the entropy bottleneck's density on an Adam of its own at LR, on the lr schedule "
                        "(default: with the rest, at --lr)")
    t.add_argument("--lr-drop", type=int, nargs="*", default=[], metavar="EPOCH", help="epochs at which lr ×0.1")
    t.add_argument("--train-limit", type=int, default=None)
    t.add_argument("--val-limit", type=int, default=200)
    t.add_argument("--workdir", type=Path, default=None, help="checkpoints and metrics.jsonl (default: OUT)")
    t.add_argument("--resume", action="store_true", help="continue from WORKDIR/checkpoint.pt")
    t.add_argument("--checkpoint-every", type=int, default=200, metavar="STEPS")
    t.add_argument("--num-workers", type=int, default=2)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--no-progress", action="store_true")


def run(args) -> int:
    from ..errors import SplitserveError
    from ..evaluation.report import plot_learning_curves, summary_cell
    from ..evaluation.run import evaluate, load_sweep

    if args.out is None and (args.curves or not args.check):
        raise SplitserveError("give --out DIR: where the report, points and plots go")
    if args.curves:
        runs = dict(item.split("=", 1) if "=" in item else (Path(item).name, item) for item in args.curves)
        missing = [d for d in runs.values() if not (Path(d) / "metrics.jsonl").is_file()]
        if missing:
            raise SplitserveError(f"{missing[0]}: no metrics.jsonl (a training run's work directory)")
        name = "learning_curves.png" if args.metric == "top1" else f"learning_curves_{args.metric}.png"
        print(f"wrote {plot_learning_curves({k: Path(v) for k, v in runs.items()}, args.out / name, args.metric)}")
    if args.sweep is None:
        if not args.curves:
            raise SplitserveError("give a sweep file (or --curves)")
        return 0
    sweep = load_sweep(args.sweep)
    if args.split is not None:
        if not args.split.strip():
            raise SplitserveError("--split: expected a split name such as val_seen, got an empty one")
        sweep.split = args.split
    if args.check:
        n = sum(len(m.points) for m in sweep.methods)
        print(f"{args.sweep}: ok ({len(sweep.methods)} methods, {n} points)")
        return 0
    study = evaluate(sweep, args.out, progress=not args.no_progress)
    print(f"wrote {args.out}/report.md, points.json, points.csv and plots ({study.seconds:.0f} s)")
    for task, ref in study.reference.items():
        print(f"{task}: uncompressed teacher {ref['metric']} {ref['accuracy']:.2f}")
        s = study.summary["tasks"].get(task, {})
        rows = [(name, s.get("delta_accuracy", {}).get(name), s.get("bd_rate", {}).get(name))
                for name in dict.fromkeys(p.method for p in study.points if p.task == task)]
        rows += [(f"{c['method']} against {c['against']}", c["delta_accuracy"], c["bd_rate"])
                 for c in s.get("comparisons", [])]
        rows += [(f"{c['method']} (variable-rate) against {c['against']}", v["delta_accuracy"], v["bd_rate"])
                 for c in study.summary.get("variable_rate", []) for t, v in c["tasks"].items() if t == task]
        for name, d, b in rows:
            print(f"  {name}: Δ-accuracy {summary_cell(d, '+.2f', ' pp')}, BD-rate {summary_cell(b, '+.1f', ' %')}")
    return 0


def train_image_codec(args) -> int:
    from ..errors import SplitserveError
    from ..evaluation.imagecodec import train_image_codec as train
    from ..preprocess import Preprocessing

    channels = None
    if args.channels:
        try:
            n, m = (int(v) for v in args.channels.split(","))
        except ValueError:
            raise SplitserveError(f"--channels {args.channels!r}: expected N,M (two integers)") from None
        channels = (n, m)
    policy = Preprocessing.from_spec(args.preprocessing) if args.preprocessing else Preprocessing.fixed(args.image_size, args.image_size)
    out = train(args.arch, args.data, args.out, quality=args.quality, channels=channels, lmbda=args.lmbda,
                preprocessing=policy, epochs=args.epochs, max_steps=args.max_steps, batch_size=args.batch_size,
                lr=args.lr, aux_lr=args.aux_lr, prior_lr=args.prior_lr, lr_drop=tuple(args.lr_drop), train_limit=args.train_limit,
                val_limit=args.val_limit, workdir=args.workdir, resume=args.resume,
                checkpoint_every=args.checkpoint_every, num_workers=args.num_workers, seed=args.seed,
                progress=not args.no_progress)
    import json

    metrics = json.loads((out / "codec.json").read_text()).get("metrics", {})
    shown = ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items())
    print(f"wrote image codec {out} ({args.arch}){': val ' + shown if shown else ''}")
    return 0
