"""``platform serve``: the gateway on uvicorn, configured like uvicorn (flags or SPLITSERVE_* env)."""

from __future__ import annotations

from . import add_command


def register(sub) -> None:
    p = add_command(
        sub, "serve", run, "Serve the REST gateway (POST /infer?tasks=cls,det,seg; docs at /docs).",
        "Serve a bundle over HTTP. Every flag can also be set as SPLITSERVE_<FLAG> in the environment "
        "(e.g. SPLITSERVE_MAX_BATCH=32); flags win.")
    p.add_argument("--bundle", metavar="DIR", help="bundle directory (default: the embedded default bundle)")
    p.add_argument("--host", help="bind address (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="port (default 8000; 0 picks a free one)")
    p.add_argument("--tasks", type=lambda s: [t for t in s.split(",") if t],
                   help="comma-separated tasks to serve (default: every head in the bundle)")
    p.add_argument("--max-batch", type=int, help="images per decode batch (default 16)")
    p.add_argument("--max-wait-ms", type=float, help="how long a batch waits to fill (default 5)")
    p.add_argument("--max-queue", type=int, help="images allowed to wait before 503 (default 256)")
    p.add_argument("--max-body-bytes", type=int, help="largest request body (default 8 MiB)")
    p.add_argument("--workers", type=int, help="server processes (default 1)")
    p.add_argument("--threads", type=int, help="torch threads per process")
    p.add_argument("--api-key", help="require this key in the X-API-Key header (visible in the process list: "
                                     "prefer SPLITSERVE_API_KEY or --api-key-file)")
    p.add_argument("--api-key-file", help="read the API key from this file (e.g. a mounted Kubernetes secret)")
    p.add_argument("--auth-all", action="store_const", const=True,
                   help="also protect /metrics, /v1/*, /openapi.json, /docs and /redoc (the probes stay open)")
    p.add_argument("--docs", action="store_const", const=True,
                   help="serve /docs and /redoc (their JavaScript loads from a CDN; off by default)")
    p.add_argument("--max-image-side", type=int, help="largest original image side a request may declare (default 8192)")
    p.add_argument("--max-image-pixels", type=int, help="largest uploaded image in pixels (default 16M)")
    p.add_argument("--body-timeout-s", type=float, help="a stalled request body gets 408 after this (default 10)")
    p.add_argument("--head-timeout-s", type=float,
                   help="a request head must arrive within this, else 408 and the connection closes (default 10)")
    p.add_argument("--request-timeout-s", type=float,
                   help="a whole request (head + body) must arrive within this, else 408 (default 60)")
    p.add_argument("--max-connections", type=int,
                   help="connections served at once; requests on more get 503 + Retry-After (default 512)")
    p.add_argument("--keep-alive-s", type=float, help="idle keep-alive timeout (default 5)")
    p.add_argument("--shutdown-timeout-s", type=float, help="SIGTERM: finish requests for at most this long (default 20)")
    p.add_argument("--max-header-bytes", type=int, help="largest request head in bytes (default 16384; 431 above)")
    p.add_argument("--device", choices=("cpu", "cuda", "auto"),
                   help="where codec and heads run (default cpu; auto: cuda when available)")
    p.add_argument("--no-warmup", dest="warmup", action="store_const", const=False,
                   help="skip the warm-up pass before /readyz turns ready")
    p.add_argument("--log-level", choices=["critical", "error", "warning", "info", "debug"])


def run(args) -> int:
    import logging

    from ..defaults import resolve_bundle
    from ..gateway import ServerConfig
    from ..gateway.server import serve

    overrides = {k: getattr(args, k) for k in ServerConfig.model_fields if hasattr(args, k)}
    config = ServerConfig.from_env(**overrides)
    config.bundle = str(resolve_bundle(config.bundle))  # build the default once, before any worker
    config.resolved_api_key()  # a missing key file fails here, in one line
    if args.api_key:
        logging.getLogger("splitserve.gateway").warning(
            "--api-key is visible to every user of this machine (ps, /proc); use SPLITSERVE_API_KEY or --api-key-file")
    logging.basicConfig(level=config.log_level.upper(), format="%(levelname)s:     %(message)s")
    serve(config)
    return 0
