"""HTTP client for the gateway (httpx), sync and async, with the same methods.

>>> from splitserve.client import Client
>>> from splitserve.edge import EdgeEncoder
>>> enc = EdgeEncoder.from_bundle("bundle/")
>>> with Client("http://127.0.0.1:8000") as c:
...     c.check_encoder(enc.fingerprint)
...     answer = c.infer(enc.encode("cat.jpg").data, tasks="cls,det")
"""

from __future__ import annotations

from typing import Any

import httpx

from .errors import SplitserveError

PAYLOAD_CONTENT_TYPE = "application/x-splitserve"
_IMAGE_TYPES = {b"\xff\xd8\xff": "image/jpeg", b"\x89PNG": "image/png", b"RIFF": "image/webp"}


class ServerError(SplitserveError):
    """The gateway answered with an error status; ``status`` and ``detail`` say why."""

    def __init__(self, status: int, detail: str, retry_after: float | None = None):
        super().__init__(f"server answered {status}: {detail}")
        self.status, self.detail, self.retry_after = status, detail, retry_after


def image_content_type(data: bytes) -> str:
    """Content type of encoded image bytes, from their magic number."""
    for magic, ctype in _IMAGE_TYPES.items():
        if data.startswith(magic):
            return ctype
    raise SplitserveError("not a JPEG, PNG or WebP image")


def _tasks(tasks: str | list[str] | None) -> dict[str, str]:
    if tasks is None:
        return {}
    return {"tasks": tasks if isinstance(tasks, str) else ",".join(tasks)}


def _unwrap(response: httpx.Response) -> Any:
    if response.is_success:
        return response.json()
    try:
        detail = response.json().get("detail", response.text)
    except ValueError:
        detail = response.text
    retry = response.headers.get("retry-after")
    raise ServerError(response.status_code, str(detail), float(retry) if retry else None)


def _mismatch(server: str, local: str) -> SplitserveError:
    return SplitserveError(f"server encoder fingerprint {server[:16]}… differs from the local bundle's "
                           f"{local[:16]}…; encode with the bundle the server serves")


class _Base:
    def __init__(self, url: str = "http://127.0.0.1:8000", *, api_key: str | None = None, timeout: float = 60.0):
        self.url = url.rstrip("/")
        self._headers = {"X-API-Key": api_key} if api_key else {}
        self._timeout = timeout


class Client(_Base):
    """Synchronous client. Use as a context manager to reuse one connection pool."""

    def __init__(self, url: str = "http://127.0.0.1:8000", **kw):
        super().__init__(url, **kw)
        self._http = httpx.Client(base_url=self.url, headers=self._headers, timeout=self._timeout)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self) -> None:
        self._http.close()

    def _request(self, method: str, path: str, **kw) -> Any:
        try:
            return _unwrap(self._http.request(method, path, **kw))
        except httpx.TransportError as e:
            raise SplitserveError(f"cannot reach {self.url}: {e}") from None

    def infer(self, payload: bytes, tasks: str | list[str] | None = None) -> dict:
        """POST an edge-encoded payload; returns the JSON answer (one result per image)."""
        return self._request("POST", "/infer", params=_tasks(tasks), content=payload,
                             headers={"Content-Type": PAYLOAD_CONTENT_TYPE})

    def infer_image(self, image: bytes, tasks: str | list[str] | None = None) -> dict:
        """Full offloading: POST a JPEG/PNG/WebP and let the server encode it."""
        return self._request("POST", "/infer", params=_tasks(tasks), content=image,
                             headers={"Content-Type": image_content_type(image)})

    def encoder(self) -> dict:
        return self._request("GET", "/v1/encoder")

    def tasks(self) -> list[dict]:
        return self._request("GET", "/v1/tasks")

    def ready(self) -> bool:
        try:
            return self._http.get("/readyz").status_code == 200
        except httpx.TransportError:
            return False

    def check_encoder(self, fingerprint: str) -> None:
        """Raise unless the server decodes with the same encoder + prior as ``fingerprint``."""
        server = self.encoder()["fingerprint"]
        if server != fingerprint:
            raise _mismatch(server, fingerprint)


class AsyncClient(_Base):
    """Asynchronous client with the same methods as :class:`Client`."""

    def __init__(self, url: str = "http://127.0.0.1:8000", **kw):
        super().__init__(url, **kw)
        self._http = httpx.AsyncClient(base_url=self.url, headers=self._headers, timeout=self._timeout)

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _request(self, method: str, path: str, **kw) -> Any:
        try:
            return _unwrap(await self._http.request(method, path, **kw))
        except httpx.TransportError as e:
            raise SplitserveError(f"cannot reach {self.url}: {e}") from None

    async def infer(self, payload: bytes, tasks: str | list[str] | None = None) -> dict:
        return await self._request("POST", "/infer", params=_tasks(tasks), content=payload,
                                   headers={"Content-Type": PAYLOAD_CONTENT_TYPE})

    async def infer_image(self, image: bytes, tasks: str | list[str] | None = None) -> dict:
        return await self._request("POST", "/infer", params=_tasks(tasks), content=image,
                                   headers={"Content-Type": image_content_type(image)})

    async def encoder(self) -> dict:
        return await self._request("GET", "/v1/encoder")

    async def tasks(self) -> list[dict]:
        return await self._request("GET", "/v1/tasks")

    async def ready(self) -> bool:
        try:
            return (await self._http.get("/readyz")).status_code == 200
        except httpx.TransportError:
            return False

    async def check_encoder(self, fingerprint: str) -> None:
        server = (await self.encoder())["fingerprint"]
        if server != fingerprint:
            raise _mismatch(server, fingerprint)
