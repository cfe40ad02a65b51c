"""The upstream's response, relayed to the client as it arrives: `relay` and its `Sink`.

Both servers of the proxy route (its own connection handler and aiohttp) give `relay` a
`Sink` to write to. The relay goes in three steps: start the response (its head, with
the first body bytes when they are already here), the body loop (each chunk fed to the
meter, then written), and the ending (the charge, and the upstream connection released
or closed). An upstream that breaks mid-response is reported in the stream's own terms
and the connection to the client is cut, never ended cleanly.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Protocol

from multidict import CIMultiDict

from gateway.common.context import RequestContext
from gateway.platform import metrics
from gateway.platform.metrics import Tally
from gateway.proxy.forwarding import relay_headers
from gateway.proxy.metering import Meter
from gateway.proxy.upstream import UpstreamBroke, UpstreamResponse

WOULD_BLOCK_HEADER = "X-Gateway-Would-Block"
_SSE_ERROR_EVENT = (
    b'data: {"error":{"code":502,"message":"The upstream connection was lost mid-stream."}'
    b',"choices":[{"index":0,"delta":{"content":""},"finish_reason":"error"}]}\n\n'
)


class Sink(Protocol):
    """Where a relayed response goes: aiohttp's response, or the proxy route's own server."""

    async def start(
        self, status: int, reason: str, headers: CIMultiDict[str], content_length: int | None
    ) -> None:
        """Send the status line and headers (they may wait for the first body bytes)."""

    async def write(self, data: bytes) -> None:
        """Send body bytes (raises ConnectionError once the client is gone)."""

    async def end(self) -> None:
        """The body is complete."""

    def abort(self) -> None:
        """Cut the connection: the response cannot end cleanly."""


class Charger(Protocol):
    """The request's one charge (`charging.Charger`), recorded however the request ends."""

    @property
    def meter(self) -> Meter:
        """The meter the response's body is fed to."""

    def __call__(self, status: int, *, cancelled: bool) -> None:
        """Record the charge (once; later calls do nothing)."""


async def relay(
    sink: Sink,
    upstream: UpstreamResponse,
    ctx: RequestContext,
    would_block: str | None,
    tally: Tally,
    charge: Charger | None = None,
) -> None:
    """Stream the upstream response to the client chunk by chunk, as it arrives."""
    headers = relay_headers(upstream.headers, ctx.request_id)
    if would_block is not None:
        headers[WOULD_BLOCK_HEADER] = would_block
    feed_meter = charge.meter.start(upstream.content_type) if charge is not None else None
    tally.stream_opened()
    client_gone = True  # until the response ends one of the known ways
    try:
        chunk = await _start_response(sink, upstream, headers)
        await _relay_body(sink, upstream, chunk, feed_meter)
        client_gone = False
        await sink.end()
    except UpstreamBroke:
        client_gone = False
        metrics.UPSTREAM_ERROR["broken_stream"].inc()
        await _end_broken_stream(sink, upstream)
    except ConnectionError:
        # The client went away (before the headers or mid-body): nothing is left to send.
        ctx.client_gone = True
    finally:
        tally.stream_closed()
        _finish(upstream, charge, client_gone)


async def _start_response(
    sink: Sink, upstream: UpstreamResponse, headers: CIMultiDict[str]
) -> bytes:
    """Start the response; return the first body bytes (empty if the body is complete)."""
    # The bytes pass through unchanged, so the upstream's length holds, and the
    # response needs no chunked framing.
    await sink.start(upstream.status, upstream.reason, headers, upstream.content_length)
    chunk = upstream.buffered()
    if not chunk and not upstream.complete:
        # Body bytes that came right behind the head may not be read yet: one turn
        # of the loop reads them, so that head and body leave in one write and the
        # client wakes once, not twice.
        await asyncio.sleep(0)
        chunk = upstream.buffered()
    if not chunk and not upstream.complete:
        # No body bytes yet: the headers go now, as the upstream sent them.
        await sink.write(b"")
        chunk = await upstream.read_chunk()
    return chunk


async def _relay_body(
    sink: Sink,
    upstream: UpstreamResponse,
    chunk: bytes,
    feed_meter: Callable[[bytes], None] | None,
) -> None:
    """Write the body, from `chunk` on, until the upstream's ends; meter each chunk."""
    while chunk:
        if feed_meter is not None:
            # Before the write, so that nothing runs between it and the next one (often
            # just the end of the body): a client that wakes for one write and sleeps
            # again before the next costs this machine a second wake-up.
            feed_meter(chunk)
        await sink.write(chunk)
        chunk = await upstream.read_chunk()


def _finish(upstream: UpstreamResponse, charge: Charger | None, client_gone: bool) -> None:
    """The response is over, however it ended: charge, and let the upstream go."""
    if charge is not None:
        charge(upstream.status, cancelled=client_gone)
    if upstream.complete:
        upstream.release()
    else:
        # Closing the connection of a response not read to the end is what tells the
        # upstream to stop generating when the client went away.
        upstream.close()


async def _end_broken_stream(sink: Sink, upstream: UpstreamResponse) -> None:
    """The upstream died mid-response: say so in the stream's own terms, then cut it.

    The client must never see a clean end (or a `data: [DONE]`) the upstream did not send.
    """
    if upstream.content_type == "text/event-stream":
        with contextlib.suppress(ConnectionError):
            await sink.write(_SSE_ERROR_EVENT)
    sink.abort()
