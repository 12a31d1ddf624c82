"""The HTTP server of ``platform serve``: uvicorn (h11) with the limits a slow or numerous client meets.

uvicorn bounds an idle keep-alive connection but not a request head still arriving, so a client
sending its head at one byte per second holds a connection for as long as it likes (slowloris).
:class:`GuardedH11Protocol` gives every head a deadline (408, connection closed), stamps the head's
first byte on the request so the app can bound the whole request (``--request-timeout-s``), and
answers requests on connections beyond ``--max-connections`` with 503 + Retry-After instead of the app.
"""

from __future__ import annotations

import asyncio
import json
import logging
from functools import partial

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from .app import REQUEST_STARTED
from .config import ServerConfig

log = logging.getLogger("splitserve.gateway")
WORKER_START_S = 120  # how long a worker process may take to load and warm up its models


def _raw_response(status: str, detail: str, extra: str = "") -> bytes:
    body = json.dumps({"detail": detail}).encode()
    return (f"HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n{extra}"
            f"connection: close\r\n\r\n").encode() + body


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a deadline on each request head and a bound on connections."""

    def __init__(self, *args, head_timeout_s: float, max_connections: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.head_timeout_s, self.max_connections = head_timeout_s, max_connections
        self._head_timer: asyncio.TimerHandle | None = None
        self._head_started = 0.0
        self._app = self.app

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        if len(self.connections) > self.max_connections:  # beyond the bound: its requests get 503
            self.app = partial(_busy, len(self.connections) - 1)
        self._arm()

    def _arm(self) -> None:
        self._head_started = self.loop.time()
        self._head_timer = self.loop.call_later(self.head_timeout_s, self._head_timeout)

    def _disarm(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def data_received(self, data: bytes) -> None:
        if self._head_timer is None and self.conn.their_state is h11.IDLE:
            self._arm()  # the first byte of the next request on a kept-alive connection
        before = self.scope
        super().data_received(data)
        if self.scope is not before:  # a complete head: its deadline is met, the request's starts
            self.scope[REQUEST_STARTED] = self._head_started  # type: ignore[literal-required]
            self._disarm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _head_timeout(self) -> None:
        self._head_timer = None
        if self.transport.is_closing():
            return
        log.warning("request head not complete within %g s: closing the connection", self.head_timeout_s)
        self.transport.write(_raw_response("408 Request Timeout",
                                           f"request head not complete within {self.head_timeout_s:g} s"))
        self.transport.close()


async def _busy(open_connections: int, scope, receive, send) -> None:
    """The answer to a request on a connection beyond ``--max-connections``."""
    from starlette.responses import JSONResponse

    response = JSONResponse({"detail": f"server busy: {open_connections} connections open, retry in 1 s"},
                            status_code=503, headers={"Retry-After": "1", "Connection": "close"})
    await response(scope, receive, send)


def serve(config: ServerConfig, app=None) -> None:
    """Run the gateway (default: ``create_app(config)``; or ``app``, e.g. over another executor)
    until SIGTERM/SIGINT, in ``config.workers`` processes."""
    import uvicorn

    from .app import create_app

    # h11 (not httptools): its max_incomplete_event_size bounds the memory of a head still arriving
    # (httptools has no such limit); the app refuses any complete head above the limit with 431, so
    # h11's bound sits above it and never answers first with its bare 400.
    options = dict(http=partial(GuardedH11Protocol, head_timeout_s=config.head_timeout_s,
                                max_connections=config.max_connections),
                   timeout_keep_alive=config.keep_alive_s, timeout_graceful_shutdown=config.shutdown_timeout_s,
                   h11_max_incomplete_event_size=4 * config.max_header_bytes,
                   host=config.host, port=config.port, log_level=config.log_level)
    if config.workers == 1 or app is not None:
        app = app or create_app(config)  # load + validate now: a bad bundle fails here, in one line
        uvicorn.run(app, **options)
    else:
        import os

        from ..bundle import read_manifest

        read_manifest(config.bundle)  # a bad bundle fails here, in one line, before any worker starts
        os.environ.update(config.to_env())  # worker processes read their config from the environment
        # a worker loading its models holds the GIL for seconds: uvicorn's 5 s health check would kill
        # it mid-start, again and again (no worker ever became ready here with the default)
        uvicorn.run("splitserve.gateway.app:factory", factory=True, workers=config.workers,
                    timeout_worker_healthcheck=WORKER_START_S, **options)
