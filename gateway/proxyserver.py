"""The proxy route's own HTTP/1.1 connection handler; every other request goes to aiohttp.

On the bench machine aiohttp's server machinery (request and response objects, router,
middleware chain, payload streams) cost about 100 us of CPU per request: more than
authenticating, admitting, metering and logging together. The extension's traffic has
one shape: keep-alive HTTP/1.1, a body with a Content-Length, to /api/openrouter/.
This module serves that shape, and only that shape, itself.

Any other request is handed to aiohttp's own connection handler with the connection's
bytes untouched, and the connection stays with aiohttp from then on: another route,
HTTP/1.0, HEAD, chunked or compressed bodies, Expect, Upgrade, a head not yet complete
in the first read, a path aiohttp might normalize, a byte that is not plain ASCII. So
aiohttp keeps every refusal of malformed or unusual input (in the gateway's envelope),
its header timeout and its size limits; the short path only ever sees well-formed
requests. Both paths run the same `proxy()` and end with the same log line and metrics.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import re
import time
from email.utils import formatdate
from http import HTTPStatus
from typing import TYPE_CHECKING, Protocol

from aiohttp import web
from aiohttp.tcp_helpers import tcp_keepalive, tcp_nodelay
from multidict import CIMultiDict, CIMultiDictProxy

from gateway.appkeys import CONFIG, IN_FLIGHT
from gateway.context import RequestContext
from gateway.errors import GatewayError
from gateway.forwarding import PREFIX, REQUEST_ID_HEADER
from gateway.middleware import CLIENT_CLOSED_REQUEST, RequestRecord, refusal, unexpected_error
from gateway.proxy import ProxyRequest, proxy
from gateway.upstream import NO_BODY_STATUSES

if TYPE_CHECKING:
    from aiohttp.web_protocol import RequestHandler

ROUTE = PREFIX + "{path}"
# A longer head goes to aiohttp, whose limits then apply (8190 bytes a line).
MAX_HEAD_BYTES = 8190
# More digits than any body the gateway accepts (and int() refuses past 4,300).
MAX_LENGTH_DIGITS = 15
# Pipelined bytes held while a request is served; past this, reading pauses.
MAX_BUFFERED_BYTES = 256 * 1024
_METHODS = frozenset({"GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
# Headers whose handling stays aiohttp's: body framing and decoding, interim responses,
# protocol switches.
_HAND_OVER_HEADERS = frozenset({"transfer-encoding", "content-encoding", "expect", "upgrade"})
_FIELD_NAME = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
# No percent-encoding, dot or empty segments: paths aiohttp might read differently.
_PLAIN_PATH = re.compile(r"/api/openrouter/[A-Za-z0-9\-_~!$&'()*+,;=:@/.]*")
_PLAIN_QUERY = re.compile(r"[!-\"$-~]*")  # visible ASCII but "#"
_FIELD_VALUE = re.compile(r"[\t -~]*")  # no control characters, ASCII only


@dataclasses.dataclass(frozen=True, slots=True)
class RequestHead:
    """A request head this module serves itself."""

    method: str
    raw_path: str
    query_string: str
    headers: CIMultiDictProxy[str]
    content_length: int
    close: bool


def parse_head(head: bytes | bytearray, max_body_bytes: int) -> RequestHead | None:
    """The request head (without its blank line) if it is one served here, else None."""
    if len(head) > MAX_HEAD_BYTES:
        return None
    try:
        lines = head.decode("ascii").split("\r\n")
    except UnicodeDecodeError:
        return None
    parts = lines[0].split(" ")
    if len(parts) != 3 or parts[2] != "HTTP/1.1" or parts[0] not in _METHODS:
        return None
    method, target = parts[0], parts[1]
    path, _, query = target.partition("?")
    if (
        not _PLAIN_PATH.fullmatch(path)
        or "//" in path
        or "/." in path
        or not _PLAIN_QUERY.fullmatch(query)
    ):
        return None
    headers: CIMultiDict[str] = CIMultiDict()
    content_length: int | None = None
    close = False
    for line in lines[1:]:
        name, colon, value = line.partition(":")
        if not colon or not _FIELD_NAME.fullmatch(name) or not _FIELD_VALUE.fullmatch(value):
            return None  # also a folded line, which starts with whitespace
        value = value.strip(" \t")
        lowered = name.lower()
        if lowered in _HAND_OVER_HEADERS:
            return None
        if lowered == "content-length":
            if content_length is not None or not value.isdigit() or len(value) > MAX_LENGTH_DIGITS:
                return None
            content_length = int(value)
        elif lowered == "connection":
            tokens = {token.strip().lower() for token in value.split(",")}
            close = close or "close" in tokens
        headers.add(name, value)
    if content_length is None:
        content_length = 0
    if content_length > max_body_bytes:
        return None  # aiohttp answers 413
    return RequestHead(method, path, query, CIMultiDictProxy(headers), content_length, close)


class _Clock:
    """The Date header's value, formatted once per second."""

    second = -1
    value = ""


def _http_date() -> str:
    now = int(time.time())
    if now != _Clock.second:
        _Clock.second, _Clock.value = now, formatdate(now, usegmt=True)
    return _Clock.value


def _encode_head(status: int, reason: str, headers: CIMultiDict[str]) -> bytes:
    lines = [f"HTTP/1.1 {status} {reason}\r\n"]
    lines.extend(f"{name}: {value}\r\n" for name, value in headers.items())
    lines.append("\r\n")
    # Upstream headers were decoded with surrogateescape: their bytes go out unchanged.
    return "".join(lines).encode("utf-8", "surrogateescape")


class _ConnectionSink:
    """A relayed response written straight to the connection."""

    def __init__(self, connection: ProxyConnection, close: bool) -> None:
        self._connection = connection
        self._close = close
        self._head = b""
        self._chunked = False
        self.status = 0
        self.started = False
        self.ended = False

    async def start(
        self, status: int, reason: str, headers: CIMultiDict[str], content_length: int | None
    ) -> None:
        """Prepare the head; it leaves with the first body bytes (or at the end)."""
        self.status = status
        if "Date" not in headers:
            headers["Date"] = _http_date()
        if status in NO_BODY_STATUSES or status < 200:
            pass
        elif content_length is not None:
            headers["Content-Length"] = str(content_length)
        else:
            headers["Transfer-Encoding"] = "chunked"
            self._chunked = True
        if self._close:
            headers["Connection"] = "close"
        self._head = _encode_head(status, reason, headers)
        self.started = True

    async def write(self, data: bytes) -> None:
        if data and self._chunked:
            data = b"%x\r\n%b\r\n" % (len(data), data)
        if self._head:
            data, self._head = self._head + data, b""
        if data:
            await self._connection.send(data)

    async def end(self) -> None:
        tail = b"0\r\n\r\n" if self._chunked else b""
        data, self._head = self._head + tail, b""
        if data:
            await self._connection.send(data)
        self.ended = True

    def abort(self) -> None:
        self._connection.close()


class ProxyConnection(asyncio.Protocol):
    """One client connection: proxy requests served here, the rest handed to aiohttp."""

    def __init__(self, server: ConnectionOwner) -> None:
        self._server = server
        self._app = server.app
        self._max_body_bytes = server.app[CONFIG].max_body_bytes
        self._keepalive_seconds = server.keepalive_seconds
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.Transport | None = None
        # Bytes read and not yet served; a bytearray only while a body arrives in pieces.
        self._buffer: bytes | bytearray = b""
        self._head: RequestHead | None = None  # read, waiting for the rest of its body
        self._body_at = 0
        self._task: asyncio.Task[None] | None = None
        self._idle_timer: asyncio.TimerHandle | None = None
        self._idle_since: float | None = None  # None while a request is read or served
        self._drain_waiter: asyncio.Future[None] | None = None
        self._writing_paused = False
        self._reading_paused = False
        self._closed = False

    # --- asyncio.Protocol ---------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]
        tcp_keepalive(self._transport)  # type: ignore[arg-type]
        tcp_nodelay(self._transport, True)  # type: ignore[arg-type]
        self._server.native_connections.add(self)
        self._became_idle()

    def data_received(self, data: bytes) -> None:
        if not self._buffer:
            self._buffer = data  # most requests arrive whole, in one read: no copy
        else:
            if isinstance(self._buffer, bytes):
                self._buffer = bytearray(self._buffer)
            self._buffer += data
        if self._task is None:
            self._next_request()
        elif len(self._buffer) > MAX_BUFFERED_BYTES and not self._reading_paused:
            self._reading_paused = True
            self._transport.pause_reading()  # type: ignore[union-attr]

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
        """Serve the next buffered request if it is whole, or hand the connection over."""
        self._idle_since = None
        if self._head is None:
            end = self._buffer.find(b"\r\n\r\n")
            if end == -1:
                if self._buffer:
                    # Part of a head: aiohttp waits for the rest, under its header timeout.
                    self._hand_over()
                else:
                    self._became_idle()
                return
            self._head = parse_head(self._buffer[:end], self._max_body_bytes)
            if self._head is None:
                self._hand_over()
                return
            self._body_at = end + 4
        body_end = self._body_at + self._head.content_length
        if len(self._buffer) < body_end:
            self._became_idle()  # the rest of the body is on its way, or the client stalls
            return
        head, body = self._head, bytes(self._buffer[self._body_at : body_end])
        self._buffer, self._head = bytes(self._buffer[body_end:]), None
        self._task = self._loop.create_task(self._serve(head, body))

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

    async def _serve(self, head: RequestHead, body: bytes) -> None:
        """Serve one request as the middleware and the route would, then the next one."""
        sink = _ConnectionSink(self, head.close)
        try:
            with RequestRecord(self._app[IN_FLIGHT], ROUTE, head.method) as record:
                record.status = await self._respond(head, body, record.ctx, sink)
        finally:
            self._task = None
        if head.close or not sink.ended or self._closed:
            self.close()
            return
        if self._reading_paused:
            self._reading_paused = False
            self._transport.resume_reading()  # type: ignore[union-attr]
        self._next_request()

    async def _respond(
        self, head: RequestHead, body: bytes, ctx: RequestContext, sink: _ConnectionSink
    ) -> int:
        """Run the proxy; answer a refusal with the envelope. Returns the status sent."""

        async def read_body() -> bytes:
            return body

        request = ProxyRequest(
            head.method, head.raw_path, head.query_string, head.headers, read_body
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
        await self._send_error(error, ctx, sink)
        return error.status

    async def _send_error(
        self, error: GatewayError, ctx: RequestContext, sink: _ConnectionSink
    ) -> None:
        body = error.body()
        headers: CIMultiDict[str] = CIMultiDict(error.headers)
        headers["Content-Type"] = "application/json"
        headers[REQUEST_ID_HEADER] = ctx.request_id
        await sink.start(error.status, _reason(error.status), headers, len(body))
        with contextlib.suppress(ConnectionError):
            await sink.write(body)
            await sink.end()

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


def _deliver(transport: asyncio.Transport, handler: RequestHandler, data: bytes) -> None:
    if transport.is_closing():
        return
    if data:
        handler.data_received(data)
    transport.resume_reading()


def _reason(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"


class ConnectionOwner(Protocol):
    """The aiohttp server that creates these connections (see `runner.py`)."""

    app: web.Application
    native_connections: set[ProxyConnection]

    @property
    def keepalive_seconds(self) -> float:
        """How long an idle keep-alive connection stays open."""

    def aiohttp_handler(self) -> RequestHandler:
        """A new aiohttp connection handler, to take a connection over."""
