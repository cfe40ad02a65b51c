"""A lean HTTP/1.1 client for the one upstream: pooled keep-alive connections, bytes as they come.

Why not aiohttp's `ClientSession`: it is built for every use (cookies, redirects, proxies,
decompression, tracing, retries of any payload) and in the profile it cost about as much
CPU per request as everything else the gateway does. The gateway needs one thing: send
a request it already holds in full to one origin, and hand back the response's status,
headers and body bytes as they arrive, unchanged. This module does that and no more:

- one TCP (or TLS) connection per request in flight, kept alive and reused LIFO;
- the request goes out in one write; the response head is parsed here, the body is
  de-framed (Content-Length, chunked, or until close) and queued, with back-pressure;
- three deadlines: connecting, the response head, and silence mid-body;
- a request on a reused connection that dies before any response byte is retried once
  on a new connection, for idempotent methods only (RFC 9112 §9.3.1), as aiohttp does.

Errors the caller sees: `UpstreamUnreachable` (502) and `UpstreamTimeout` (504) before
the head, `UpstreamBroke` after it.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import socket
import ssl
import time
from collections.abc import Iterable
from typing import cast
from urllib.parse import urlsplit

import aiohappyeyeballs
from multidict import CIMultiDict, CIMultiDictProxy

from gateway.errors import UpstreamTimeout, UpstreamUnreachable

IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})
CONNECT_TIMEOUT_SECONDS = 10.0
# RFC 8305's recommended wait before racing the next address.
HAPPY_EYEBALLS_DELAY_SECONDS = 0.25
# A head longer than this is not one OpenRouter sends.
MAX_HEAD_BYTES = 64 * 1024
MAX_CHUNK_SIZE_LINE = 4096
# Stop reading from the upstream while this much of its body waits for the client.
PAUSE_AT_BYTES = 256 * 1024
# An idle connection older than this is closed rather than reused: servers drop idle
# connections after some time of their own, and a request sent into one that is
# closing fails.
KEEPALIVE_SECONDS = 15.0
MAX_IDLE_CONNECTIONS = 256
DNS_TTL_SECONDS = 300.0

_UNREACHABLE = "The gateway could not reach OpenRouter; retry shortly."
_NO_ANSWER = "OpenRouter did not answer in time; retry shortly."
# Responses that never have a body, whatever their headers say (RFC 9112 §6.3).
NO_BODY_STATUSES = frozenset({204, 304})


class UpstreamBroke(Exception):
    """The upstream connection failed, misspoke or went silent in the middle of a body."""


class _LostBeforeHead(Exception):
    """The connection closed before the response head; retriable on a reused connection."""


@dataclasses.dataclass(frozen=True, slots=True)
class Origin:
    """Where the upstream lives, from its base URL."""

    scheme: str
    host: str
    port: int
    base_path: str  # no trailing slash
    host_header: str

    @classmethod
    def parse(cls, base_url: str) -> Origin:
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {base_url!r}")
        default_port = 443 if parts.scheme == "https" else 80
        port = parts.port or default_port
        host = parts.hostname
        shown = f"[{host}]" if ":" in host else host
        return cls(
            scheme=parts.scheme,
            host=host,
            port=port,
            base_path=parts.path.rstrip("/"),
            host_header=shown if port == default_port else f"{shown}:{port}",
        )


class UpstreamResponse:
    """One response: status and headers at once, the body chunk by chunk."""

    __slots__ = ("_conn", "content_length", "content_type", "headers", "reason", "status")

    def __init__(
        self,
        conn: _Connection,
        status: int,
        reason: str,
        headers: CIMultiDictProxy[str],
        content_length: int | None,
    ) -> None:
        self._conn = conn
        self.status = status
        self.reason = reason
        self.headers = headers
        self.content_length = content_length
        content_type = headers.get("Content-Type", "")
        self.content_type = content_type.partition(";")[0].strip().lower()

    @property
    def complete(self) -> bool:
        """True once the whole body has arrived (and been taken)."""
        return self._conn.body_done and not self._conn.chunks

    def buffered(self) -> bytes:
        """Body bytes that have arrived and not been taken yet, without waiting."""
        return self._conn.take_all()

    async def read_chunk(self) -> bytes:
        """The next piece of the body as it arrived; b"" at its end; `UpstreamBroke` if cut."""
        return await self._conn.next_chunk()

    def release(self) -> None:
        """Done with the response: reuse the connection if the body ended cleanly, else close."""
        self._conn.finish()

    def close(self) -> None:
        """Drop the connection (which tells the upstream to stop generating)."""
        self._conn.abort()


class _Connection(asyncio.Protocol):
    """One keep-alive connection, parsing the response to the request in flight on it."""

    def __init__(self, client: UpstreamClient) -> None:
        self._client = client
        self._loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.reusable = False
        self.idle_since = 0.0
        self._head_waiter: asyncio.Future[UpstreamResponse] | None = None
        self._head_timer: asyncio.TimerHandle | None = None
        self._idle_timer: asyncio.TimerHandle | None = None
        self._body_waiter: asyncio.Future[None] | None = None
        self._paused = False
        self._last_data = 0.0
        self.chunks: collections.deque[bytes] = collections.deque()
        self._reset(head_request=False)

    # -- asyncio.Protocol ------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not subclasses of asyncio's; they have the same methods.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        if self._head_waiter is None and self._framing == "head":
            # Bytes nobody asked for (on an idle connection): the stream is out of step.
            self.abort()
            return
        self.received_any = True
        self._last_data = self._loop.time()
        try:
            if self._framing == "head":
                self._feed_head(data)
            else:
                self._feed_body(data)
        except UpstreamBroke as exc:
            self._fail(exc)

    def eof_received(self) -> bool:
        return False  # close the transport; connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self.reusable = False
        self.transport = None
        self._cancel_timers()
        if self._head_waiter is not None and not self._head_waiter.done():
            self._head_waiter.set_exception(_LostBeforeHead(str(exc) if exc else "closed"))
        elif self._framing == "close" and exc is None:
            self._end_body()  # a body delimited by the connection's end
        elif self._framing in ("length", "chunked", "close"):
            self._fail(UpstreamBroke("The upstream closed the connection mid-response."))

    def pause_writing(self) -> None:
        pass  # the request is written in full at once; the transport buffers the rest

    def resume_writing(self) -> None:
        pass

    # -- sending ---------------------------------------------------------------------

    def send(
        self, method: str, target: str, headers: Iterable[tuple[str, str]], body: bytes
    ) -> asyncio.Future[UpstreamResponse]:
        """Write the request; the future resolves with the response's head."""
        assert self.transport is not None
        head = self._request_head(method, target, headers, body)
        self.reusable = False
        self._reset(head_request=method == "HEAD")
        waiter = self._head_waiter = self._loop.create_future()
        if len(body) < 65536:
            self.transport.write(head + body)
        else:
            self.transport.writelines((head, body))
        self._head_timer = self._loop.call_later(
            self._client.head_timeout_seconds, self._head_timed_out
        )
        return waiter

    def _request_head(
        self, method: str, target: str, headers: Iterable[tuple[str, str]], body: bytes
    ) -> bytes:
        """The request line and headers; ValueError for a header that would split them."""
        lines = [f"{method} {target} HTTP/1.1\r\nHost: {self._client.origin.host_header}\r\n"]
        for name, value in headers:
            if "\r" in value or "\n" in value or "\r" in name or "\n" in name:
                raise ValueError("header name or value with a line break")
            lines.append(f"{name}: {value}\r\n")
        if body or method not in IDEMPOTENT_METHODS:
            lines.append(f"Content-Length: {len(body)}\r\n")
        lines.append("\r\n")
        return "".join(lines).encode("utf-8", "surrogateescape")

    def _reset(self, *, head_request: bool) -> None:
        """Parsing state for the next response."""
        self._is_head_request = head_request
        self._buffer = b""
        self.received_any = False
        self._framing: str = "head"  # head, length, chunked, close, done
        self._chunk_state = "size"  # size, data, data_end, trailers
        self._remaining = 0  # bytes left: of a Content-Length body or of a chunk
        self.chunks.clear()
        self._queued = 0
        self._error: Exception | None = None
        self.body_done = False
        self._keep_alive = True

    def _head_timed_out(self) -> None:
        self._head_timer = None
        waiter = self._head_waiter
        if waiter is not None and not waiter.done():
            waiter.set_exception(UpstreamTimeout(_NO_ANSWER))
        self.abort()

    # -- the response head -----------------------------------------------------------

    def _feed_head(self, data: bytes) -> None:
        buffer = self._buffer + data if self._buffer else data
        end = buffer.find(b"\r\n\r\n")
        if end > MAX_HEAD_BYTES or (end == -1 and len(buffer) > MAX_HEAD_BYTES):
            raise UpstreamBroke("The upstream sent a response head that is too long.")
        if end == -1:
            self._buffer = buffer
            return
        self._buffer = b""
        version, status, reason, headers = _parse_head(buffer[:end])
        rest = buffer[end + 4 :]
        if 100 <= status < 200:
            if status == 101:
                raise UpstreamBroke("The upstream switched protocols.")
            # An interim response (100 Continue, 103 Early Hints): the real one follows.
            if rest:
                self._feed_head(rest)
            return
        if version == "HTTP/1.0" and "keep-alive" not in headers.get("Connection", "").lower():
            self._keep_alive = False
        content_length = self._choose_framing(status, headers)
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        waiter, self._head_waiter = self._head_waiter, None
        assert waiter is not None
        response = UpstreamResponse(self, status, reason, headers, content_length)
        if not waiter.done():
            waiter.set_result(response)
        if self._framing == "done":
            self._end_body()
            if rest:
                self._keep_alive = False  # bytes after a body-less response: out of step
        elif rest:
            self._feed_body(rest)
        if not self.body_done:
            self._watch_idle()

    def _choose_framing(self, status: int, headers: CIMultiDictProxy[str]) -> int | None:
        """How the body is delimited (RFC 9112 §6.3); the Content-Length when it is one."""
        connection = ",".join(headers.getall("Connection", ())).lower()
        if "close" in connection:
            self._keep_alive = False
        if self._is_head_request or status in NO_BODY_STATUSES:
            self._framing = "done"
            return None
        codings = ",".join(headers.getall("Transfer-Encoding", ())).lower()
        if codings:
            if codings.rsplit(",", 1)[-1].strip() == "chunked":
                self._framing = "chunked"
            else:
                self._framing, self._keep_alive = "close", False
            return None
        lengths = {v.strip() for v in headers.getall("Content-Length", ())}
        if not lengths:
            self._framing, self._keep_alive = "close", False
            return None
        if len(lengths) != 1 or not _is_ascii_digits(next(iter(lengths))):
            raise UpstreamBroke("The upstream sent an invalid Content-Length.")
        self._remaining = int(next(iter(lengths)))
        self._framing = "length" if self._remaining else "done"
        return self._remaining

    # -- the body --------------------------------------------------------------------

    def _feed_body(self, data: bytes) -> None:
        framing = self._framing
        if framing == "length":
            if len(data) >= self._remaining:
                if len(data) > self._remaining:
                    data, self._keep_alive = data[: self._remaining], False
                self._remaining = 0
                self._queue(data)
                self._end_body()
            else:
                self._remaining -= len(data)
                self._queue(data)
        elif framing == "chunked":
            self._feed_chunked(data)
        elif framing == "close":
            self._queue(data)
        else:  # "done": bytes after the end of the body
            self._keep_alive = False
            self.abort()

    def _feed_chunked(self, data: bytes) -> None:
        buffer = self._buffer + data if self._buffer else data
        self._buffer = b""
        position, size = 0, len(buffer)
        while position < size:
            state = self._chunk_state
            if state == "data":
                take = min(self._remaining, size - position)
                self._queue(buffer[position : position + take])
                position += take
                self._remaining -= take
                if not self._remaining:
                    self._chunk_state = "data_end"
                continue
            end = buffer.find(b"\r\n", position)
            if end == -1:
                if size - position > MAX_CHUNK_SIZE_LINE:
                    raise UpstreamBroke("The upstream sent a malformed chunk.")
                self._buffer = buffer[position:]
                return
            line = buffer[position:end]
            position = end + 2
            if state == "size":
                self._remaining = _chunk_size(line)
                self._chunk_state = "data" if self._remaining else "trailers"
            elif state == "data_end":
                if line:
                    raise UpstreamBroke("The upstream sent a malformed chunk.")
                self._chunk_state = "size"
            elif not line:  # the blank line after the (ignored) trailers
                self._framing = "done"
                self._end_body()
                if position < size:
                    self._keep_alive = False
                return

    def _queue(self, data: bytes) -> None:
        if not data:
            return
        self.chunks.append(data)
        self._queued += len(data)
        if self._queued > PAUSE_AT_BYTES and not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()
        self._wake()

    def _end_body(self) -> None:
        self._framing = "done"
        self.body_done = True
        self._cancel_timers()
        self._wake()

    def _fail(self, error: Exception) -> None:
        if self._error is None and not self.body_done:
            self._error = error
        waiter = self._head_waiter
        if waiter is not None and not waiter.done():
            waiter.set_exception(error)
        self._wake()
        self.abort()

    def _wake(self) -> None:
        waiter = self._body_waiter
        if waiter is not None:
            self._body_waiter = None
            if not waiter.done():
                waiter.set_result(None)

    def take_all(self) -> bytes:
        if not self.chunks:
            return b""
        data = self.chunks[0] if len(self.chunks) == 1 else b"".join(self.chunks)
        self.chunks.clear()
        self._taken(len(data))
        return data

    async def next_chunk(self) -> bytes:
        while not self.chunks:
            if self._error is not None:
                raise self._error
            if self.body_done:
                return b""
            if self.transport is None:
                raise UpstreamBroke("The upstream connection is closed.")
            waiter = self._body_waiter = self._loop.create_future()
            await waiter
        data = self.chunks.popleft()
        self._taken(len(data))
        return data

    def _taken(self, size: int) -> None:
        self._queued -= size
        if self._paused and self._queued <= PAUSE_AT_BYTES // 4 and self.transport is not None:
            self._paused = False
            self.transport.resume_reading()

    # -- silence mid-body ------------------------------------------------------------

    def _watch_idle(self) -> None:
        self._idle_timer = self._loop.call_at(
            self._last_data + self._client.idle_timeout_seconds, self._check_idle
        )

    def _check_idle(self) -> None:
        self._idle_timer = None
        if self.body_done or self.transport is None:
            return
        silent_for = self._loop.time() - self._last_data
        if self._paused or silent_for < self._client.idle_timeout_seconds:
            # Paused reading is our client being slow, not the upstream being silent.
            if self._paused:
                self._last_data = self._loop.time()
            self._watch_idle()
            return
        self._fail(UpstreamBroke("The upstream went silent mid-response."))

    def _cancel_timers(self) -> None:
        for timer in (self._head_timer, self._idle_timer):
            if timer is not None:
                timer.cancel()
        self._head_timer = self._idle_timer = None

    # -- ending ----------------------------------------------------------------------

    def usable_at(self, now: float) -> bool:
        """True for an idle connection still open and not idle for too long."""
        transport = self.transport
        return (
            self.reusable
            and transport is not None
            and not transport.is_closing()
            and now - self.idle_since < KEEPALIVE_SECONDS
        )

    def finish(self) -> None:
        if self._keep_alive and self.body_done and not self.chunks and self.transport is not None:
            self.reusable = True
            self._client.put_back(self)
        else:
            self.abort()

    def abort(self) -> None:
        self.reusable = False
        self._cancel_timers()
        if self.transport is not None:
            self.transport.close()


def _parse_head(head: bytes) -> tuple[str, int, str, CIMultiDictProxy[str]]:
    """Version, status, reason and headers of a response head (before the blank line)."""
    lines = head.decode("utf-8", "surrogateescape").split("\r\n")
    version, _, rest = lines[0].partition(" ")
    code, _, reason = rest.partition(" ")
    if not version.startswith("HTTP/1.") or len(code) != 3 or not _is_ascii_digits(code):
        raise UpstreamBroke("The upstream sent something that is not an HTTP/1.1 response.")
    headers: CIMultiDict[str] = CIMultiDict()
    for line in lines[1:]:
        name, colon, value = line.partition(":")
        if not colon or not name or name != name.strip() or line[0] in " \t":
            raise UpstreamBroke("The upstream sent a malformed header.")
        headers.add(name, value.strip(" \t"))
    return version, int(code), reason, CIMultiDictProxy(headers)


def _is_ascii_digits(text: str) -> bool:
    # str.isdigit() also takes fullwidth and superscript digits, which int() reads
    # differently or not at all.
    return text.isascii() and text.isdigit()


def _chunk_size(line: bytes) -> int:
    size = line.partition(b";")[0].strip()
    if not size or len(size) > 16 or size.strip(b"0123456789abcdefABCDEF"):
        raise UpstreamBroke("The upstream sent a malformed chunk size.")
    return int(size, 16)


class UpstreamClient:
    """Sends requests to one origin over a pool of keep-alive connections."""

    def __init__(
        self,
        base_url: str,
        *,
        connect_timeout_seconds: float,
        head_timeout_seconds: float,
        idle_timeout_seconds: float,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.origin = Origin.parse(base_url)
        self.head_timeout_seconds = head_timeout_seconds
        self.idle_timeout_seconds = idle_timeout_seconds
        self._connect_timeout_seconds = connect_timeout_seconds
        self._ssl = (
            (ssl_context or ssl.create_default_context()) if self.origin.scheme == "https" else None
        )
        self._idle: list[_Connection] = []
        self._addresses: list[aiohappyeyeballs.AddrInfoType] = []
        self._addresses_expire = 0.0
        self._closed = False

    @property
    def base_path(self) -> str:
        return self.origin.base_path

    async def request(
        self, method: str, target: str, headers: Iterable[tuple[str, str]], body: bytes
    ) -> UpstreamResponse:
        """Send the request; return once the response head arrived (502/504 otherwise).

        `target` is the request target as sent (path and query, already encoded).
        """
        headers = tuple(headers)
        conn = self._take_idle()
        retry = conn is not None and method in IDEMPOTENT_METHODS
        while True:
            if conn is None:
                conn = await self._connect()
            try:
                return await conn.send(method, target, headers, body)
            except _LostBeforeHead as exc:
                if retry and not conn.received_any:
                    retry, conn = False, None
                    continue
                raise UpstreamUnreachable(_UNREACHABLE) from exc
            except UpstreamBroke as exc:
                raise UpstreamUnreachable(_UNREACHABLE) from exc
            except BaseException:
                # Cancelled (the client went away), timed out, or a header we cannot
                # send: closing the connection is also what tells the upstream to stop.
                conn.abort()
                raise

    def _take_idle(self) -> _Connection | None:
        now = time.monotonic()
        while self._idle:
            conn = self._idle.pop()
            if conn.usable_at(now):
                return conn
            conn.abort()
        return None

    def put_back(self, conn: _Connection) -> None:
        """A connection whose response ended cleanly, ready for the next request."""
        if self._closed or len(self._idle) >= MAX_IDLE_CONNECTIONS:
            conn.abort()
            return
        conn.idle_since = time.monotonic()
        self._idle.append(conn)

    async def _connect(self) -> _Connection:
        """A new connection to the origin, racing its addresses (RFC 8305, Happy
        Eyeballs): the next address is tried `HAPPY_EYEBALLS_DELAY_SECONDS` after the one
        before it, so one black-holed address (IPv6 without a route) costs a quarter of a
        second, not the whole connect budget."""
        loop = asyncio.get_running_loop()
        origin = self.origin
        try:
            async with asyncio.timeout(self._connect_timeout_seconds):
                sock = await aiohappyeyeballs.start_connection(
                    await self._resolve(), happy_eyeballs_delay=HAPPY_EYEBALLS_DELAY_SECONDS
                )
                try:
                    _transport, conn = await loop.create_connection(
                        lambda: _Connection(self),
                        sock=sock,
                        ssl=self._ssl,
                        server_hostname=origin.host if self._ssl is not None else None,
                    )
                except BaseException:
                    sock.close()
                    raise
                return conn
        except (OSError, TimeoutError, ssl.SSLError) as exc:
            self._addresses_expire = 0.0  # resolve afresh next time
            raise UpstreamUnreachable(_UNREACHABLE) from exc

    async def _resolve(self) -> list[aiohappyeyeballs.AddrInfoType]:
        """The origin's addresses, looked up at most every DNS_TTL_SECONDS."""
        now = time.monotonic()
        if self._addresses and now < self._addresses_expire:
            return self._addresses
        infos = await asyncio.get_running_loop().getaddrinfo(
            self.origin.host, self.origin.port, type=socket.SOCK_STREAM
        )
        self._addresses = list(infos)
        self._addresses_expire = now + DNS_TTL_SECONDS
        return self._addresses

    async def close(self) -> None:
        """Close every idle connection; responses still being read close their own."""
        self._closed = True
        while self._idle:
            self._idle.pop().abort()
