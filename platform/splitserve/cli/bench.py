"""``platform bench``: benchmarks whose ratios are measured side by side in one run."""

from __future__ import annotations

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


def serve(args) -> int:
    from ..bench import serve as bench
    from ..bench.report import write_section
    from ..defaults import resolve_bundle

    report = bench.run(resolve_bundle(args.bundle), rounds=args.rounds, concurrency=args.concurrency,
                       per_client=args.requests, max_batch=args.max_batch, max_wait_ms=args.max_wait_ms,
                       tasks=args.tasks, threads=args.threads)
    print(report)
    if args.output:
        write_section(args.output, "serve", report)
        print(f"\nwrote {args.output}")
    return 0
