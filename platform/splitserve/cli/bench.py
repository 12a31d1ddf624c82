"""``platform bench``: benchmarks whose ratios are measured side by side in one run."""

from __future__ import annotations

from pathlib import Path

from . import add_command


def register(sub) -> None:
    p = add_command(sub, "bench", lambda a: a.bench_parser.print_help(), "Run benchmarks and write their reports.")
    p.set_defaults(bench_parser=p)
    bsub = p.add_subparsers(title="benchmarks", metavar="BENCH")
    s = add_command(bsub, "serve", serve, "Decode-once latency and dynamic-batching throughput on loopback.",
                    "Start real gateway processes on loopback and compare: one 3-task request vs three single-task "
                    "requests; throughput with dynamic batching vs batch 1.", group="bench")
    s.add_argument("--bundle", metavar="DIR", help="bundle to serve (default: the embedded default)")
    s.add_argument("--rounds", type=int, default=20, help="latency rounds (default %(default)s)")
    s.add_argument("--concurrency", type=int, default=16, help="concurrent clients (default %(default)s)")
    s.add_argument("--requests", type=int, default=8, help="requests per client (default %(default)s)")
    s.add_argument("--max-batch", type=int, default=16, help="batch size of the batching server")
    s.add_argument("--max-wait-ms", type=float, default=10, help="batching window (default %(default)s)")
    s.add_argument("--tasks", default="cls", help="tasks for the throughput runs (default %(default)s)")
    s.add_argument("--threads", type=int, help="torch threads per server")
    s.add_argument("--output", metavar="MD", help="rewrite this Markdown file's serve section (e.g. docs/benchmarks.md)")

    c = add_command(bsub, "encode", encode,
                    "Device-side encoding: eager, ExecuTorch, ONNX Runtime, torch-free; both coders.",
                    "Entropic Student and RAC N=0/4/8 at batch 1, one thread and all threads, model input to payload "
                    "bytes with eager PyTorch, ExecuTorch (the .pte of `platform export`, when installed), ONNX "
                    "Runtime and the torch-free client; the old and new entropy coders; what a --max-bytes budget "
                    "search costs over coding at one fixed rate (a 6-rate codec, ONNX Runtime, one thread); "
                    "installed sizes.", group="bench")
    c.add_argument("--repeat", type=int, default=20, help="timed runs per measurement (default %(default)s)")
    c.add_argument("--size", type=int, default=224, help="input side (default %(default)s)")
    c.add_argument("--edge-venv", type=Path, metavar="DIR", help="a venv with the edge client, to report its size")
    c.add_argument("--output", metavar="MD", help="rewrite this Markdown file's encode section")

    r = add_command(bsub, "reliability", reliability,
                    "Load, fault and fuzz runs against a live gateway: statuses, latency quantiles, RSS, restarts.",
                    "Start a real gateway on loopback and send it a bounded load, the reliability issue's attacks, "
                    "and forged payloads; report what came back.", group="bench")
    r.add_argument("--bundle", metavar="DIR", help="bundle to serve (default: the embedded default)")
    r.add_argument("--requests", type=int, default=400, help="load-run requests (default %(default)s)")
    r.add_argument("--concurrency", type=int, default=16)
    r.add_argument("--fuzz", type=int, default=2000, help="forged payloads (default %(default)s)")
    r.add_argument("--rounds", type=int, default=5, help="rounds of the attack list (default %(default)s)")
    r.add_argument("--output", metavar="MD", help="rewrite this Markdown file's reliability section")

    e = add_command(bsub, "e2e", e2e, "Classification accuracy and bpp through the real serving path, per image.",
                    "Encode each image of an ImageFolder split alone (as a device would), parse, decode and classify "
                    "it with the gateway runtime; compare with a teacher.", group="bench")
    e.add_argument("--bundle", metavar="DIR", required=True)
    e.add_argument("--data", metavar="DIR", required=True, type=Path, help="ImageFolder root (DIR/<split>/<class>/…)")
    e.add_argument("--split", default="val")
    e.add_argument("--teacher", metavar="DIR", type=Path, help="teacher directory to compare against")
    e.add_argument("--limit", type=int, help="evaluate an evenly spaced subset of this many images")
    e.add_argument("--output", metavar="MD", help="rewrite this Markdown file's e2e section")

    k = add_command(bsub, "link", link, "A device picking each frame's rate on a link whose bandwidth varies, "
                                        "against every fixed rate: accuracy, deadline misses, bytes.",
                    "Code real val images with a (variable-rate) bundle at every rate and answer them with the "
                    "gateway runtime; then simulate a link whose bandwidth follows a seeded trace (LTE-M-like "
                    "0.1–1 Mbit/s, or LoRa SF7–SF10) and compare a device that picks each frame's rate to meet a "
                    "deadline (byte budget from its predicted bandwidth, the edge's budget search) with each fixed "
                    "rate and any separately trained bundles. The link is arithmetic on the real byte counts; see "
                    "docs/benchmarks.md.", group="bench")
    k.add_argument("--bundle", metavar="DIR", required=True, type=Path, help="the (variable-rate) bundle")
    k.add_argument("--data", metavar="DIR", required=True, type=Path,
                   help="fmnist-scenes tree, ImageFolder root or COCO tree (what platform evaluate reads)")
    k.add_argument("--fixed", metavar="DIR", nargs="+", type=Path, default=[],
                   help="separately trained bundles, each also a fixed-rate policy")
    k.add_argument("--task", help="task whose answers are scored (default: classification, else the bundle's first)")
    k.add_argument("--trace", choices=("lte-m", "lora"), default="lte-m", help="bandwidth trace (default %(default)s)")
    k.add_argument("--deadline-ms", type=float, help="arrival-to-answer deadline (default: 30 for lte-m, 1000 for lora)")
    k.add_argument("--fps", type=float, help="frames per second (default: 10 for lte-m, 0.2 for lora)")
    k.add_argument("--frames", type=int, default=100, help="frames, each a different val image (default %(default)s)")
    k.add_argument("--seed", type=int, default=0, help="the trace's seed (default %(default)s)")
    k.add_argument("--split", default="val")
    k.add_argument("--predictor", choices=("robust", "ewma", "oracle"), default="robust",
                   help="the adaptive device's bandwidth prediction: from its past transfers, the harmonic mean "
                        "of the last 5 discounted by its recent error (robust, the default) or an exponentially "
                        "weighted mean (ewma); or the trace itself (oracle)")
    k.add_argument("--repeat", type=int, default=20, help="timed runs per encode/server time (default %(default)s)")
    k.add_argument("--encode-ms", type=float, help="the device's encode time for every policy (default: measured here)")
    k.add_argument("--server-ms", type=float, help="the server's time per frame for every policy (default: measured here)")
    k.add_argument("--plot", metavar="PNG", type=Path, help="plot the trace and the rate chosen per frame")
    k.add_argument("--output", metavar="MD", help="rewrite this Markdown file's link section")


def _publish(report: str, output: str | None, section: str) -> int:
    """Print a benchmark's report and, with ``--output``, rewrite its section of that Markdown file."""
    from ..bench.report import write_section

    print(report)
    if output:
        write_section(output, section, report)
        print(f"\nwrote {output}")
    return 0


def serve(args) -> int:
    from ..bench import serve as bench
    from ..defaults import resolve_bundle

    bundle = resolve_bundle(args.bundle)
    report = bench.run(bundle, rounds=args.rounds, concurrency=args.concurrency, per_client=args.requests,
                       max_batch=args.max_batch, max_wait_ms=args.max_wait_ms, tasks=args.tasks, threads=args.threads)
    return _publish(report, args.output, f"serve:{bundle.name}")


def encode(args) -> int:
    from ..bench import encode as bench

    return _publish(bench.run(repeat=args.repeat, size=args.size, edge_venv=args.edge_venv), args.output, "encode")


def reliability(args) -> int:
    from ..bench import reliability as bench
    from ..defaults import resolve_bundle

    report = bench.run(resolve_bundle(args.bundle), args.requests, args.concurrency, args.fuzz, args.rounds)
    return _publish(report, args.output, "reliability")


def e2e(args) -> int:
    from ..bench import e2e as bench
    from ..bench.report import machine

    table = bench.run(Path(args.bundle), args.data, split=args.split, teacher=args.teacher, limit=args.limit)
    return _publish(f"Machine: {machine()}.\n\n{table}", args.output, "e2e")


def link(args) -> int:
    from ..bench import link as bench

    report = bench.run(args.bundle, args.data, fixed=args.fixed, task=args.task, trace=args.trace,
                       deadline_ms=args.deadline_ms, fps=args.fps, frames=args.frames, seed=args.seed,
                       split=args.split, predictor=args.predictor, plot=args.plot, repeat=args.repeat,
                       encode_ms=args.encode_ms, server_ms=args.server_ms,
                       report_dir=Path(args.output).parent if args.output else None)
    if args.plot:
        print(f"wrote {args.plot}")
    return _publish(report, args.output, f"link:{args.trace}")
