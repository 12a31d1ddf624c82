"""The one HTTP surface: routes, auth, limits, the error-to-status map and response models.

:func:`create_app` builds it over an :class:`~splitserve.gateway.executor.Executor`: the local one
(``platform serve``, uvicorn) or Ray Serve's (``platform ray``, mounted with ``@serve.ingress``), so
both answer the same requests with the same statuses and words. Every user error maps to a 4xx
with a reason; nothing a client sends can take the server down.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from contextlib import asynccontextmanager
from typing import Annotated, Any, Optional

from fastapi import APIRouter, Depends, FastAPI, HTTPException, Query, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import JSONResponse, Response
from fastapi.security import APIKeyHeader
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, Field, create_model

from .. import __version__
from ..bundle import RateEntry
from ..errors import FingerprintMismatch, SplitserveError, excerpt
from .config import ServerConfig
from .batching import Unavailable
from .executor import Executor
from .runtime import Features, Job, Served, TaskFailed

log = logging.getLogger("splitserve.gateway")

PAYLOAD_TYPES = ("application/x-splitserve", "application/octet-stream")
API_KEY = APIKeyHeader(name="X-API-Key", auto_error=False, description="the gateway's API key, when it has one")
IMAGE_TYPES = ("image/jpeg", "image/png", "image/webp")
UPLOAD_DECODES = 2  # uploaded images decode this many at a time, each within the pixel budget
REQUEST_STARTED = "splitserve.request_started"  # scope key: loop time of the request's first byte (server.py)


# (height, width): a JSON array of two ints (a tuple's schema is not valid OpenAPI 3.1 as FastAPI writes it)
Pair = Annotated[list[int], Field(min_length=2, max_length=2)]


class ErrorResponse(BaseModel):
    detail: str = Field(description="what was wrong with the request")


class RateInfo(RateEntry):
    """One rate a device may code at, as the bundle's manifest measured it."""

    index: int = Field(description="the rate index a payload names for an image (0: the smallest payload)")


class EncoderInfo(BaseModel):
    fingerprint: str = Field(description="SHA-256 of encoder weights + prior CDF tables (hex)")
    fingerprint_id: str = Field(description="the 8-byte prefix carried in every payload (hex)")
    family: str
    config: dict[str, Any]
    backbone: str
    input_size: Pair = Field(description="nominal (height, width) of the model input")
    latent_channels: int
    payload_format_version: int = Field(description="the payload format this bundle's encoders write: 3 names "
                                                    "each image's rate (variable-rate), 2 has none (single-rate)")
    rates: list[RateInfo] = Field(description="the rates a device may code an image at, by index; a single-rate "
                                              "bundle has one, index 0")
    default_rate: int = Field(description="the rate a device codes at unless it chooses; uploaded images "
                                          "(full offloading) are encoded at it")
    max_images: int = Field(description="most images one /infer request may carry (--max-batch); more get 400")
    max_body_bytes: int = Field(description="largest /infer body accepted (--max-body-bytes); larger gets 413")


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


def _result_models(served: Served) -> tuple[type[BaseModel], type[BaseModel]]:
    """Response models built from the served plugins, so OpenAPI shows each task's schema."""
    fields = {
        p.name: (Optional[p.response_model], Field(None, description=p.description or p.name))
        for p in served.plugins
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


class HeadLimit:
    """ASGI middleware: 431 for a head above ``--max-header-bytes``, before any route runs (the body
    is never read). h11 checks its limit only on a head still incomplete after a socket read (one
    read brings up to 256 KiB), so the exact check is here."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and head_bytes(scope) > self.limit:
            refusal = JSONResponse({"detail": f"request head (request line + headers) exceeds the limit of "
                                              f"{self.limit} bytes"}, status_code=431, headers={"Connection": "close"})
            return await refusal(scope, receive, send)
        await self.app(scope, receive, send)


async def _read_body(request: Request, config: ServerConfig) -> bytes:
    """Read at most ``--max-body-bytes``; refuse early on Content-Length, and while streaming. A
    body that stalls for ``--body-timeout-s``, or a request not complete ``--request-timeout-s``
    after its first byte, gets 408: a slow client cannot hold a slot for long."""
    limit = config.max_body_bytes
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise HTTPException(413, f"body of {declared} bytes exceeds the limit of {limit} bytes")
    loop = asyncio.get_running_loop()
    deadline = request.scope.get(REQUEST_STARTED, loop.time()) + config.request_timeout_s
    chunks, size = [], 0
    stream = request.stream().__aiter__()
    while True:
        wait = min(config.body_timeout_s, deadline - loop.time())
        try:
            chunk = await asyncio.wait_for(stream.__anext__(), max(wait, 0))
        except StopAsyncIteration:
            break
        except asyncio.TimeoutError:
            reason = (f"request body stalled for {config.body_timeout_s:g} s" if wait == config.body_timeout_s
                      else f"request not complete within {config.request_timeout_s:g} s")
            raise HTTPException(408, reason, headers={"Connection": "close"}) from None
        size += len(chunk)
        if size > limit:
            raise HTTPException(413, f"body exceeds the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


async def read_job(request: Request, tasks: str | None, executor: Executor, config: ServerConfig,
                   image_decodes: asyncio.Semaphore) -> tuple[Job, int, str]:
    """The request path up to the executor: the tasks asked for, the content type, the bounded
    body, then the parsed payload or the decoded upload. Returns the job, the body's size and its
    kind ("payload" or "image")."""
    served, features = executor.served, executor.features
    plugins = served.registry.resolve(tasks) if tasks is not None else list(served.plugins)
    request.state.tasks = [p.name for p in plugins]
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype not in PAYLOAD_TYPES + IMAGE_TYPES:
        raise HTTPException(415, f"unsupported content type {excerpt(ctype) if ctype else '(none)'}; send "
                                 f"{', '.join(PAYLOAD_TYPES + IMAGE_TYPES)}")
    body = await _read_body(request, config)
    if ctype in PAYLOAD_TYPES:
        payload, metas = features.parse_payload(body)
        return Job(plugins=plugins, payload=payload, metas=metas), len(body), "payload"
    async with image_decodes:
        pixels, metas = await asyncio.to_thread(features.preprocess_image, body, config.max_image_pixels)
    return Job(plugins=plugins, pixels=pixels, metas=metas), len(body), "image"


def encoder_info(features: Features, max_body_bytes: int) -> EncoderInfo:
    """``GET /v1/encoder``: what an edge client must encode with, and the rates it may choose from
    (a single-rate bundle's one rate is described by its measured ``bytes`` and ``payload_bpp``)."""
    from splitserve_edge.payload import FORMAT_VERSION, SINGLE_RATE_VERSION

    manifest, count = features.manifest, features.codec.rates
    if manifest.rates:
        rates = manifest.rates
    elif count == 1:  # measured by `platform bundle measure`
        rates = [RateEntry(bytes_per_image=manifest.metrics.get("bytes"), bpp=manifest.metrics.get("payload_bpp"))]
    else:  # not measured
        rates = [RateEntry()] * count
    return EncoderInfo(
        fingerprint=features.fingerprint, fingerprint_id=features.fingerprint_id.hex(),
        family=manifest.codec.family, config=manifest.codec.config, backbone=manifest.backbone,
        input_size=manifest.input_size, latent_channels=features.codec.latent_channels,
        payload_format_version=FORMAT_VERSION if count > 1 else SINGLE_RATE_VERSION,
        rates=[RateInfo(index=k, **rate.model_dump()) for k, rate in enumerate(rates)],
        default_rate=manifest.default_rate, max_images=features.payload_limits.max_images,
        max_body_bytes=max_body_bytes,
    )


def task_infos(features: Features, served: Served) -> list[TaskInfo]:
    """``GET /v1/tasks``: the served plugins, their resolved configs (labels left out) and schemas."""
    return [
        TaskInfo(
            name=p.name, aliases=list(p.aliases), description=p.description,
            feature={"channels": features.codec.feature_channels, "stride": features.codec.stride},
            config={k: v for k, v in served.configs[p.name].items() if k != "labels"},
            metrics=features.manifest.tasks[p.name].metrics,
            response_schema=p.response_model.model_json_schema(),
        )
        for p in served.plugins
    ]


def create_app(config: ServerConfig | None = None, executor: Executor | None = None) -> FastAPI:
    """The gateway over ``executor`` (default: the local one, built from ``config``). Models load
    here; ``/readyz`` turns 200 once the executor has started (warmed up)."""
    config = config or ServerConfig.from_env()
    if executor is None:
        from .local import LocalExecutor

        executor = LocalExecutor.from_config(config)
    features, served, metrics = executor.features, executor.served, executor.metrics
    api_key = config.resolved_api_key()
    state: dict[str, Any] = {"ready": False}
    image_decodes = asyncio.Semaphore(UPLOAD_DECODES)
    InferResponse, ImageResult = _result_models(served)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await executor.start()
        state["ready"] = True
        log.info("serving %s (fingerprint %s) tasks: %s", features.path, features.fingerprint[:16],
                 ", ".join(p.name for p in served.plugins))
        yield
        state["ready"] = False
        await executor.stop()

    def require_key(given: Annotated[Optional[str], Depends(API_KEY)] = None) -> None:
        if not secrets.compare_digest((given or "").encode(), api_key.encode()):
            raise HTTPException(401, "missing or wrong API key (send it in the X-API-Key header)",
                                headers={"WWW-Authenticate": "X-API-Key"})

    # the spec declares the key only where the server requires one (schemathesis checks it does)
    keyed = [Depends(require_key)] if api_key is not None else []
    protected = keyed if config.auth_all else []

    router = APIRouter()
    errors = {s: {"model": ErrorResponse} for s in (400, 401, 408, 409, 413, 415, 431, 500, 503)}

    @router.post(
        "/infer",
        response_model=InferResponse,
        responses=errors,
        summary="Decode features once and run the requested tasks",
        description=(
            "Body: a splitserve payload (`application/x-splitserve` or `application/octet-stream`) "
            "holding one or more edge-encoded images, each at any of the bundle's rates (`GET /v1/encoder`), "
            "or one plain image (`image/jpeg`, `image/png`, `image/webp`) that the server encodes itself "
            "at the default rate (full offloading). Each latent is entropy-decoded at its rate and the "
            "feature rebuilt once per batch; each requested task runs on it."
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
        job, size, kind = await read_job(request, tasks, executor, config, image_decodes)
        metrics.payload_bytes.labels(kind=kind).observe(size)
        per_image = await executor.run(job)
        return InferResponse(
            fingerprint=features.fingerprint,
            bytes_received=size,
            input=kind,
            tasks=[p.name for p in job.plugins],
            results=[
                ImageResult(index=i, original_size=m.original_size, tasks=answers)
                for i, (m, answers) in enumerate(zip(job.metas, per_image, strict=True))
            ],
        )

    @router.get("/v1/tasks", response_model=list[TaskInfo], summary="Served task plugins and their schemas",
                dependencies=protected)
    async def list_tasks():
        return task_infos(features, served)

    @router.get("/v1/encoder", response_model=EncoderInfo, dependencies=protected,
                summary="The encoder an edge client must use (check the fingerprint)")
    async def get_encoder_info():
        return encoder_info(features, config.max_body_bytes)

    # GET and HEAD as two operations: one route for both would give them one operationId, picked
    # from a set (so it differs between processes) and duplicated (invalid OpenAPI)
    probe = {"response_model": Health, "responses": {503: {"model": Health}}}

    @router.head("/healthz", operation_id="healthz_head", **probe, summary="Liveness (HEAD)")
    @router.get("/healthz", operation_id="healthz", **probe, summary="Liveness: the process can still answer")
    async def healthz():
        if executor.broken is not None:  # e.g. after a MemoryError: restart me
            return JSONResponse({"status": f"broken: {executor.broken}"}, status_code=503)
        return Health(status="ok")

    @router.head("/readyz", operation_id="readyz_head", **probe, summary="Readiness (HEAD)")
    @router.get("/readyz", operation_id="readyz", **probe, summary="Readiness: models loaded and warmed up")
    async def readyz():
        if executor.broken is not None:
            return JSONResponse({"status": f"broken: {executor.broken}"}, status_code=503)
        if not state["ready"]:
            return JSONResponse({"status": "starting"}, status_code=503)
        return Health(status="ready")

    @router.get("/metrics", summary="Prometheus metrics", response_class=Response, dependencies=protected,
                responses={200: {"content": {CONTENT_TYPE_LATEST: {}}}})
    async def prometheus():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    # The spec and the docs pages are routes like the others, so --auth-all covers them too.
    @router.get("/openapi.json", include_in_schema=False, dependencies=protected)
    async def openapi(request: Request):
        spec, root = app.openapi(), request.scope.get("root_path", "").rstrip("/")
        return JSONResponse({**spec, "servers": [{"url": root}]} if root else spec)

    def spec_url(request: Request) -> str:
        return request.scope.get("root_path", "").rstrip("/") + "/openapi.json"

    if config.docs:  # their JavaScript loads from a CDN, which an offline site cannot reach: opt-in
        @router.get("/docs", include_in_schema=False, dependencies=protected)
        async def swagger(request: Request):
            return get_swagger_ui_html(openapi_url=spec_url(request), title=f"{app.title} - Swagger UI")

        @router.get("/redoc", include_in_schema=False, dependencies=protected)
        async def redoc(request: Request):
            return get_redoc_html(openapi_url=spec_url(request), title=f"{app.title} - ReDoc")

    app = FastAPI(
        title="splitserve gateway",
        version=__version__,
        description="Decode edge-compressed features once; run classification, detection, segmentation "
                    "and any installed task plugin on them.",
        lifespan=lifespan,
        openapi_url=None, docs_url=None, redoc_url=None,  # served by the routes above
    )
    app.include_router(router)
    _install_error_handlers(app)
    app.add_middleware(HeadLimit, limit=config.max_header_bytes)  # inside record_inference: 431s are counted

    @app.middleware("http")
    async def record_inference(request: Request, call_next):
        """Request metrics in one place: per task and HTTP status, and end-to-end latency."""
        if not request.url.path.endswith("/infer"):
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

    app.state.executor = executor
    app.state.config = config
    return app


def _install_error_handlers(app: FastAPI) -> None:
    """Every error a user can fix is a 4xx with ``{"detail": reason}``; the server keeps serving.
    Failures on the server are JSON too (500, or 503 + Retry-After when retrying helps)."""

    def error(status: int, detail: str, headers: dict[str, str] | None = None) -> JSONResponse:
        return JSONResponse({"detail": detail}, status_code=status, headers=headers)

    @app.exception_handler(FingerprintMismatch)
    async def other_encoder(request: Request, e: FingerprintMismatch):
        return error(409, str(e))

    @app.exception_handler(SplitserveError)  # PayloadError, PluginError (unknown task), image errors
    async def bad_request(request: Request, e: SplitserveError):
        return error(400, str(e))

    @app.exception_handler(Unavailable)  # queue full; on Ray: a task replica lost or not ready
    async def busy(request: Request, e: Unavailable):
        return error(503, str(e), {"Retry-After": str(e.retry_after)})

    @app.exception_handler(TaskFailed)
    async def task_failed(request: Request, e: TaskFailed):
        return error(500, str(e))

    @app.exception_handler(MemoryError)
    async def out_of_memory(request: Request, e: MemoryError):
        return error(500, "the server ran out of memory on this request; it restarts")

    @app.exception_handler(Exception)  # anything else: logged by the server, JSON for the client
    async def internal(request: Request, e: Exception):
        return error(500, "internal server error (logged)")


def factory() -> FastAPI:
    """Entry for ``uvicorn --factory`` / worker processes: configuration from the environment."""
    return create_app(ServerConfig.from_env())
