"""``platform bench``: benchmarks whose ratios are measured side by side in one run."""

from __future__ import annotations

from pathlib import Path

from . import add_command


def register(sub) -> None:
    p = add_command(sub, "bench", lambda a: a.bench_parser.print_help(), "Run benchmarks and write their reports.")
    p.set_defaults(bench_parser=p)
    bsub = p.add_subparsers(title="benchmarks", metavar="BENCH")
    s = bsub.add_parser("serve", help="Decode-once latency and dynamic-batching throughput on loopback.",
                        description="Start real gateway processes on loopback and compare: one 3-task request "
                                    "vs three single-task requests; throughput with dynamic batching vs batch 1.")
    s.add_argument("--bundle", metavar="DIR", help="bundle to serve (default: the embedded default)")
    s.add_argument("--rounds", type=int, default=20, help="latency rounds (default %(default)s)")
    s.add_argument("--concurrency", type=int, default=16, help="concurrent clients (default %(default)s)")
    s.add_argument("--requests", type=int, default=8, help="requests per client (default %(default)s)")
    s.add_argument("--max-batch", type=int, default=16, help="batch size of the batching server")
    s.add_argument("--max-wait-ms", type=float, default=10, help="batching window (default %(default)s)")
    s.add_argument("--tasks", default="cls", help="tasks for the throughput runs (default %(default)s)")
    s.add_argument("--threads", type=int, help="torch threads per server")
    s.add_argument("--output", metavar="MD", help="rewrite this Markdown file's serve section (e.g. docs/benchmarks.md)")
    s.set_defaults(func=serve, command="bench serve")

    c = bsub.add_parser("encode", help="Device-side encoding: eager, ExecuTorch, ONNX Runtime, torch-free; both coders.",
                        description="Entropic Student and RAC N=0/4/8 at batch 1, one thread and all threads, model "
                                    "input to payload bytes with eager PyTorch, ExecuTorch (the .pte of `platform "
                                    "export`, when installed), ONNX Runtime and the torch-free client; the old and new "
                                    "entropy coders; installed sizes.")
    c.add_argument("--repeat", type=int, default=20, help="timed runs per measurement (default %(default)s)")
    c.add_argument("--size", type=int, default=224, help="input side (default %(default)s)")
    c.add_argument("--edge-venv", type=Path, metavar="DIR", help="a venv with the edge client, to report its size")
    c.add_argument("--output", metavar="MD", help="rewrite this Markdown file's encode section")
    c.set_defaults(func=encode, command="bench encode")

    r = bsub.add_parser("reliability", help="Load, fault and fuzz runs against a live gateway: statuses, "
                                             "latency quantiles, RSS, restarts.",
                        description="Start a real gateway on loopback and send it a bounded load, the reliability "
                                    "issue's attacks, and forged payloads; report what came back.")
    r.add_argument("--bundle", metavar="DIR", help="bundle to serve (default: the embedded default)")
    r.add_argument("--requests", type=int, default=400, help="load-run requests (default %(default)s)")
    r.add_argument("--concurrency", type=int, default=16)
    r.add_argument("--fuzz", type=int, default=2000, help="forged payloads (default %(default)s)")
    r.add_argument("--rounds", type=int, default=5, help="rounds of the attack list (default %(default)s)")
    r.add_argument("--output", metavar="MD", help="rewrite this Markdown file's reliability section")
    r.set_defaults(func=reliability, command="bench reliability")

    e = bsub.add_parser("e2e", help="Classification accuracy and bpp through the real serving path, per image.",
                        description="Encode each image of an ImageFolder split alone (as a device would), parse, "
                                    "decode and classify it with the gateway runtime; compare with a teacher.")
    e.add_argument("--bundle", metavar="DIR", required=True)
    e.add_argument("--data", metavar="DIR", required=True, type=Path, help="ImageFolder root (DIR/<split>/<class>/…)")
    e.add_argument("--split", default="val")
    e.add_argument("--teacher", metavar="DIR", type=Path, help="teacher directory to compare against")
    e.add_argument("--limit", type=int, help="evaluate an evenly spaced subset of this many images")
    e.add_argument("--output", metavar="MD", help="rewrite this Markdown file's e2e section")
    e.set_defaults(func=e2e, command="bench e2e")


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
