"""A lean HTTP/1.1 client for the one upstream: pooled keep-alive connections, bytes as they come.

Why not aiohttp's `ClientSession`: it is built for every use (cookies, redirects, proxies,
decompression, tracing, retries of any payload) and in the profile it cost about as much
CPU per request as everything else the gateway does. The gateway needs one thing: send
a request it already holds in full to one origin, and hand back the response's status,
headers and body bytes as they arrive, unchanged. This module does that and no more:

- one TCP (or TLS) connection per request in flight, kept alive and reused LIFO;
- the request goes out in one write; the response is parsed as it comes, the body
  de-framed (Content-Length, chunked, or until close) and queued, with back-pressure;
- three deadlines: connecting, the response head, and silence mid-body;
- a request on a reused connection that dies before any response byte is retried once
  on a new connection, for idempotent methods only (RFC 9112 §9.3.1), as aiohttp does.

Parsing is llhttp's (through `httptools`, the parser aiohttp and uvicorn are built on), in
its strict mode, and what it hands over is then held to RFC 9110's grammar here, because
the proxy relays the status line and the headers as they came. llhttp itself takes a
NUL or DEL in the reason phrase, a status of 099 or 600, HTTP/0.9 and HTTP/2.0, any
number of interim responses, a body on a 1xx, and it has no limit on a head's size, its
lines or its headers; those are refused here, with aiohttp's limits (8190 bytes a line,
128 headers). A response that breaks the protocol is never relayed and its connection
never reused.

Errors the caller sees are this module's own, and say what happened on the wire, not
what to answer (`proxy.py` maps them to HTTP, once): before the head `UpstreamDown` (no
connection, or it closed), `UpstreamSilent` (no head in time) and `UpstreamMisspoke` (a
response that broke HTTP/1.1), all `UpstreamFailed`; after it `UpstreamBroke`.
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
import httptools
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy

IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})
CONNECT_TIMEOUT_SECONDS = 10.0
# RFC 8305's recommended wait before racing the next address.
HAPPY_EYEBALLS_DELAY_SECONDS = 0.25
# A head longer than this is not one OpenRouter sends (interim heads count towards it).
MAX_HEAD_BYTES = 64 * 1024
# aiohttp's limits: the gateway relays no head that aiohttp's own client would refuse.
MAX_LINE_BYTES = 8190
MAX_HEADERS = 128
# OpenRouter sends no interim response (100 Continue, 103 Early Hints); an upstream that
# sends many is looping, not informing.
MAX_INTERIM_RESPONSES = 10
# Exabytes, past any body; llhttp itself takes up to 2**64 - 1.
MAX_LENGTH_DIGITS = 18
# Stop reading from the upstream while this much of its body waits for the client.
PAUSE_AT_BYTES = 256 * 1024
# An idle connection older than this is closed rather than reused: servers drop idle
# connections after some time of their own, and a request sent into one that is
# closing fails.
KEEPALIVE_SECONDS = 15.0
MAX_IDLE_CONNECTIONS = 256
DNS_TTL_SECONDS = 300.0

# Responses that never have a body, whatever their headers say (RFC 9112 §6.3).
NO_BODY_STATUSES = frozenset({204, 304})
_VERSIONS = frozenset({"1.0", "1.1"})
_FRAMING_HEADERS = frozenset({b"content-length", b"transfer-encoding"})
# RFC 9110 §5.6.2's tchar, and §5.5's field-vchar (VCHAR and obs-text), SP and HTAB, which
# are also the reason phrase's (RFC 9112 §4); the LF is what the fields are joined with.
_TOKEN_BYTES_LF = b"\n!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
_TEXT_BYTES = b"\t " + bytes(range(0x21, 0x7F)) + bytes(range(0x80, 0x100))
_TEXT_BYTES_LF = b"\n" + _TEXT_BYTES
# Where the response to the request in flight is: waiting for its final head, in its
# body, ended, or broken; idle before the first request.
_IDLE, _HEAD, _BODY, _DONE, _BROKEN = "idle", "head", "body", "done", "broken"


class UpstreamFailed(Exception):
    """No usable response head: the request may not have reached the upstream at all."""


class UpstreamDown(UpstreamFailed):
    """No connection to the upstream, or it closed before answering."""


class UpstreamSilent(UpstreamFailed):
    """The upstream sent no response head within the head timeout."""


class UpstreamMisspoke(UpstreamFailed):
    """The upstream's response broke HTTP/1.1; it was dropped with its connection."""


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


class _Refused(Exception):
    """Raised in a parser callback: the response breaks the protocol (the message says how)."""


class _Stray(Exception):
    """Raised in a parser callback: bytes follow the end of the response."""


_OUR_EXCEPTIONS = (_Refused, _Stray)


class _Connection(asyncio.Protocol):
    """One keep-alive connection, parsing the response to the request in flight on it.

    It is its llhttp parser's callback object too: the `on_*` methods.
    """

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
        self._parser_spent = True
        self._reset(head_request=False)
        self._phase = _IDLE

    # -- asyncio.Protocol ------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not subclasses of asyncio's; they have the same methods.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        phase = self._phase
        if phase == _BODY:
            self._last_data = self._loop.time()
            if self._chunked:
                # Chunk lines and trailers hold no body byte, and httptools keeps a trailer
                # line whole until it ends: what may come between body bytes is bounded.
                self._starved += len(data)
            self._feed(data)
            if self._starved > MAX_HEAD_BYTES and self._phase == _BODY:
                self._fail(UpstreamBroke("The upstream sent too much without a body byte."))
            return
        if phase != _HEAD:
            # Bytes nobody asked for (on an idle connection, or after the response's
            # end): the stream is out of step.
            self._keep_alive = False
            self.abort()
            return
        self.received_any = True
        self._last_data = self._loop.time()
        self._head_fed += len(data)
        self._feed(data)
        if self._phase == _HEAD and self._head_fed > MAX_HEAD_BYTES:
            # An unfinished head: llhttp has no limit of its own, httptools buffers a line.
            self._misspoke(_Refused("a response head longer than MAX_HEAD_BYTES"))

    def eof_received(self) -> bool:
        return False  # close the transport; connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self.reusable = False
        self.transport = None
        self._cancel_timers()
        if self._head_waiter is not None and not self._head_waiter.done():
            self._head_waiter.set_exception(_LostBeforeHead(str(exc) if exc else "closed"))
        elif self._phase == _BODY:
            if exc is None and self._close_delimited:
                self._end_body()  # a body delimited by the connection's end
            else:
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
        if self._parser_spent:
            self._parser = httptools.HttpResponseParser(self)
        # llhttp starts each message afresh, but after a HEAD's response it still waits for
        # that response's body. (A connection whose response broke is never reused.)
        self._parser_spent = head_request
        self._head_only = head_request
        self._phase = _HEAD
        self._tail = b""  # the last bytes fed of a HEAD's response, for _feed_up_to_head
        self._reason = b""
        self._names: list[bytes] = []
        self._values: list[bytes] = []
        self._interims = 0
        self._interim_bytes = 0
        self._head_fed = 0  # bytes received while the final head was not complete
        self._chunked = False
        self._close_delimited = False
        self._starved = 0  # bytes received since the last body byte, when chunked
        self.received_any = False
        self.chunks.clear()
        self._queued = 0
        self._error: Exception | None = None
        self.body_done = False
        self._keep_alive = True

    def _head_timed_out(self) -> None:
        self._head_timer = None
        waiter = self._head_waiter
        if waiter is not None and not waiter.done():
            waiter.set_exception(UpstreamSilent("no response head in time"))
        self.abort()

    # -- parsing ---------------------------------------------------------------------

    def _feed(self, data: bytes) -> None:
        try:
            if self._head_only and self._phase == _HEAD:
                self._feed_up_to_head(data)
            else:
                self._parser.feed_data(data)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade) as exc:
            # httptools makes a callback's own exception the context of its error.
            cause = exc.__context__
            if isinstance(exc, httptools.HttpParserCallbackError):
                if not isinstance(cause, _OUR_EXCEPTIONS):
                    raise  # a bug in a callback, not the upstream's doing: let it be seen
            else:
                cause = exc
            self._misspoke(cause)
            return
        if self._phase == _BODY and self._idle_timer is None:
            self._watch_idle()

    def _feed_up_to_head(self, data: bytes) -> None:
        """Feed the response to a HEAD up to the end of its final head, never past it.

        llhttp cannot be told that the request was HEAD: past the head it would take as
        body the bytes a Content-Length announces, which never come, and so the next
        response. A head llhttp accepts ends at its first CRLFCRLF (a bare CR or LF it
        refuses), and a 1xx has no body, so the data goes in pieces, each ending at one.
        """
        joined = self._tail + data
        carried = len(self._tail)
        view = memoryview(data)
        fed = search = 0
        while self._phase == _HEAD:
            end = joined.find(b"\r\n\r\n", search)
            if end == -1:
                self._parser.feed_data(view[fed:])
                self._tail = joined[-3:]  # a CRLFCRLF may span two reads
                return
            search = end + 4
            self._parser.feed_data(view[fed : search - carried])
            fed = search - carried
        if fed < len(data):
            self._misspoke(_Stray("bytes after the head of a response to HEAD"))

    def _misspoke(self, cause: BaseException) -> None:
        """The response broke the protocol (or bytes followed it): drop the connection."""
        self._keep_alive = False
        phase = self._phase
        if phase == _HEAD:
            self._phase = _BROKEN
            error = UpstreamMisspoke(str(cause))
            error.__cause__ = cause
            waiter = self._head_waiter
            if waiter is not None and not waiter.done():
                waiter.set_exception(error)
            self.abort()
        elif phase == _BODY:
            broke = UpstreamBroke(f"The upstream sent a malformed response body: {cause}")
            broke.__cause__ = cause
            self._fail(broke)
        else:  # after the response's end, which stands
            self.abort()

    # -- llhttp's callbacks ----------------------------------------------------------

    def on_message_begin(self) -> None:
        if self._phase != _HEAD:
            # llhttp goes on to the next message; on this connection there is none yet.
            raise _Stray("bytes after the end of the response")

    def on_status(self, status: bytes) -> None:
        self._reason += status  # in pieces when the status line spans two reads

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._phase == _HEAD:  # else a trailer: read, never relayed
            self._names.append(name)
            self._values.append(value)

    def on_headers_complete(self) -> None:
        parser = self._parser
        status = parser.get_status_code()
        if status < 200:
            self._interim(status)
            return
        # llhttp takes any three digits, and any version of one digit each.
        if status > 599:
            raise _Refused(f"status {status}")
        version = parser.get_http_version()
        if version not in _VERSIONS:
            raise _Refused(f"HTTP/{version}")
        if self._head_fed > MAX_LINE_BYTES:
            self._check_size()  # else no line, nor the head, can be too long
        reason = self._reason
        if reason.translate(None, _TEXT_BYTES):
            raise _Refused("a byte outside the reason phrase's grammar")
        headers = self._headers()
        lengths = headers.getall("Content-Length", None)
        content_length = None if lengths is None else _content_length(lengths)
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        if self._head_only or status in NO_BODY_STATUSES:
            # llhttp knows 204 and 304 have no body; HEAD it cannot know.
            content_length = None
        else:
            codings = headers.getall("Transfer-Encoding", None)
            if codings is not None:
                final = ",".join(codings).rsplit(",", 1)[-1].strip(" \t").lower()
                self._chunked = final == "chunked"
            self._close_delimited = not self._chunked and content_length is None
        waiter, self._head_waiter = self._head_waiter, None
        assert waiter is not None
        response = UpstreamResponse(
            self, status, reason.decode("utf-8", "surrogateescape"), headers, content_length
        )
        if not waiter.done():
            waiter.set_result(response)
        if self._head_only:
            self._keep_alive = _persistent(version, headers)
            self._end_body()
        else:
            self._phase = _BODY  # llhttp ends it (on_message_complete), or the close does

    def on_body(self, body: bytes) -> None:
        self._starved = 0
        self.chunks.append(body)
        self._queued += len(body)
        if self._queued > PAUSE_AT_BYTES and not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        # Else an interim response's end, or llhttp's end of a HEAD's response (ended here).
        if self._phase == _BODY:
            self._keep_alive = self._parser.should_keep_alive()
            self._end_body()

    def _interim(self, status: int) -> None:
        """An interim response (100 Continue, 103 Early Hints): dropped; the final one follows."""
        if status < 100:
            raise _Refused(f"status {status}")
        if status == 101:
            raise _Refused("a switch of protocols")
        self._interims += 1
        if self._interims > MAX_INTERIM_RESPONSES:
            raise _Refused("more than MAX_INTERIM_RESPONSES interim responses")
        if len(self._names) > MAX_HEADERS:
            raise _Refused("more than MAX_HEADERS header lines")
        # A 1xx ends with its head (RFC 9110 §15.2); llhttp would read the body a
        # Content-Length announced on one.
        if any(name.lower() in _FRAMING_HEADERS for name in self._names):
            raise _Refused("body framing on an interim response")
        if self._head_fed > MAX_LINE_BYTES:
            self._check_size()
        self._interim_bytes += self._head_size()[0]
        self._reason, self._names, self._values = b"", [], []

    def _head_size(self) -> tuple[int, int]:
        """The head's size and its longest line, less the whitespace llhttp drops."""
        lines = [
            len(name) + 2 + len(value)
            for name, value in zip(self._names, self._values, strict=True)
        ]
        lines.append(len(b"HTTP/1.1 200 ") + len(self._reason))
        return sum(lines) + 2 * len(lines) + 2, max(lines)

    def _check_size(self) -> None:
        size, longest = self._head_size()
        if longest > MAX_LINE_BYTES:
            raise _Refused("a head line longer than MAX_LINE_BYTES")
        if self._interim_bytes + size > MAX_HEAD_BYTES:
            raise _Refused("a response head longer than MAX_HEAD_BYTES")

    def _headers(self) -> CIMultiDictProxy[str]:
        """The head's fields, held to RFC 9110's grammar, and decoded."""
        names, values = self._names, self._values
        if not names:
            return CIMultiDictProxy(CIMultiDict())
        if len(names) > MAX_HEADERS:
            raise _Refused("more than MAX_HEADERS header lines")
        # Joined by a byte no field may hold, all the fields are checked and decoded in a
        # few calls, however many there are.
        joined_names = b"\n".join(names)
        joined_values = b"\n".join(values)
        if joined_names.translate(None, _TOKEN_BYTES_LF) or joined_values.translate(
            None, _TEXT_BYTES_LF
        ):
            raise _Refused("a byte outside the field grammar in a header")
        name_list = joined_names.decode("ascii").split("\n")
        value_text = joined_values.decode("utf-8", "surrogateescape")
        value_list = value_text.split("\n")
        if len(name_list) != len(names) or len(value_list) != len(values) or "" in name_list:
            raise _Refused("a line break in a header, or an empty name")
        if " \n" in value_text or "\t\n" in value_text or value_text[-1:] in " \t":
            # llhttp drops the whitespace before a value, not after it.
            value_list = [value.rstrip(" \t") for value in value_list]
        # multidict takes a list faster than any other iterable.
        return CIMultiDictProxy(CIMultiDict(list(zip(name_list, value_list, strict=True))))

    # -- the body --------------------------------------------------------------------

    def _end_body(self) -> None:
        self._phase = _DONE
        self.body_done = True
        self._cancel_timers()
        self._wake()

    def _fail(self, error: Exception) -> None:
        """The body broke off: `read_chunk` raises `error` once the queue is drained."""
        if self._error is None and not self.body_done:
            self._error = error
            self._phase = _BROKEN  # so that the close to come does not end the body
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


def _content_length(lengths: list[str]) -> int:
    """The one Content-Length, read strictly (RFC 9110 §8.6)."""
    length = lengths[0]
    # llhttp refuses a repeated field, but takes any number of digits its counter holds.
    if len(lengths) > 1 and any(other != length for other in lengths):
        raise _Refused("differing Content-Lengths")
    if not (length.isascii() and length.isdigit() and len(length) <= MAX_LENGTH_DIGITS):
        raise _Refused("an invalid Content-Length")
    return int(length)


def _persistent(version: str, headers: CIMultiDictProxy[str]) -> bool:
    """Whether the connection stays open after the response (RFC 9112 §9.3)."""
    options = {
        o.strip(" \t") for o in ",".join(headers.getall("Connection", ())).lower().split(",")
    }
    return "close" not in options and (version == "1.1" or "keep-alive" in options)


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
                raise UpstreamDown("the connection closed before a response") from exc
            except BaseException:
                # Cancelled (the client went away), timed out, a response that broke the
                # protocol, or a header we cannot send: closing the connection is also
                # what tells the upstream to stop.
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
            raise UpstreamDown(f"could not connect: {exc}") from exc

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


UPSTREAM = web.AppKey("upstream", UpstreamClient)
