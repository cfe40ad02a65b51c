"""The aiohttp runner the gateway serves with, so that even unreadable requests get the envelope.

aiohttp answers requests it cannot parse (a garbled request line, a header over the size
limit, invalid bytes) itself, below every middleware, in plain text. The Kilo Code
extension and operators expect the gateway's one JSON error envelope for every refusal,
so the runner's connection handler renders those answers as envelopes too.
"""

from __future__ import annotations

import asyncio
import signal
from typing import Any

import structlog
from aiohttp import web

from gateway.common.context import IN_FLIGHT
from gateway.config import CONFIG
from gateway.errors import RequestTimeout, error_for_status, render_error
from gateway.platform.aiohttp_internals import (
    ServerClassRunner,
    handler_loop,
    handler_server,
    new_handler,
    requests_read,
    server_setting,
    waiting_for_request,
)
from gateway.serve.connection_sink import encode_head, status_phrase
from gateway.serve.fastpath import LINGER_SECONDS, ProxyConnection
from gateway.serve.middleware import error_response

log = structlog.get_logger("gateway.runner")

# aiohttp server settings the gateway relies on; `serve` and the tests both use them.
RUNNER_KWARGS: dict[str, Any] = {
    # A client that goes away cancels its handler, and so its upstream request.
    "handler_cancellation": True,
    # The middleware writes one structured line per request instead.
    "access_log": None,
    # Idle keep-alive connections close after this long (aiohttp's default is an hour);
    # the proxy route's own handler keeps the same time.
    "keepalive_timeout": 75.0,
    # A body left unread after a refusal is read and dropped this long before the
    # connection closes (aiohttp's default is 10 s); the proxy route's handler does
    # the same.
    "lingering_time": LINGER_SECONDS,
}


class _EnvelopeRequestHandler(web.RequestHandler):
    """aiohttp's connection handler, answering its own errors in the gateway's envelope.

    It also gives each request `header_timeout_seconds` from its first byte to complete
    its request line and headers; aiohttp itself would wait for keepalive_timeout (an
    hour), so clients trickling headers could hold connections (and file descriptors).
    """

    _header_deadline: asyncio.TimerHandle | None = None

    def data_received(self, data: bytes) -> None:
        requests_before = requests_read(self)
        super().data_received(data)
        if requests_read(self) > requests_before:
            self._disarm_header_deadline()  # a whole request line and headers arrived
        elif self._header_deadline is None and waiting_for_request(self):
            timeout = getattr(handler_server(self), "header_timeout_seconds", None)
            if timeout:
                self._header_deadline = handler_loop(self).call_later(
                    timeout, self._headers_too_slow
                )

    def connection_lost(self, exc: BaseException | None) -> None:
        self._disarm_header_deadline()
        super().connection_lost(exc)

    def _disarm_header_deadline(self) -> None:
        if self._header_deadline is not None:
            self._header_deadline.cancel()
            self._header_deadline = None

    def _headers_too_slow(self) -> None:
        self._header_deadline = None
        if not waiting_for_request(self) or self.transport is None:
            return
        log.info("unreadable_request", status=408, error="header_timeout")
        rendered = render_error(RequestTimeout("The request's headers did not arrive in time."))
        headers = {
            **rendered.headers,
            "Content-Length": str(len(rendered.body)),
            "Connection": "close",
        }
        head = encode_head(rendered.status, status_phrase(rendered.status), headers)
        self.transport.write(head + rendered.body)
        self.force_close()  # closes the transport (and forgets it) once the 408 is flushed

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if request.writer.output_size > 0:
            # Part of a response went out already: nothing can be said any more.
            raise ConnectionError("response already started; closing the connection")
        # One line, no traceback: hostile clients must not be able to flood the logs.
        log.info("unreadable_request", status=status, error=type(exc).__name__ if exc else None)
        response = error_response(error_for_status(status))
        response.force_close()
        return response


class _GatewayServer(web.Server):
    """aiohttp's server, whose connections start with the proxy route's own handler.

    That handler (`serve/fastpath.py`) serves well-formed proxy requests itself and hands
    every other connection to aiohttp's handler, which answers its own errors in the
    envelope.
    """

    app: web.Application
    header_timeout_seconds: float
    native_connections: set[ProxyConnection]

    @property
    def keepalive_seconds(self) -> float:
        default = RUNNER_KWARGS["keepalive_timeout"]
        return float(server_setting(self, "keepalive_timeout", default))

    def __call__(self) -> ProxyConnection:  # type: ignore[override]
        return ProxyConnection(self)

    def aiohttp_handler(self) -> web.RequestHandler:
        return new_handler(self, _EnvelopeRequestHandler)

    async def shutdown(self, timeout: float | None = None) -> None:  # noqa: ASYNC109 (aiohttp's)
        for connection in list(self.native_connections):
            connection.close()
        await super().shutdown(timeout)


class GatewayRunner(ServerClassRunner):
    """An AppRunner whose connections answer even unparseable requests with the envelope."""

    server_class = _GatewayServer

    def adopt(self, server: web.Server) -> None:
        assert isinstance(server, _GatewayServer)
        server.app = self.app
        server.header_timeout_seconds = self.app[CONFIG].header_timeout_seconds
        server.native_connections = set()


def runner_for(app: web.Application, **kwargs: Any) -> GatewayRunner:
    """The runner `serve` and the tests both use."""
    return GatewayRunner(app, **{**RUNNER_KWARGS, **kwargs})


async def serve_until_signalled(
    app: web.Application, host: str, port: int, *, reuse_port: bool, shutdown_timeout: float
) -> None:
    """Serve until SIGTERM or SIGINT; then stop accepting, let requests finish, clean up.

    In-flight requests (streams included) get `shutdown_timeout` seconds in all; those
    still running then are cancelled, which records their charges, before the
    application's resources close (the usage writer flushes last).
    """
    runner = runner_for(app, shutdown_timeout=shutdown_timeout)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port, reuse_port=reuse_port, backlog=1024)
        await site.start()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        await stop.wait()
        log.info("shutting_down", drain_timeout_seconds=shutdown_timeout)
        for running_site in list(runner.sites):
            await running_site.stop()  # no new connections from here on
        await drain(app[IN_FLIGHT], shutdown_timeout)
    finally:
        await runner.cleanup()


async def drain(in_flight: set[asyncio.Task[Any]], timeout_seconds: float) -> None:
    """Wait for in-flight requests up to the timeout, then cancel the rest."""
    if in_flight:
        await asyncio.wait(set(in_flight), timeout=timeout_seconds)
    leftovers = set(in_flight)
    for task in leftovers:
        task.cancel()
    if leftovers:
        log.warning("drain_timeout_cancelled_requests", requests=len(leftovers))
        await asyncio.wait(leftovers, timeout=1.0)
