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
    api_key: str | None = Field(None, description="require this key in the X-API-Key header")
    warmup: bool = True
    log_level: str = "info"

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
