"""One keep-alive connection to the upstream, and the response in flight on it.

The request goes out in one write; the response is parsed as it comes (its head by
`HeadParser`, in `wire.py`), the body de-framed (Content-Length, chunked, or
until close) and queued, with back-pressure. Two of the client's deadlines are kept
here, as timers on the event loop rather than a task per read: the response head, and
silence mid-body.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Iterable
from typing import TYPE_CHECKING, cast

from gateway.proxy.upstream_response import (
    UpstreamBroke,
    UpstreamMisspoke,
    UpstreamResponse,
    UpstreamSilent,
)
from gateway.proxy.wire import (
    BODY,
    BROKEN,
    DONE,
    HEAD,
    IDLE,
    MAX_HEAD_BYTES,
    NO_BODY_STATUSES,
    HeadParser,
    Refused,
    persistent,
    request_head,
)

if TYPE_CHECKING:
    from gateway.proxy.upstream import UpstreamClient

# Stop reading from the upstream while this much of its body waits for the client.
PAUSE_AT_BYTES = 256 * 1024
# An idle connection older than this is closed rather than reused: servers drop idle
# connections after some time of their own, and a request sent into one that is
# closing fails.
KEEPALIVE_SECONDS = 15.0


class LostBeforeHead(Exception):
    """The connection closed before the response head; retriable on a reused connection."""


class Connection(HeadParser, asyncio.Protocol):
    """One keep-alive connection, parsing the response to the request in flight on it.

    It is its llhttp parser's callback object too: the `on_*` methods, those for the head
    in `HeadParser`.
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
        self._phase = IDLE

    # -- asyncio.Protocol ------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not subclasses of asyncio's; they have the same methods.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        phase = self._phase
        if phase == BODY:
            self._last_data = self._loop.time()
            if self._chunked:
                # Chunk lines and trailers hold no body byte, and httptools keeps a trailer
                # line whole until it ends: what may come between body bytes is bounded.
                self._starved += len(data)
            self._feed(data)
            if self._starved > MAX_HEAD_BYTES and self._phase == BODY:
                self._fail(UpstreamBroke("The upstream sent too much without a body byte."))
            return
        if phase != HEAD:
            # Bytes nobody asked for (on an idle connection, or after the response's
            # end): the stream is out of step.
            self._keep_alive = False
            self.abort()
            return
        self.received_any = True
        self._last_data = self._loop.time()
        self._head_fed += len(data)
        self._feed(data)
        if self._phase == HEAD and self._head_fed > MAX_HEAD_BYTES:
            # An unfinished head: llhttp has no limit of its own, httptools buffers a line.
            self._misspoke(Refused("a response head longer than MAX_HEAD_BYTES"))

    def eof_received(self) -> bool:
        return False  # close the transport; connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self.reusable = False
        self.transport = None
        self._cancel_timers()
        if self._head_waiter is not None and not self._head_waiter.done():
            self._head_waiter.set_exception(LostBeforeHead(str(exc) if exc else "closed"))
        elif self._phase == BODY:
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
        head = request_head(self._client.origin.host_header, method, target, headers, body)
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

    def _reset(self, *, head_request: bool) -> None:
        """Parsing state for the next response."""
        self._reset_head(head_request=head_request)
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
        if self._feed_parser(data) and self._phase == BODY and self._idle_timer is None:
            self._watch_idle()

    def _misspoke(self, cause: BaseException) -> None:
        """The response broke the protocol (or bytes followed it): drop the connection."""
        self._keep_alive = False
        phase = self._phase
        if phase == HEAD:
            self._phase = BROKEN
            error = UpstreamMisspoke(str(cause))
            error.__cause__ = cause
            waiter = self._head_waiter
            if waiter is not None and not waiter.done():
                waiter.set_exception(error)
            self.abort()
        elif phase == BODY:
            broke = UpstreamBroke(f"The upstream sent a malformed response body: {cause}")
            broke.__cause__ = cause
            self._fail(broke)
        else:  # after the response's end, which stands
            self.abort()

    # -- llhttp's callbacks ----------------------------------------------------------

    def on_headers_complete(self) -> None:
        head = self._checked_head()
        if head is None:
            return  # an interim response, dropped
        status, version, headers, content_length = head
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
            self, status, self._reason.decode("utf-8", "surrogateescape"), headers, content_length
        )
        if not waiter.done():
            waiter.set_result(response)
        if self._head_only:
            self._keep_alive = persistent(version, headers)
            self._end_body()
        else:
            self._phase = BODY  # llhttp ends it (on_message_complete), or the close does

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
        if self._phase == BODY:
            self._keep_alive = self._parser.should_keep_alive()
            self._end_body()

    # -- the body --------------------------------------------------------------------

    def _end_body(self) -> None:
        self._phase = DONE
        self.body_done = True
        self._cancel_timers()
        self._wake()

    def _fail(self, error: Exception) -> None:
        """The body broke off: `read_chunk` raises `error` once the queue is drained."""
        if self._error is None and not self.body_done:
            self._error = error
            self._phase = BROKEN  # so that the close to come does not end the body
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
