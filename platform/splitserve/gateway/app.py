"""FastAPI application: thin routes over :class:`Runtime` and :class:`DynamicBatcher`.

Every user error maps to a 4xx with a reason; nothing a client sends can take the server down.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from contextlib import asynccontextmanager
from typing import Annotated, Any, Optional

from fastapi import APIRouter, Depends, FastAPI, HTTPException, Query, Request
from fastapi.responses import JSONResponse, Response
from fastapi.security import APIKeyHeader
from splitserve_edge.payload import PayloadLimits
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, Field, create_model

from .. import __version__
from ..errors import FingerprintMismatch, SplitserveError, excerpt
from ..plugins import PluginRegistry
from .batching import DynamicBatcher, QueueFull
from .config import ServerConfig
from .metrics import GatewayMetrics
from .runtime import Job, Runtime

log = logging.getLogger("splitserve.gateway")

PAYLOAD_TYPES = ("application/x-splitserve", "application/octet-stream")
API_KEY = APIKeyHeader(name="X-API-Key", auto_error=False, description="the gateway's API key, when it has one")
IMAGE_TYPES = ("image/jpeg", "image/png", "image/webp")
UPLOAD_DECODES = 2  # uploaded images decode this many at a time, each within the pixel budget


# (height, width): a JSON array of two ints (a tuple's schema is not valid OpenAPI 3.1 as FastAPI writes it)
Pair = Annotated[list[int], Field(min_length=2, max_length=2)]


class ErrorResponse(BaseModel):
    detail: str = Field(description="what was wrong with the request")


class EncoderInfo(BaseModel):
    fingerprint: str = Field(description="SHA-256 of encoder weights + prior CDF tables (hex)")
    fingerprint_id: str = Field(description="the 8-byte prefix carried in every payload (hex)")
    family: str
    config: dict[str, Any]
    backbone: str
    input_size: Pair = Field(description="nominal (height, width) of the model input")
    latent_channels: int
    payload_format_version: int


class TaskInfo(BaseModel):
    name: str
    aliases: list[str]
    description: str
    feature: dict[str, int]
    config: dict[str, Any]
    metrics: dict[str, float]
    response_schema: dict[str, Any]


class Health(BaseModel):
    status: str


def _result_models(runtime: Runtime) -> tuple[type[BaseModel], type[BaseModel]]:
    """Response models built from the served plugins, so OpenAPI shows each task's schema."""
    fields = {
        p.name: (Optional[p.response_model], Field(None, description=p.description or p.name))
        for p in runtime.plugins
    }
    tasks_model = create_model("TaskResults", **fields)
    image_model = create_model(
        "ImageResult",
        index=(int, Field(description="position of the image in the payload")),
        original_size=(Pair, Field(description="(height, width) of the image on the device")),
        tasks=(tasks_model, ...),
    )
    response = create_model(
        "InferResponse",
        fingerprint=(str, Field(description="encoder fingerprint the features were decoded with")),
        bytes_received=(int, Field(description="request body size in bytes")),
        input=(str, Field(description="'payload' (edge-encoded) or 'image' (full offloading)")),
        tasks=(list[str], Field(description="canonical names of the tasks that ran")),
        results=(list[image_model], ...),
    )
    return response, image_model


def head_bytes(scope: dict[str, Any]) -> int:
    """Size of the request head as it came over the wire: request line, headers, blank line."""
    target = len(scope.get("raw_path") or scope["path"].encode())
    if scope.get("query_string"):
        target += 1 + len(scope["query_string"])
    line = len(scope["method"]) + 1 + target + len(" HTTP/") + len(scope.get("http_version", "1.1")) + 2
    return line + sum(len(k) + 2 + len(v) + 2 for k, v in scope["headers"]) + 2


def head_refusal(scope: dict[str, Any], limit: int) -> JSONResponse | None:
    """431 for a head above ``--max-header-bytes``. h11 checks its limit only on a head still
    incomplete after a socket read (one read brings up to 256 KiB), so the exact check is here."""
    if head_bytes(scope) <= limit:
        return None
    return JSONResponse({"detail": f"request head (request line + headers) exceeds the limit of {limit} bytes"},
                        status_code=431, headers={"Connection": "close"})


class HeadLimit:
    """ASGI middleware: :func:`head_refusal` before any route runs (the body is never read)."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        refusal = head_refusal(scope, self.limit) if scope["type"] == "http" else None
        if refusal is not None:
            return await refusal(scope, receive, send)
        await self.app(scope, receive, send)


async def _read_body(request: Request, limit: int, timeout: float) -> bytes:
    """Read at most ``limit`` bytes; refuse early on Content-Length, and while streaming; a body
    that stalls for ``timeout`` seconds gets 408 (a slow client cannot hold a slot forever)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise HTTPException(413, f"body of {declared} bytes exceeds the limit of {limit} bytes")
    chunks, size = [], 0
    stream = request.stream().__aiter__()
    while True:
        try:
            chunk = await asyncio.wait_for(stream.__anext__(), timeout)
        except StopAsyncIteration:
            break
        except asyncio.TimeoutError:
            raise HTTPException(408, f"request body stalled for {timeout:g} s") from None
        size += len(chunk)
        if size > limit:
            raise HTTPException(413, f"body exceeds the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


async def read_job(request: Request, tasks: str | None, runtime: Runtime, config: ServerConfig,
                   image_decodes: asyncio.Semaphore) -> tuple[Job, int, str]:
    """The request path up to the batch queue, shared by the FastAPI and the Ray Serve front ends:
    the tasks asked for, the content type, the bounded body, then the parsed payload or the
    decoded upload. Returns the job, the body's size and its kind ("payload" or "image")."""
    plugins = runtime.registry.resolve(tasks) if tasks is not None else list(runtime.plugins)
    request.state.tasks = [p.name for p in plugins]
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype not in PAYLOAD_TYPES + IMAGE_TYPES:
        raise HTTPException(415, f"unsupported content type {excerpt(ctype) if ctype else '(none)'}; send "
                                 f"{', '.join(PAYLOAD_TYPES + IMAGE_TYPES)}")
    body = await _read_body(request, config.max_body_bytes, config.body_timeout_s)
    if ctype in PAYLOAD_TYPES:
        payload, metas = runtime.parse_payload(body)
        return Job(plugins=plugins, payload=payload, metas=metas), len(body), "payload"
    async with image_decodes:
        pixels, metas = await asyncio.to_thread(runtime.preprocess_image, body, config.max_image_pixels)
    return Job(plugins=plugins, pixels=pixels, metas=metas), len(body), "image"


def encoder_info(runtime: Runtime) -> EncoderInfo:
    """``GET /v1/encoder``: what an edge client must encode with."""
    from splitserve_edge.payload import FORMAT_VERSION

    return EncoderInfo(
        fingerprint=runtime.fingerprint, fingerprint_id=runtime.fingerprint_id.hex(),
        family=runtime.manifest.codec.family, config=runtime.manifest.codec.config,
        backbone=runtime.manifest.backbone, input_size=runtime.manifest.input_size,
        latent_channels=runtime.codec.latent_channels, payload_format_version=FORMAT_VERSION,
    )


def task_infos(runtime: Runtime) -> list[TaskInfo]:
    """``GET /v1/tasks``: the served plugins, their resolved configs (labels left out) and schemas."""
    return [
        TaskInfo(
            name=p.name, aliases=list(p.aliases), description=p.description,
            feature={"channels": runtime.codec.feature_channels, "stride": runtime.codec.stride},
            config={k: v for k, v in runtime.head_configs[p.name].items() if k != "labels"},
            metrics=runtime.manifest.tasks[p.name].metrics,
            response_schema=p.response_model.model_json_schema(),
        )
        for p in runtime.plugins
    ]


def create_app(config: ServerConfig | None = None, runtime: Runtime | None = None) -> FastAPI:
    """Build the gateway. Models load at start-up (``/readyz`` turns 200 once warmed up)."""
    config = config or ServerConfig.from_env()
    metrics = runtime.metrics if runtime else GatewayMetrics()
    if runtime is None:
        from ..defaults import resolve_bundle

        if config.threads:
            import torch

            torch.set_num_threads(config.threads)
        limits = PayloadLimits(max_images=config.max_batch, max_image_side=config.max_image_side,
                               max_total_bytes=config.max_body_bytes)
        runtime = Runtime(resolve_bundle(config.bundle), PluginRegistry.discover(), config.tasks, metrics, limits,
                          device=config.device)
    api_key = config.resolved_api_key()
    state: dict[str, Any] = {"ready": False}
    image_decodes = asyncio.Semaphore(UPLOAD_DECODES)
    batcher = DynamicBatcher(runtime, metrics, max_batch=config.max_batch, max_wait_ms=config.max_wait_ms,
                             max_queue=config.max_queue)
    InferResponse, ImageResult = _result_models(runtime)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        batcher.start()
        if config.warmup:
            await batcher.run_in_worker(runtime.warmup)
        state["ready"] = True
        log.info("serving %s (fingerprint %s) tasks: %s", runtime.path, runtime.fingerprint[:16],
                 ", ".join(p.name for p in runtime.plugins))
        yield
        state["ready"] = False
        await batcher.stop()

    def require_key(given: Annotated[Optional[str], Depends(API_KEY)] = None) -> None:
        if not secrets.compare_digest((given or "").encode(), api_key.encode()):
            raise HTTPException(401, "missing or wrong API key (send it in the X-API-Key header)",
                                headers={"WWW-Authenticate": "X-API-Key"})

    # the spec declares the key only where the server requires one (schemathesis checks it does)
    keyed = [Depends(require_key)] if api_key is not None else []
    protected = keyed if config.auth_all else []

    router = APIRouter()
    errors = {s: {"model": ErrorResponse} for s in (400, 401, 408, 409, 413, 415, 431, 503)}

    @router.post(
        "/infer",
        response_model=InferResponse,
        responses=errors,
        summary="Decode features once and run the requested tasks",
        description=(
            "Body: a splitserve payload (`application/x-splitserve` or `application/octet-stream`) "
            "holding one or more edge-encoded images, or one plain image (`image/jpeg`, `image/png`, "
            "`image/webp`) that the server encodes itself (full offloading). The latent is entropy-"
            "decoded and the feature rebuilt once per batch; each requested task runs on it."
        ),
        openapi_extra={"requestBody": {"required": True, "content": {
            **{t: {"schema": {"type": "string", "format": "binary"}} for t in PAYLOAD_TYPES + IMAGE_TYPES}}}},
        dependencies=keyed,
    )
    async def infer(
        request: Request,
        tasks: Annotated[Optional[str], Query(description="comma-separated task names or aliases, e.g. "
                                                          "cls,det,seg (default: every served task)",
                                              examples=["cls,det,seg"])] = None,
    ):
        job, size, kind = await read_job(request, tasks, runtime, config, image_decodes)
        metrics.payload_bytes.labels(kind=kind).observe(size)
        per_image = await batcher.submit(job)
        return InferResponse(
            fingerprint=runtime.fingerprint,
            bytes_received=size,
            input=kind,
            tasks=[p.name for p in job.plugins],
            results=[
                ImageResult(index=i, original_size=m.original_size, tasks=answers)
                for i, (m, answers) in enumerate(zip(job.metas, per_image))
            ],
        )

    @router.get("/v1/tasks", response_model=list[TaskInfo], summary="Served task plugins and their schemas",
                dependencies=protected)
    async def list_tasks():
        return task_infos(runtime)

    @router.get("/v1/encoder", response_model=EncoderInfo, dependencies=protected,
                summary="The encoder an edge client must use (check the fingerprint)")
    async def get_encoder_info():
        return encoder_info(runtime)

    @router.api_route("/healthz", methods=["GET", "HEAD"], response_model=Health,
                      responses={503: {"model": Health}}, summary="Liveness: the process can still answer")
    async def healthz():
        if batcher.broken is not None:  # e.g. after a MemoryError: restart me
            return JSONResponse({"status": f"broken: {batcher.broken}"}, status_code=503)
        return Health(status="ok")

    @router.api_route("/readyz", methods=["GET", "HEAD"], response_model=Health, responses={503: {"model": Health}},
                      summary="Readiness: models loaded and warmed up")
    async def readyz():
        if batcher.broken is not None:
            return JSONResponse({"status": f"broken: {batcher.broken}"}, status_code=503)
        if not state["ready"]:
            return JSONResponse({"status": "starting"}, status_code=503)
        return Health(status="ready")

    @router.get("/metrics", summary="Prometheus metrics", response_class=Response, dependencies=protected,
                responses={200: {"content": {CONTENT_TYPE_LATEST: {}}}})
    async def prometheus():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    app = FastAPI(
        title="splitserve gateway",
        version=__version__,
        description="Decode edge-compressed features once; run classification, detection, segmentation "
                    "and any installed task plugin on them.",
        lifespan=lifespan,
        docs_url="/docs" if config.docs else None,
        redoc_url="/redoc" if config.docs else None,
    )
    app.include_router(router)
    _install_error_handlers(app)
    app.add_middleware(HeadLimit, limit=config.max_header_bytes)  # inside record_inference: 431s are counted

    @app.middleware("http")
    async def record_inference(request: Request, call_next):
        """Request metrics in one place: per task and HTTP status, and end-to-end latency."""
        if request.url.path != "/infer":
            return await call_next(request)
        start = time.perf_counter()
        status = 500
        try:
            response = await call_next(request)
            status = response.status_code
            return response
        finally:
            for task in getattr(request.state, "tasks", None) or ["?"]:
                metrics.requests.labels(task=task, status=str(status)).inc()
            metrics.request_seconds.observe(time.perf_counter() - start)

    app.state.runtime = runtime
    app.state.config = config
    return app


def _install_error_handlers(app: FastAPI) -> None:
    """Every error a user can fix is a 4xx with ``{"detail": reason}``; the server keeps serving."""

    @app.exception_handler(FingerprintMismatch)
    async def other_encoder(request: Request, e: FingerprintMismatch):
        return JSONResponse({"detail": str(e)}, status_code=409)

    @app.exception_handler(SplitserveError)  # PayloadError, PluginError (unknown task), image errors
    async def bad_request(request: Request, e: SplitserveError):
        return JSONResponse({"detail": str(e)}, status_code=400)

    @app.exception_handler(QueueFull)
    async def busy(request: Request, e: QueueFull):
        return JSONResponse({"detail": str(e)}, status_code=503, headers={"Retry-After": str(e.retry_after)})


def factory() -> FastAPI:
    """Entry for ``uvicorn --factory`` / worker processes: configuration from the environment."""
    return create_app(ServerConfig.from_env())
