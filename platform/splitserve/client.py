"""HTTP client for the gateway (httpx), sync and async, with the same methods.

>>> from splitserve.client import Client
>>> from splitserve.edge import EdgeEncoder
>>> enc = EdgeEncoder.from_bundle("bundle/")
>>> with Client("http://127.0.0.1:8000") as c:
...     c.check_encoder(enc.fingerprint)
...     answer = c.infer(enc.encode("cat.jpg").data, tasks="cls,det")
...     answer = c.infer(enc.encode("cat.jpg", max_bytes=300).data)   # the highest rate within 300 bytes

Any number of images, split into requests the server accepts and sent concurrently:

>>> async with AsyncClient(url) as c:
...     answer = await c.infer_all(images, lambda chunk: enc.encode(chunk).data, tasks="seg")
>>> masks = full_masks(answer)          # segmentation at the original images' sizes
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import httpx

from .errors import SplitserveError

PAYLOAD_CONTENT_TYPE = "application/x-splitserve"
_IMAGE_TYPES = {b"\xff\xd8\xff": "image/jpeg", b"\x89PNG": "image/png", b"RIFF": "image/webp"}
# A gateway that does not state its image limit (``max_images`` in GET /v1/encoder; every gateway
# of this version does) is assumed to take `platform serve`'s default --max-batch.
DEFAULT_MAX_IMAGES = 16
T = TypeVar("T")


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


def stated_max_images(encoder_info: dict) -> int | None:
    """The most images one ``/infer`` request may carry, as ``GET /v1/encoder`` states it (None: not stated)."""
    value = encoder_info.get("max_images")
    return int(value) if isinstance(value, int) and value >= 1 else None


def merge_answers(answers: Sequence[dict]) -> dict:
    """One answer for the images of several requests, in their order; ``index`` counts across them."""
    results = [r for a in answers for r in a["results"]]
    return {**answers[0], "bytes_received": sum(a["bytes_received"] for a in answers), "requests": len(answers),
            "results": [{**r, "index": i} for i, r in enumerate(results)]}


def full_masks(answer: dict) -> list[Any]:
    """Each image's segmentation at its original size, (height, width) uint8 class indices, or None
    where the answer has no segmentation. Needs the segmentation plugin's schema module (no torch)."""
    from splitserve_tasks.segmentation.schema import full_mask

    return [full_mask(r["tasks"]["segmentation"]) if r["tasks"].get("segmentation") else None
            for r in answer["results"]]


def check_fingerprint(encoder_info: dict, fingerprint: str) -> dict:
    """Raise unless ``GET /v1/encoder`` (``encoder_info``) names the encoder + prior of ``fingerprint``."""
    server = encoder_info["fingerprint"]
    if server != fingerprint:
        raise SplitserveError(f"server encoder fingerprint {server[:16]}… differs from the local bundle's "
                              f"{fingerprint[:16]}…; encode with the bundle the server serves")
    return encoder_info


class _Base:
    full_masks = staticmethod(full_masks)

    def __init__(self, url: str = "http://127.0.0.1:8000", *, api_key: str | None = None, timeout: float = 60.0):
        self.url = url.rstrip("/")
        self._api_key = api_key
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

    def check_encoder(self, fingerprint: str) -> dict:
        """Raise unless the server decodes with the same encoder + prior as ``fingerprint``; returns
        ``GET /v1/encoder`` (its ``max_images``, when stated, bounds one request)."""
        return check_fingerprint(self.encoder(), fingerprint)

    def infer_all(self, items: Sequence[T], encode: Callable[[Sequence[T]], bytes],
                  tasks: str | list[str] | None = None, **kw) -> dict:
        """:meth:`AsyncClient.infer_all` from synchronous code (its own event loop and connections)."""
        async def run() -> dict:
            async with AsyncClient(self.url, api_key=self._api_key, timeout=self._timeout) as client:
                return await client.infer_all(items, encode, tasks, **kw)

        return asyncio.run(run())


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

    async def check_encoder(self, fingerprint: str) -> dict:
        return check_fingerprint(await self.encoder(), fingerprint)

    async def infer_all(self, items: Sequence[T], encode: Callable[[Sequence[T]], bytes],
                        tasks: str | list[str] | None = None, *, max_images: int | None = None,
                        concurrency: int = 4, images: bool = False) -> dict:
        """Answer any number of images: ``encode(chunk)`` makes the body of one request from at most
        the server's image limit (``max_images``; default: what ``GET /v1/encoder`` states, else
        ``DEFAULT_MAX_IMAGES``), chunks
        are encoded one at a time in a worker thread and up to ``concurrency`` requests are in
        flight. ``images=True``: each body is one image file (full offloading, one per request).
        Returns one answer (:func:`merge_answers`) with the results in the order of ``items``."""
        if not items:
            raise SplitserveError("no images to send")
        if images:
            max_images = 1
        limit = max_images or stated_max_images(await self.encoder()) or DEFAULT_MAX_IMAGES
        post = self.infer_image if images else self.infer
        slots = asyncio.Semaphore(max(1, concurrency))
        loop = asyncio.get_running_loop()

        encoder = ThreadPoolExecutor(max_workers=1)  # one encode at a time: it uses every core

        async def answer(chunk: Sequence[T]) -> dict:
            async with slots:
                return await post(await loop.run_in_executor(encoder, encode, chunk), tasks)

        pending = [asyncio.ensure_future(answer(items[i:i + limit])) for i in range(0, len(items), limit)]
        try:
            answers = await asyncio.gather(*pending)
        except BaseException:
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
            raise
        finally:
            encoder.shutdown(wait=True, cancel_futures=True)
        return merge_answers(answers)
