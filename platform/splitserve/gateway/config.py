"""Server configuration: CLI flags override ``SPLITSERVE_*`` environment variables override defaults."""

from __future__ import annotations

import os
from typing import Any

from pydantic import BaseModel, Field

ENV_PREFIX = "SPLITSERVE_"


class ServerConfig(BaseModel):
    bundle: str | None = Field(None, description="bundle directory; None = the embedded default")
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    tasks: list[str] | None = Field(None, description="tasks to serve; None = every head in the bundle")
    max_batch: int = Field(16, ge=1, le=1024, description="images per decode batch")
    max_wait_ms: float = Field(5.0, ge=0, description="how long a batch waits to fill up")
    max_queue: int = Field(256, ge=1, description="images waiting at most; beyond that 503 + Retry-After")
    max_body_bytes: int = Field(8 * 1024 * 1024, ge=64, description="largest request body (413 above)")
    workers: int = Field(1, ge=1, description="server processes (each loads the models)")
    threads: int | None = Field(None, ge=1, description="torch intra-op threads per process")
    api_key: str | None = Field(None, description="require this key in the X-API-Key header (prefer "
                                "SPLITSERVE_API_KEY or --api-key-file: a flag is visible in /proc/PID/cmdline)")
    api_key_file: str | None = Field(None, description="read the API key from this file (e.g. a mounted secret)")
    auth_all: bool = Field(False, description="also require the key for /metrics, /v1/*, /openapi.json, /docs "
                                              "and /redoc (probes stay open)")
    docs: bool = Field(False, description="serve /docs and /redoc (their assets load from a CDN); "
                                          "/openapi.json is always served")
    max_image_side: int = Field(8192, ge=16, le=65535, description="largest original side a payload may declare, "
                                                                   "and the largest side of an uploaded image")
    max_image_pixels: int = Field(16_000_000, ge=256, description="largest uploaded image (full offloading), in pixels")
    body_timeout_s: float = Field(10.0, gt=0, description="a request body that stalls this long gets 408")
    head_timeout_s: float = Field(10.0, gt=0, description="a request head (request line + headers) must arrive "
                                                          "within this; else 408 and the connection closes")
    request_timeout_s: float = Field(60.0, gt=0, description="the whole request (head + body) must arrive within "
                                                             "this; else 408")
    max_connections: int = Field(512, ge=1, description="connections served at once; a request on one more "
                                                        "gets 503 + Retry-After")
    task_timeout_s: float = Field(30.0, gt=0, description="Ray Serve: a task deployment that has not answered "
                                                          "within this (replica lost, none ready) gives 503")
    keep_alive_s: float = Field(5.0, gt=0, description="idle keep-alive connections close after this")
    shutdown_timeout_s: float = Field(20.0, gt=0, description="on SIGTERM, wait at most this long for requests")
    max_header_bytes: int = Field(16384, ge=1024, description="largest request head (request line + headers)")
    device: str = Field("cpu", pattern=r"^(cpu|cuda|auto)$", description="where codec and heads run: cpu, cuda, auto")
    warmup: bool = True
    log_level: str = "info"

    def resolved_api_key(self) -> str | None:
        """The key from --api-key-file, else --api-key / SPLITSERVE_API_KEY."""
        if self.api_key_file:
            from pathlib import Path

            from ..errors import SplitserveError

            try:
                key = Path(self.api_key_file).read_text().strip()
            except OSError as e:
                raise SplitserveError(f"--api-key-file {self.api_key_file}: {e.strerror or e}") from None
            if not key:
                raise SplitserveError(f"--api-key-file {self.api_key_file} is empty")
            return key
        return self.api_key

    def payload_limits(self):
        """The parser's bounds, from the request limits: one request, one batch at most."""
        from splitserve_edge.payload import PayloadLimits

        return PayloadLimits(max_images=self.max_batch, max_image_side=self.max_image_side,
                             max_total_bytes=self.max_body_bytes)

    def apply_threads(self) -> None:
        """``--threads``: torch's intra-op threads in this process."""
        if self.threads:
            import torch

            torch.set_num_threads(self.threads)

    @classmethod
    def from_env(cls, **overrides: Any) -> "ServerConfig":
        """Read ``SPLITSERVE_<FIELD>`` variables, then apply non-None overrides (CLI flags)."""
        values: dict[str, Any] = {}
        for name in cls.model_fields:
            raw = os.environ.get(ENV_PREFIX + name.upper())
            if raw is not None and raw != "":
                values[name] = raw.split(",") if name == "tasks" else raw
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls.model_validate(values)

    def to_env(self) -> dict[str, str]:
        """The environment that reproduces this config in a worker process (uvicorn --workers)."""
        env = {}
        for name, value in self.model_dump().items():
            if value is None:
                continue
            env[ENV_PREFIX + name.upper()] = ",".join(value) if isinstance(value, list) else str(value)
        return env
