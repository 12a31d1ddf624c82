"""``platform ray``: the gateway as a Ray Serve application on a local (or existing) Ray cluster."""

from __future__ import annotations

from . import add_command


def register(sub) -> None:
    p = add_command(sub, "ray", run, "Serve with Ray Serve: an ingress that decodes once, one deployment per task.",
                    "Start a local Ray instance (or join a cluster with --address) and run the gateway as a Ray "
                    "Serve application: the ingress parses and decodes each payload once and hands the feature to "
                    "one deployment per task, each batching with @serve.batch and autoscaling on its own. The same "
                    "FastAPI app as `platform serve` (same HTTP API, answers and errors); every other `platform "
                    "serve` option is read from its SPLITSERVE_* variable (e.g. SPLITSERVE_TASK_TIMEOUT_S). Blocks "
                    "until Ctrl-C or SIGTERM.")
    p.add_argument("--bundle", metavar="DIR", help="bundle directory (default: $SPLITSERVE_BUNDLE or the embedded "
                                                   "default); every Ray node must be able to read it")
    p.add_argument("--tasks", help="comma-separated tasks to serve (default: every head in the bundle)")
    p.add_argument("--host", default=None, help="HTTP host (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=None, help="HTTP port (default 8000)")
    p.add_argument("--device", default=None, choices=("cpu", "cuda", "auto"))
    p.add_argument("--max-batch", type=int, default=None, help="images per batch in each task deployment (16)")
    p.add_argument("--max-wait-ms", type=float, default=None, help="batching window of each task deployment (5)")
    p.add_argument("--address", help="an existing Ray cluster, e.g. ray://head:10001 or auto "
                                     "(default: start a local instance)")
    p.add_argument("--num-cpus", type=float, default=None, help="CPUs of a local instance (default: all)")
    p.add_argument("--object-store-mb", type=int, default=None,
                   help="object store of a local instance, MiB (default: Ray's, 30%% of memory)")
    p.add_argument("--replica-cpus", type=float, default=0.25, help="CPUs reserved per replica (fractional)")
    p.add_argument("--replica-gpus", type=float, default=0.0, help="GPUs reserved per replica (with --device cuda)")
    p.add_argument("--min-replicas", type=int, default=1, help="per deployment")
    p.add_argument("--max-replicas", type=int, default=4, help="per deployment (autoscaling)")
    p.add_argument("--name", default="splitserve", help="Serve application name")


def run(args) -> int:
    import os
    import signal
    import time

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray
    from ray import serve

    from ..defaults import resolve_bundle
    from ..gateway.config import ServerConfig
    from ..gateway.ray_app import AUTOSCALING, build_app

    config = ServerConfig.from_env(bundle=args.bundle, tasks=args.tasks.split(",") if args.tasks else None,
                                   host=args.host, port=args.port, device=args.device, max_batch=args.max_batch,
                                   max_wait_ms=args.max_wait_ms)
    config = config.model_copy(update={"bundle": str(resolve_bundle(config.bundle))})
    application = build_app(  # checks the bundle and the tasks before Ray starts
        config=config, autoscaling_config={**AUTOSCALING, "min_replicas": args.min_replicas,
                                           "max_replicas": args.max_replicas},
        ray_actor_options={"num_cpus": args.replica_cpus, **({"num_gpus": args.replica_gpus} if args.replica_gpus
                                                             else {})})

    if args.address:
        ray.init(address=args.address)
    else:
        loopback = config.host in ("127.0.0.1", "localhost")
        ray.init(num_cpus=args.num_cpus, include_dashboard=False,
                 object_store_memory=args.object_store_mb * 2**20 if args.object_store_mb else None,
                 **({"_node_ip_address": "127.0.0.1"} if loopback else {}))

    def stop(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    try:
        # Ray's own HTTP proxy (uvicorn) reads the requests: it has a keep-alive timeout but no head
        # deadline or connection bound (docs/reliability.md); the app's body deadlines apply as usual
        serve.start(http_options={"host": config.host, "port": config.port,
                                  "keep_alive_timeout_s": config.keep_alive_s})
        serve.run(application, name=args.name, route_prefix="/")
        print(f"serving {config.bundle} with Ray Serve on "
              f"http://{config.host}:{config.port} (Ctrl-C to stop)", flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        if args.address:
            serve.delete(args.name)  # leave the cluster's other applications running
        else:
            serve.shutdown()
            ray.shutdown()
    return 0

