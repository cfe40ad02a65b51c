"""`ANY /api/openrouter/{path}`: check the caller, then relay to OpenRouter byte for byte.

The Kilo Code extension must not notice the gateway: headers, status and body pass
through unchanged and as they arrive, except that the gateway swaps in its own upstream
key and refuses blocked organizations with a 402 before any byte goes upstream.
Upstream client errors become ours here and nowhere else.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

import aiohttp
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from gateway import metrics
from gateway.appkeys import CACHE, CONFIG, CONTEXT, UPSTREAM
from gateway.auth import authenticate, authorize
from gateway.cache import MISSING
from gateway.config import Config, EnforcementMode
from gateway.context import RequestContext
from gateway.entitlement import check
from gateway.errors import (
    BadRequest,
    Forbidden,
    PaymentRequired,
    UpstreamPaymentRequired,
    UpstreamTimeout,
    UpstreamUnreachable,
)
from gateway.middleware import REQUEST_ID_HEADER

PREFIX = "/api/openrouter/"
WOULD_BLOCK_HEADER = "X-Gateway-Would-Block"
# Methods that only read: they need a valid key, not an entitled organization.
READ_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
# Upstream paths named in metrics; every other path is counted as "other".
KNOWN_PATHS = frozenset({"chat/completions", "completions", "models", "generation", "embeddings"})

# Headers that describe one hop, or carry the caller's credentials, never go upstream.
_HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)
_NOT_FORWARDED = _HOP_BY_HOP | {"host", "content-length", "authorization", "cookie", "expect"}
# Set-Cookie from OpenRouter belongs to no user of ours; content-length is re-derived.
_NOT_RELAYED = _HOP_BY_HOP | {"set-cookie", "content-length", REQUEST_ID_HEADER.lower()}
_SSE_ERROR_EVENT = (
    b'data: {"error":{"code":502,"message":"The upstream connection was lost mid-stream."}'
    b',"choices":[{"index":0,"delta":{"content":""},"finish_reason":"error"}]}\n\n'
)


# Encoded slashes and backslashes would let a segment hide a separator; "?" and "#"
# would end the path early; NUL is never meant.
_FORBIDDEN_IN_PATH = ("%2f", "%5c", "\\", "%00", "?", "#")


def upstream_path(raw_path: str) -> str:
    """The upstream path for a request path, still percent-encoded; 400 for path tricks.

    A leading `v1/` is dropped (the base URL already ends in /v1). Dot segments, empty
    segments, encoded slashes and backslashes are refused so the path cannot climb out of
    the base URL's path.
    """
    if not raw_path.startswith(PREFIX):
        raise _invalid_path()
    tail = raw_path[len(PREFIX) :]
    if tail.startswith("v1/"):
        tail = tail[3:]
    lowered = tail.lower()
    if any(bad in lowered for bad in _FORBIDDEN_IN_PATH):
        raise _invalid_path()
    for segment in tail.split("/"):
        if segment in ("", ".", "..") or segment.lower() in ("%2e", "%2e%2e", ".%2e", "%2e."):
            raise _invalid_path()
    return tail


def _invalid_path() -> BadRequest:
    return BadRequest(
        "The requested path is not a valid OpenRouter API path.", reason="invalid_path"
    )


def upstream_url(base: str, tail: str, query_string: str) -> URL:
    """`{base}/{tail}?{query}`, without re-encoding what the client encoded."""
    url = f"{base}/{tail}"
    if query_string:
        url = f"{url}?{query_string}"
    return URL(url, encoded=True)


def forward_headers(headers: CIMultiDictProxy[str], upstream_key: str) -> CIMultiDict[str]:
    """The client's headers as the upstream should see them, with our key instead of theirs."""
    named_in_connection = _named_in_connection(headers)
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in headers.items():
        lowered = name.lower()
        if (
            lowered in _NOT_FORWARDED
            or lowered in named_in_connection
            or lowered.startswith("x-kilocode-")
        ):
            continue
        out.add(name, value)
    out["Authorization"] = f"Bearer {upstream_key}"
    return out


def _named_in_connection(headers: CIMultiDictProxy[str]) -> set[str]:
    """Headers that a `Connection` header (every one of them) marks as hop-by-hop."""
    return {
        name.strip().lower()
        for value in headers.getall("Connection", ())
        for name in value.split(",")
        if name.strip()
    }


def relay_headers(headers: CIMultiDictProxy[str], request_id: str) -> CIMultiDict[str]:
    """The upstream's response headers as the client should see them."""
    named_in_connection = _named_in_connection(headers)
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in headers.items():
        lowered = name.lower()
        if lowered not in _NOT_RELAYED and lowered not in named_in_connection:
            out.add(name, value)
    out["X-Accel-Buffering"] = "no"
    out[REQUEST_ID_HEADER] = request_id
    return out


def metric_route(tail: str) -> str:
    """The route label for an upstream path: a known endpoint or "other"."""
    path = tail.partition("?")[0]
    return PREFIX + (path if path in KNOWN_PATHS else "other")


async def proxy_handler(request: web.Request) -> web.StreamResponse:
    """Authenticate, check entitlement, forward, and relay the response as it arrives."""
    config = request.app[CONFIG]
    ctx = request[CONTEXT]
    tail = upstream_path(request.rel_url.raw_path)
    ctx.route = metric_route(tail)
    would_block = await admit(request, config, ctx)
    body = await request.read()
    upstream = await send_upstream(request, config, ctx, tail, body)
    return await relay(request, upstream, ctx, would_block)


async def admit(request: web.Request, config: Config, ctx: RequestContext) -> str | None:
    """Check key, membership and entitlement; return the shadow-mode would-block reason."""
    cache = request.app[CACHE]
    key = await authenticate(request.headers, cache)
    ctx.user_id = key.user_id
    if request.method in READ_METHODS:
        return None
    caller = await authorize(request.headers, key, cache)
    ctx.organization_id = caller.organization_id
    if config.enforcement_mode is EnforcementMode.OFF:
        return None
    facts = cache.facts.cached(caller.organization_id)
    if facts is MISSING:
        metrics.CACHE_MISS.inc()
        facts = await cache.facts.load(caller.organization_id)
    else:
        metrics.CACHE_HIT.inc()
    if facts is None:
        raise Forbidden("You are not a member of this organization.", reason="not_a_member")
    try:
        outcome = check(
            facts,
            time.time(),
            trial_days=config.trial_days,
            mode=config.enforcement_mode,
            app_url=config.app_url,
        )
    except PaymentRequired as exc:
        ctx.verdict = "blocked"
        metrics.BLOCKED.labels(exc.reason, EnforcementMode.ENFORCE.value).inc()
        raise
    if outcome.would_block is None:
        ctx.verdict = "allowed"
        return None
    ctx.verdict, ctx.reason = "would_block", outcome.would_block.value
    metrics.BLOCKED.labels(outcome.would_block.value, config.enforcement_mode.value).inc()
    return outcome.would_block.value


async def send_upstream(
    request: web.Request, config: Config, ctx: RequestContext, tail: str, body: bytes
) -> aiohttp.ClientResponse:
    """Forward the request; return once the upstream's headers arrive (502/504 otherwise)."""
    session = request.app[UPSTREAM]
    url = upstream_url(config.openrouter_base_url, tail, request.rel_url.raw_query_string)
    headers = forward_headers(request.headers, config.openrouter_api_key)
    if request.method not in READ_METHODS:
        # Plain bytes back for what the gateway meters; reads keep their compression.
        headers.popall("Accept-Encoding", None)
    started = time.perf_counter()
    try:
        async with asyncio.timeout(config.upstream_timeout_seconds):
            upstream = await session.request(
                request.method, url, headers=headers, data=body or None, allow_redirects=False
            )
    except TimeoutError as exc:
        raise UpstreamTimeout("OpenRouter did not answer in time; retry shortly.") from exc
    except aiohttp.ClientError as exc:
        raise UpstreamUnreachable("The gateway could not reach OpenRouter; retry shortly.") from exc
    ctx.ttfb_seconds = time.perf_counter() - started
    ctx.upstream_status = upstream.status
    metrics.UPSTREAM_TTFB.observe(ctx.ttfb_seconds)
    if upstream.status == 402:
        upstream.close()
        # Our OpenRouter account is out of credit: our problem, not the user's.
        raise UpstreamPaymentRequired(
            "The model provider refused the gateway's account; this is on our side, retry later."
        )
    return upstream


async def relay(
    request: web.Request,
    upstream: aiohttp.ClientResponse,
    ctx: RequestContext,
    would_block: str | None,
) -> web.StreamResponse:
    """Stream the upstream response to the client chunk by chunk, as it arrives."""
    response = web.StreamResponse(
        status=upstream.status,
        reason=upstream.reason,
        headers=relay_headers(upstream.headers, ctx.request_id),
    )
    if would_block is not None:
        response.headers[WOULD_BLOCK_HEADER] = would_block
    metrics.ACTIVE_STREAMS.inc()
    try:
        await response.prepare(request)
        try:
            async for chunk in upstream.content.iter_any():
                await response.write(chunk)
        except (aiohttp.ClientPayloadError, aiohttp.ServerDisconnectedError, TimeoutError):
            await _end_broken_stream(request, response, upstream)
            return response
        await response.write_eof()
        return response
    finally:
        metrics.ACTIVE_STREAMS.dec()
        if upstream.content.at_eof():
            upstream.release()
        else:
            # Closing the connection of a response not read to the end is what tells the
            # upstream to stop generating when the client went away.
            upstream.close()


async def _end_broken_stream(
    request: web.Request, response: web.StreamResponse, upstream: aiohttp.ClientResponse
) -> None:
    """The upstream died mid-response: say so in the stream's own terms, then cut it.

    The client must never see a clean end (or a `data: [DONE]`) the upstream did not send.
    """
    if upstream.content_type == "text/event-stream":
        with contextlib.suppress(ConnectionError):
            await response.write(_SSE_ERROR_EVENT)
    if request.transport is not None:
        request.transport.close()
