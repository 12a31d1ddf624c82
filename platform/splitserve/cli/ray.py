"""``platform ray``: the gateway as a Ray Serve application on a local (or existing) Ray cluster."""

from __future__ import annotations

from . import add_command


def register(sub) -> None:
    p = add_command(sub, "ray", run, "Serve with Ray Serve: an ingress that decodes once, one deployment per task.",
                    "Start (or join, with --address) a Ray cluster and run the gateway as a Ray Serve application: "
                    "the ingress parses and decodes each payload once and hands the feature to one deployment per "
                    "task, each batching with @serve.batch and autoscaling on its own. Same API as `platform serve`.")
    p.add_argument("--bundle", metavar="DIR", help="bundle directory (default: $SPLITSERVE_BUNDLE or the embedded default)")
    p.add_argument("--tasks", help="comma-separated tasks to serve (default: every head in the bundle)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--address", help="an existing Ray cluster (default: start a local one)")
    p.add_argument("--num-cpus", type=float, default=None, help="CPUs for a local Ray instance")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda", "auto"))


def run(args) -> int:
    import os
    import time

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray
    from ray import serve

    from ..defaults import resolve_bundle
    from ..gateway.ray_app import build_app

    bundle = str(resolve_bundle(args.bundle))
    if args.address:
        ray.init(address=args.address)
    else:
        ray.init(num_cpus=args.num_cpus, include_dashboard=False, _node_ip_address=args.host)
    serve.start(http_options={"host": args.host, "port": args.port})
    serve.run(build_app(bundle, args.tasks.split(",") if args.tasks else None, args.device), name="splitserve")
    print(f"serving {bundle} with Ray Serve on http://{args.host}:{args.port} (Ctrl-C to stop)", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        serve.shutdown()
    return 0
