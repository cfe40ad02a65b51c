"""`ANY /api/openrouter/{path}`: check the caller, then relay to OpenRouter byte for byte.

The Kilo Code extension must not notice the gateway: headers, status and body pass
through unchanged and as they arrive, except that the gateway swaps in its own upstream
key and refuses blocked organizations with a 402 before any byte goes upstream.
Completions are metered on the way back and charged once the response ends.
Upstream client errors become ours here and nowhere else.

Two servers read requests for this route: its own connection handler (`serve/fastpath.py`,
plain requests) and aiohttp (`proxy_handler`, connections handed over). Both call
`proxy()` with the request's parts and a `Sink` to write the response to; the
upstream's response is relayed to it by `relay.py`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Awaitable, Callable

from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy

from gateway.access.admission import (
    POLICY,
    READ_METHODS,
    Admission,
    admit,
    organization_facts,
    record_refusal,
    record_verdict,
)
from gateway.access.auth import Caller, authenticate, identify
from gateway.access.cache import CACHE
from gateway.common.context import CLIENT_CLOSED_REQUEST, CONTEXT, RequestContext
from gateway.config import CONFIG, EnforcementMode
from gateway.errors import (
    GatewayError,
    MethodNotAllowed,
    NotFound,
    PaymentRequired,
    Reason,
    RequestTimeout,
    UpstreamPaymentRequired,
    UpstreamProtocolError,
    UpstreamTimeout,
    UpstreamUnreachable,
)
from gateway.ledger.writer import LEDGER
from gateway.platform import metrics
from gateway.platform.aiohttp_internals import defer_headers_to_first_write
from gateway.platform.metrics import TALLY
from gateway.proxy.charging import Charger, RequestBody
from gateway.proxy.forwarding import (
    REQUEST_ID_HEADER,
    allow_header,
    allowed_methods,
    forward_headers,
    is_proxied,
    metric_route,
    upstream_path,
    upstream_target,
)
from gateway.proxy.listings import LISTINGS, MODELS_PATH, listing_headers
from gateway.proxy.relay import Sink, relay
from gateway.proxy.upstream import (
    UPSTREAM,
    UpstreamBroke,
    UpstreamDown,
    UpstreamFailed,
    UpstreamMisspoke,
    UpstreamResponse,
    UpstreamSilent,
)


@dataclasses.dataclass(frozen=True, slots=True)
class ProxyRequest:
    """What the proxy needs of a request, whichever server read it."""

    method: str
    raw_path: str
    query_string: str
    headers: CIMultiDictProxy[str]
    read_body: Callable[[], Awaitable[bytes]]


async def proxy_handler(request: web.Request) -> web.StreamResponse:
    """aiohttp's entry to the proxy route (connections the route's own server handed over)."""
    sink = _AiohttpSink(request)
    body_timeout = request.app[CONFIG].body_timeout_seconds
    ctx = request[CONTEXT]

    async def read_body() -> bytes:
        started = time.perf_counter()
        try:
            async with asyncio.timeout(body_timeout):
                return await request.read()
        except TimeoutError:
            raise RequestTimeout("The request body did not arrive in time.") from None
        finally:
            # The client's time, not the gateway's: left out of gateway_overhead_seconds.
            ctx.body_wait_seconds += time.perf_counter() - started

    await proxy(
        request.app,
        ctx,
        ProxyRequest(
            request.method,
            request.rel_url.raw_path,
            request.rel_url.raw_query_string,
            request.headers,
            read_body,
        ),
        sink,
    )
    assert sink.response is not None
    return sink.response


async def proxy(
    app: web.Application, ctx: RequestContext, request: ProxyRequest, sink: Sink
) -> None:
    """Authenticate, admit, forward, and relay the response as it arrives.

    Everything that can refuse the request from its head alone (the path, the method,
    the key, the organization, the rule) runs before the body is read: a refused upload
    costs no memory and no wait. Only the credit check, which needs the model the body
    names, reads it first, and only when the balance is used up.
    """
    config = app[CONFIG]
    tail = upstream_path(request.raw_path)
    ctx.route = metric_route(tail)
    if not is_proxied(tail, config.proxy_allowed_paths):
        raise NotFound(
            "This OpenRouter endpoint is not available through Kilo Code.",
            reason=Reason.ENDPOINT_NOT_PROXIED,
        )
    methods = allowed_methods(tail)
    if request.method == "OPTIONS":
        await send_options(sink, methods, ctx)
        return
    if request.method not in methods:
        raise MethodNotAllowed(
            f"{request.method} is not accepted here; this endpoint takes"
            f" {' or '.join(sorted(methods))}.",
            headers={"Allow": allow_header(methods)},
        )
    if request.method in READ_METHODS:
        await forward_read(app, request, ctx, tail, sink)
        return
    # Past the allow-list every other method is a POST.
    caller = await identify(request.headers, app[CACHE], ctx)
    body = RequestBody(request.read_body)
    metered = tail in config.metered_paths
    admission = await judge(app, ctx, caller, body if metered else None)
    content = await body.read()
    if not metered:
        upstream = await send_upstream(app, request, ctx, tail, content)
        await relay(sink, upstream, ctx, admission.would_block, app[TALLY])
        return
    charge = Charger(app[LEDGER], ctx, caller, await body.meter())
    try:
        upstream = await send_upstream(app, request, ctx, tail, content)
    except GatewayError as exc:
        charge(exc.status, cancelled=False)
        raise
    except asyncio.CancelledError:
        charge(CLIENT_CLOSED_REQUEST, cancelled=True)
        raise
    await relay(sink, upstream, ctx, admission.would_block, app[TALLY], charge)


async def forward_read(
    app: web.Application, request: ProxyRequest, ctx: RequestContext, tail: str, sink: Sink
) -> None:
    """A listing: any valid key may read it, whatever its organization's standing."""
    key = await authenticate(request.headers, app[CACHE])
    ctx.user_id = key.user_id
    if request.method == "GET" and tail == MODELS_PATH:
        await send_model_list(app, request, ctx, sink)
        return
    upstream = await send_upstream(app, request, ctx, tail, await request.read_body())
    await relay(sink, upstream, ctx, None, app[TALLY])


async def judge(
    app: web.Application, ctx: RequestContext, caller: Caller, body: RequestBody | None
) -> Admission:
    """The rule on the caller's organization now, or the 402 that refuses it.

    `body` (metered requests) is read for the model it names only when the credits are
    used up, so that every other verdict is given before the body is read.
    """
    policy = app[POLICY]
    if policy.mode is EnforcementMode.OFF:
        return Admission(caller)
    facts = await organization_facts(app[CACHE], caller.organization_id)
    unwritten = app[LEDGER].unwritten_microdollars(caller.organization_id)
    now = time.time()
    try:
        admission = admit(caller, facts, now, policy, unwritten_microdollars=unwritten)
        if admission.needs_model and body is not None:
            model = await body.model()
            admission = admit(
                caller, facts, now, policy, unwritten_microdollars=unwritten, model=model
            )
    except PaymentRequired as refusal:
        record_refusal(ctx, refusal)
        raise
    record_verdict(ctx, admission, policy.mode)
    return admission


def upstream_error(exc: UpstreamFailed | UpstreamBroke) -> GatewayError:
    """What the client is told when the upstream failed before a response could start
    (counted in gateway_upstream_errors_total under the error's reason)."""
    error: GatewayError
    if isinstance(exc, UpstreamSilent):
        error = UpstreamTimeout("OpenRouter did not answer in time; retry shortly.")
    elif isinstance(exc, UpstreamMisspoke):
        error = UpstreamProtocolError(
            "OpenRouter sent a response the gateway could not read; retry shortly."
        )
    elif isinstance(exc, UpstreamDown):
        error = UpstreamUnreachable("The gateway could not reach OpenRouter; retry shortly.")
    else:
        error = UpstreamUnreachable("OpenRouter's answer was cut short; retry shortly.")
    metrics.UPSTREAM_ERROR[error.reason.value].inc()
    return error


async def send_options(sink: Sink, methods: frozenset[str], ctx: RequestContext) -> None:
    """OPTIONS, answered here: which methods the path takes. Never forwarded."""
    headers: CIMultiDict[str] = CIMultiDict(
        {"Allow": allow_header(methods), REQUEST_ID_HEADER: ctx.request_id}
    )
    await sink.start(204, "No Content", headers, None)
    await sink.end()


async def send_model_list(
    app: web.Application, request: ProxyRequest, ctx: RequestContext, sink: Sink
) -> None:
    """OpenRouter's model list from the cache it shares with the per-organization route."""
    try:
        listing = await app[LISTINGS].get(request.query_string)
    except (UpstreamFailed, UpstreamBroke) as exc:
        raise upstream_error(exc) from exc
    ctx.upstream_status = listing.status
    headers = listing_headers(listing, ctx.request_id)
    await sink.start(listing.status, listing.reason, headers, len(listing.body))
    await sink.write(listing.body)
    await sink.end()


async def send_upstream(
    app: web.Application, request: ProxyRequest, ctx: RequestContext, tail: str, body: bytes
) -> UpstreamResponse:
    """Forward the request; return once the upstream's headers arrive (502/504 otherwise)."""
    client = app[UPSTREAM]
    target = upstream_target(client.base_path, tail, request.query_string)
    headers = forward_headers(
        request.headers,
        app[CONFIG].openrouter_api_key,
        plain_body=request.method not in READ_METHODS,
    )
    started = ctx.sent_upstream_at = time.perf_counter()
    try:
        upstream = await client.request(request.method, target, headers.items(), body)
    except UpstreamFailed as exc:
        raise upstream_error(exc) from exc
    ctx.ttfb_seconds = time.perf_counter() - started
    ctx.upstream_status = upstream.status
    if upstream.status == 402:
        upstream.close()
        metrics.UPSTREAM_ERROR["upstream_payment_required"].inc()
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


defer_headers_to_first_write(_RelayedResponse)


class _AiohttpSink:
    """A relayed response through aiohttp's `StreamResponse`."""

    def __init__(self, request: web.Request) -> None:
        self._request = request
        self.response: _RelayedResponse | None = None

    async def start(
        self, status: int, reason: str, headers: CIMultiDict[str], content_length: int | None
    ) -> None:
        self.response = _RelayedResponse(status=status, reason=reason, headers=headers)
        if content_length is not None:
            self.response.content_length = content_length
        await self.response.prepare(self._request)

    async def write(self, data: bytes) -> None:
        assert self.response is not None
        await self.response.write(data)

    async def end(self) -> None:
        assert self.response is not None
        await self.response.write_eof()

    def abort(self) -> None:
        if self._request.transport is not None:
            self._request.transport.close()
