"""`ANY /api/openrouter/{path}`: check the caller, then relay to OpenRouter byte for byte.

The Kilo Code extension must not notice the gateway: headers, status and body pass
through unchanged and as they arrive, except that the gateway swaps in its own upstream
key and refuses blocked organizations with a 402 before any byte goes upstream.
Completions are metered on the way back and charged once the response ends.
Upstream client errors become ours here and nowhere else.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

from aiohttp import web

from gateway import metrics
from gateway.admission import READ_METHODS, admit
from gateway.appkeys import CACHE, CONFIG, CONTEXT, LEDGER, UPSTREAM
from gateway.auth import Caller, authenticate
from gateway.config import Config
from gateway.context import RequestContext
from gateway.errors import GatewayError, NotFound, UpstreamPaymentRequired
from gateway.forwarding import (
    forward_headers,
    is_proxied,
    metric_route,
    relay_headers,
    upstream_path,
    upstream_target,
)
from gateway.metering import METERED_PATHS, Meter
from gateway.middleware import CLIENT_CLOSED_REQUEST
from gateway.upstream import UpstreamBroke, UpstreamResponse
from gateway.usage import UsageLedger

WOULD_BLOCK_HEADER = "X-Gateway-Would-Block"
_SSE_ERROR_EVENT = (
    b'data: {"error":{"code":502,"message":"The upstream connection was lost mid-stream."}'
    b',"choices":[{"index":0,"delta":{"content":""},"finish_reason":"error"}]}\n\n'
)


async def proxy_handler(request: web.Request) -> web.StreamResponse:
    """Authenticate, admit, forward, and relay the response as it arrives."""
    app = request.app
    config, ctx = app[CONFIG], request[CONTEXT]
    tail = upstream_path(request.rel_url.raw_path)
    ctx.route = metric_route(tail)
    if not is_proxied(tail, config.proxy_allowed_paths):
        raise NotFound(
            "This OpenRouter endpoint is not available through Kilo Code.",
            reason="endpoint_not_proxied",
        )
    key = await authenticate(request.headers, app[CACHE])
    ctx.user_id = key.user_id
    body = await request.read()
    meter = Meter(body) if request.method == "POST" and tail in METERED_PATHS else None
    admission = await admit(
        method=request.method,
        headers=request.headers,
        key=key,
        cache=app[CACHE],
        config=config,
        ctx=ctx,
        unwritten_microdollars=app[LEDGER].unwritten_microdollars,
        requested_model=meter.model if meter is not None else None,
    )
    if meter is None or admission.caller is None:
        upstream = await send_upstream(request, config, ctx, tail, body)
        return await relay(request, upstream, ctx, admission.would_block)
    charge = _Charger(app[LEDGER], ctx, admission.caller, meter)
    try:
        upstream = await send_upstream(request, config, ctx, tail, body)
    except GatewayError as exc:
        charge(exc.status, cancelled=False)
        raise
    except asyncio.CancelledError:
        charge(CLIENT_CLOSED_REQUEST, cancelled=True)
        raise
    return await relay(request, upstream, ctx, admission.would_block, charge)


class _Charger:
    """Records the request's one charge, however the request ends."""

    __slots__ = ("_caller", "_ctx", "_ledger", "_meter", "done")

    def __init__(
        self, ledger: UsageLedger, ctx: RequestContext, caller: Caller, meter: Meter
    ) -> None:
        self._ledger, self._ctx, self._caller, self._meter = ledger, ctx, caller, meter
        self.done = False

    @property
    def meter(self) -> Meter:
        return self._meter

    def __call__(self, status: int, *, cancelled: bool) -> None:
        if self.done:
            return
        self.done = True
        self._ledger.record(
            self._meter.charge(
                request_id=self._ctx.request_id,
                organization_id=self._caller.organization_id,
                user_id=self._caller.user_id,
                status=status,
                cancelled=cancelled,
            )
        )


async def send_upstream(
    request: web.Request, config: Config, ctx: RequestContext, tail: str, body: bytes
) -> UpstreamResponse:
    """Forward the request; return once the upstream's headers arrive (502/504 otherwise)."""
    client = request.app[UPSTREAM]
    target = upstream_target(client.base_path, tail, request.rel_url.raw_query_string)
    headers = forward_headers(
        request.headers, config.openrouter_api_key, plain_body=request.method not in READ_METHODS
    )
    started = time.perf_counter()
    upstream = await client.request(request.method, target, headers.items(), body)
    ctx.ttfb_seconds = time.perf_counter() - started
    ctx.upstream_status = upstream.status
    if upstream.status == 402:
        upstream.close()
        # Our OpenRouter account is out of credit: our problem, not the user's.
        raise UpstreamPaymentRequired(
            "The model provider refused the gateway's account; this is on our side, retry later."
        )
    return upstream


class _RelayedResponse(web.StreamResponse):
    """A streamed response whose headers leave together with the first body bytes.

    One write instead of two for every response that arrives whole (most non-streamed
    completions): on loopback each write costs about as much as parsing the request.
    aiohttp's own `web.Response` buffers its headers the same way.
    """

    _send_headers_immediately = False


async def relay(
    request: web.Request,
    upstream: UpstreamResponse,
    ctx: RequestContext,
    would_block: str | None,
    charge: _Charger | None = None,
) -> web.StreamResponse:
    """Stream the upstream response to the client chunk by chunk, as it arrives."""
    response = _RelayedResponse(
        status=upstream.status,
        reason=upstream.reason,
        headers=relay_headers(upstream.headers, ctx.request_id),
    )
    if upstream.content_length is not None:
        # The bytes pass through unchanged, so the length holds, and the response
        # needs no chunked framing.
        response.content_length = upstream.content_length
    if would_block is not None:
        response.headers[WOULD_BLOCK_HEADER] = would_block
    meter = charge.meter if charge is not None else None
    if meter is not None:
        meter.start(upstream.content_type)
    metrics.ACTIVE_STREAMS.inc()
    client_gone = True  # until the response ends one of the known ways
    try:
        await response.prepare(request)
        chunk = upstream.buffered()
        if not chunk and not upstream.complete:
            # No body bytes yet: the headers go now, as the upstream sent them.
            await response.write(b"")
            chunk = await upstream.read_chunk()
        while chunk:
            await response.write(chunk)
            if meter is not None:
                meter.feed(chunk)
            chunk = await upstream.read_chunk()
        client_gone = False
        await response.write_eof()
        return response
    except UpstreamBroke:
        client_gone = False
        await _end_broken_stream(request, response, upstream)
        return response
    except ConnectionError:
        # The client went away (before the headers or mid-body): nothing is left to send.
        ctx.client_gone = True
        return response
    finally:
        metrics.ACTIVE_STREAMS.dec()
        if charge is not None:
            charge(upstream.status, cancelled=client_gone)
        if upstream.complete:
            upstream.release()
        else:
            # Closing the connection of a response not read to the end is what tells the
            # upstream to stop generating when the client went away.
            upstream.close()


async def _end_broken_stream(
    request: web.Request, response: web.StreamResponse, upstream: UpstreamResponse
) -> None:
    """The upstream died mid-response: say so in the stream's own terms, then cut it.

    The client must never see a clean end (or a `data: [DONE]`) the upstream did not send.
    """
    if upstream.content_type == "text/event-stream":
        with contextlib.suppress(ConnectionError):
            await response.write(_SSE_ERROR_EVENT)
    if request.transport is not None:
        request.transport.close()
