"""The proxy route's own HTTP/1.1 connection handler; every other request goes to aiohttp.

On the bench machine aiohttp's server machinery (request and response objects, router,
middleware chain, payload streams) cost about 100 us of CPU per request: more than
authenticating, admitting, metering and logging together. The extension's traffic has
one shape: keep-alive HTTP/1.1, a body with a Content-Length, to /api/openrouter/.
This module serves that shape, and only that shape, itself.

Heads are parsed by llhttp (through `httptools`), the parser aiohttp itself is built on,
and the fields it reads are then held to a narrow whitelist (`heads.py`). Any other
request is handed to aiohttp's own connection handler with the connection's bytes
untouched, and the connection stays with aiohttp from then on: another route, HTTP/1.0,
HEAD, chunked or compressed bodies, Expect, Upgrade, a missing or repeated Host, more
than 128 headers, a head not yet complete in the first read, a path aiohttp might
normalize, a byte that is not plain ASCII, anything llhttp refuses. So aiohttp keeps
every refusal of malformed or unusual input (in the gateway's envelope), its header
timeout and its size limits; the short path only ever sees well-formed requests.

A request is served as soon as its head is here: the caller is checked before the body
is read, and a refusal goes out at once. A body the gateway never read is discarded for
a moment after the answer (so that the client, still sending, reads the answer rather
than a reset) and the connection then closes. Both paths run the same `proxy()` and end
with the same log line and metrics.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Protocol

from aiohttp import web
from multidict import CIMultiDict

from gateway.common.context import IN_FLIGHT, RequestContext
from gateway.config import CONFIG
from gateway.errors import GatewayError, RequestTimeout, render_error
from gateway.platform.aiohttp_internals import tcp_keepalive, tcp_nodelay
from gateway.platform.metrics import TALLY
from gateway.proxy.forwarding import PREFIX
from gateway.proxy.route import ProxyRequest, proxy
from gateway.serve.connection_sink import ConnectionSink, status_phrase
from gateway.serve.heads import RequestHead, parse_head
from gateway.serve.middleware import CLIENT_CLOSED_REQUEST, RequestRecord, refusal, unexpected_error

ROUTE = PREFIX + "{path}"
# Bytes held beyond the body the request is reading (pipelined requests, or a body not
# asked for yet); past this, reading pauses.
MAX_BUFFERED_BYTES = 256 * 1024
# How long a body the gateway will not read is taken and dropped after the answer.
LINGER_SECONDS = 2.0


class ProxyConnection(asyncio.Protocol):
    """One client connection: proxy requests served here, the rest handed to aiohttp."""

    def __init__(self, server: ConnectionOwner) -> None:
        self._server = server
        self._app = server.app
        # Looked up once per connection, not once per request.
        self._in_flight, self._tally = server.app[IN_FLIGHT], server.app[TALLY]
        config = server.app[CONFIG]
        self._max_body_bytes = config.max_body_bytes
        self._body_timeout_seconds = config.body_timeout_seconds
        self._keepalive_seconds = server.keepalive_seconds
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.Transport | None = None
        # Bytes read and not yet taken: a head, the body of the request being served,
        # pipelined requests. A bytearray only while they arrive in pieces.
        self._buffer: bytes | bytearray = b""
        self._body_length = 0  # of the request being served, until it is taken
        self._body_taken = True
        self._body_waiter: asyncio.Future[None] | None = None
        self._task: asyncio.Task[None] | None = None
        self._ctx: RequestContext | None = None  # of the request being served
        self._idle_timer: asyncio.TimerHandle | None = None
        self._idle_since: float | None = None  # None while a request is read or served
        self._drain_waiter: asyncio.Future[None] | None = None
        self._writing_paused = False
        self._reading_paused = False
        self._discarding = False  # after refusing a request whose body never came whole
        self._closed = False

    # --- asyncio.Protocol ---------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]
        tcp_keepalive(self._transport)  # type: ignore[arg-type]
        tcp_nodelay(self._transport, True)  # type: ignore[arg-type]
        self._server.native_connections.add(self)
        self._became_idle()

    def data_received(self, data: bytes) -> None:
        if self._discarding:
            return
        if not self._buffer:
            self._buffer = data  # most requests arrive whole, in one read: no copy
        else:
            if isinstance(self._buffer, bytes):
                self._buffer = bytearray(self._buffer)
            self._buffer += data
        if self._task is None:
            self._next_request()
        elif self._body_waiter is not None:
            if len(self._buffer) >= self._body_length and not self._body_waiter.done():
                self._body_waiter.set_result(None)
        elif len(self._buffer) > MAX_BUFFERED_BYTES:
            # A body nobody asked for yet (the caller is being checked), or pipelined
            # requests: hold no more than this until it is wanted.
            self._pause_reading()

    def eof_received(self) -> bool:
        # As aiohttp: a client that stops sending has gone; the transport closes, and the
        # request in flight is cancelled with it.
        return False

    def connection_lost(self, exc: BaseException | None) -> None:
        self._closed = True
        self._server.native_connections.discard(self)
        self._stop_idle_timer()
        if self._drain_waiter is not None and not self._drain_waiter.done():
            self._drain_waiter.set_exception(ConnectionResetError("the client went away"))
        if self._task is not None and not self._task.done():
            # As aiohttp with handler_cancellation: the request's work stops with the client.
            self._task.cancel()

    def pause_writing(self) -> None:
        self._writing_paused = True

    def resume_writing(self) -> None:
        self._writing_paused = False
        if self._drain_waiter is not None and not self._drain_waiter.done():
            self._drain_waiter.set_result(None)

    def _pause_reading(self) -> None:
        if not self._reading_paused and self._transport is not None:
            self._reading_paused = True
            self._transport.pause_reading()

    def _resume_reading(self) -> None:
        if self._reading_paused and self._transport is not None:
            self._reading_paused = False
            self._transport.resume_reading()

    # --- writing --------------------------------------------------------------------------

    async def send(self, data: bytes) -> None:
        """Write, then wait while the client reads slower than the upstream sends."""
        if self._closed or self._transport is None or self._transport.is_closing():
            raise ConnectionResetError("the client went away")
        self._transport.write(data)
        if self._writing_paused:
            self._drain_waiter = self._loop.create_future()
            await self._drain_waiter

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()

    # --- requests -------------------------------------------------------------------------

    def _next_request(self) -> None:
        """Serve the next buffered request once its head is whole, or hand the connection over."""
        self._idle_since = None
        end = self._buffer.find(b"\r\n\r\n")
        if end == -1:
            if self._buffer:
                # Part of a head: aiohttp waits for the rest, under its header timeout.
                self._hand_over()
            else:
                self._became_idle()
            return
        body_at = end + 4
        head = parse_head(self._buffer[:body_at], self._max_body_bytes)
        if head is None:
            self._hand_over()
            return
        self._buffer = self._buffer[body_at:]
        self._body_length, self._body_taken = head.content_length, False
        self._task = self._loop.create_task(self._serve(head))

    def _hand_over(self) -> None:
        """From here on aiohttp serves this connection, starting with the buffered bytes."""
        transport = self._transport
        assert transport is not None
        self._server.native_connections.discard(self)
        self._stop_idle_timer()
        handler = self._server.aiohttp_handler()
        transport.set_protocol(handler)
        handler.connection_made(transport)
        buffered, self._buffer = self._buffer, b""
        # The bytes go in once aiohttp's handler waits for a request (its task starts on
        # the next turn of the loop), so that its header timeout covers a partial head;
        # until then nothing else may be read.
        if not self._reading_paused:
            transport.pause_reading()
        self._loop.call_soon(_deliver, transport, handler, bytes(buffered))

    async def _read_body(self) -> bytes:
        """The request's body, once it has all arrived (408 past the body deadline)."""
        if len(self._buffer) < self._body_length:
            waiter = self._body_waiter = self._loop.create_future()
            self._resume_reading()
            started = self._loop.time()
            try:
                async with asyncio.timeout(self._body_timeout_seconds):
                    await waiter
            except TimeoutError:
                raise RequestTimeout("The request body did not arrive in time.") from None
            finally:
                self._body_waiter = None
                if self._ctx is not None:
                    # The client's time, not the gateway's: not in gateway_overhead_seconds.
                    self._ctx.body_wait_seconds += self._loop.time() - started
        length = self._body_length
        body = bytes(self._buffer[:length])
        self._buffer = self._buffer[length:]
        self._body_length, self._body_taken = 0, True
        return body

    def _skip_unread_body(self) -> bool:
        """Drop the body of a request answered without it; False if it is not all here."""
        if self._body_taken:
            return True
        if len(self._buffer) < self._body_length:
            return False
        self._buffer = self._buffer[self._body_length :]
        self._body_length, self._body_taken = 0, True
        return True

    async def _serve(self, head: RequestHead) -> None:
        """Serve one request as the middleware and the route would, then the next one."""
        sink = ConnectionSink(self, head.close)
        try:
            with RequestRecord(self._in_flight, self._tally, ROUTE, head.method) as record:
                record.status = await self._respond(head, record.ctx, sink)
        finally:
            self._task = None
        if not sink.ended or self._closed:
            self.close()
            return
        if not self._skip_unread_body():
            self._linger()
            return
        if sink.closes:
            self.close()
            return
        self._resume_reading()
        self._next_request()

    async def _respond(self, head: RequestHead, ctx: RequestContext, sink: ConnectionSink) -> int:
        """Run the proxy; answer a refusal with the envelope. Returns the status sent."""
        self._ctx = ctx
        request = ProxyRequest(
            head.method, head.raw_path, head.query_string, head.headers, self._read_body
        )
        try:
            await proxy(self._app, ctx, request, sink)
            return CLIENT_CLOSED_REQUEST if ctx.client_gone else sink.status
        except GatewayError as exc:
            error = refusal(exc, ctx)
        except Exception:
            error = unexpected_error(ctx)
        if sink.started:
            self.close()  # part of a response went out: nothing more can be said
            return error.status
        if error.close_connection or len(self._buffer) < self._body_length:
            # The connection ends after this answer (lingering if the body still comes).
            sink.closes = True
        await self._send_error(error, ctx, sink)
        return error.status

    async def _send_error(
        self, error: GatewayError, ctx: RequestContext, sink: ConnectionSink
    ) -> None:
        rendered = render_error(error, ctx.request_id)
        headers: CIMultiDict[str] = CIMultiDict(rendered.headers)
        await sink.start(
            rendered.status, status_phrase(rendered.status), headers, len(rendered.body)
        )
        with contextlib.suppress(ConnectionError):
            await sink.write(rendered.body)
            await sink.end()

    def _linger(self) -> None:
        """Answered without reading the body, which is still arriving: close soon.

        Closing at once, with the client's bytes unread, would make the kernel reset the
        connection, and a client still sending could lose the answer with it. So the
        rest is read and dropped for a moment (held nowhere), then the connection closes.
        """
        self._discarding = True
        self._buffer = b""
        self._stop_idle_timer()
        self._resume_reading()
        transport = self._transport
        if transport is not None and transport.can_write_eof():
            transport.write_eof()  # the answer is all there is: the client may stop now
        self._loop.call_later(LINGER_SECONDS, self.close)

    # --- timers ---------------------------------------------------------------------------

    def _became_idle(self) -> None:
        """Close the connection if nothing arrives for the keep-alive time from now.

        One timer for the connection's life, moved on rather than re-armed per request.
        """
        self._idle_since = self._loop.time()
        if self._idle_timer is None and not self._closed:
            self._idle_timer = self._loop.call_at(
                self._idle_since + self._keepalive_seconds, self._close_if_idle
            )

    def _close_if_idle(self) -> None:
        self._idle_timer = None
        if self._closed:
            return
        if self._idle_since is None:  # serving: look again a whole keep-alive time later
            due = self._loop.time() + self._keepalive_seconds
        else:
            due = self._idle_since + self._keepalive_seconds
            if self._loop.time() >= due:
                self.close()
                return
        self._idle_timer = self._loop.call_at(due, self._close_if_idle)

    def _stop_idle_timer(self) -> None:
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None


def _deliver(transport: asyncio.Transport, handler: web.RequestHandler, data: bytes) -> None:
    if transport.is_closing():
        return
    if data:
        handler.data_received(data)
    transport.resume_reading()


class ConnectionOwner(Protocol):
    """The aiohttp server that creates these connections (see `runner.py`)."""

    app: web.Application
    native_connections: set[ProxyConnection]

    @property
    def keepalive_seconds(self) -> float:
        """How long an idle keep-alive connection stays open."""

    def aiohttp_handler(self) -> web.RequestHandler:
        """A new aiohttp connection handler, to take a connection over."""
