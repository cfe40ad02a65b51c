"""The one middleware every request passes: id, error envelope, log line, metrics.

This is where aiohttp's routes turn errors into HTTP: a `GatewayError` becomes its
envelope (`errors.render_error`, which the proxy route's own server uses too), aiohttp's
own HTTP errors (404, 405, 413) become ours (`errors.error_for_status`), and anything
unexpected becomes a 500 whose body says nothing of the internals (the log has the
traceback).
"""

from __future__ import annotations

import asyncio
import itertools
import os
import time
from collections.abc import Awaitable, Callable
from typing import Any

import structlog
from aiohttp import web

from gateway.common.context import CLIENT_CLOSED_REQUEST, CONTEXT, IN_FLIGHT, RequestContext
from gateway.errors import (
    REQUEST_ID_HEADER,
    BadRequest,
    GatewayError,
    InternalError,
    Reason,
    error_for_status,
    render_error,
)
from gateway.platform.logs import log_request
from gateway.platform.metrics import TALLY, Tally

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
log = structlog.get_logger("gateway.middleware")


# A random prefix per process and a counter: unique across processes and restarts
# without a system call per request.
_REQUEST_ID_PREFIX = "req_" + os.urandom(8).hex()
_request_counter = itertools.count(1)


def new_request_id() -> str:
    """A unique id for the request, sent back as X-Request-Id."""
    return f"{_REQUEST_ID_PREFIX}{next(_request_counter):x}"


def route_of(request: web.Request) -> str:
    """The route template the request matched: a bounded label, never a raw path."""
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else "unmatched"


class RequestRecord:
    """One request's bookkeeping, for the middleware and the proxy route's own handler:
    its id and context, its place among the requests in flight (which a shutdown drains),
    and its log line and metrics when it ends (499 when it was cancelled)."""

    __slots__ = ("_in_flight", "_started", "_tally", "_task", "ctx", "method", "status")

    def __init__(
        self, in_flight: set[asyncio.Task[Any]], tally: Tally, route: str, method: str
    ) -> None:
        self._started = time.perf_counter()
        self._in_flight = in_flight
        self._tally = tally
        self._task: asyncio.Task[Any] | None = None
        self.ctx = RequestContext(new_request_id(), route)
        self.method = method
        self.status = 500  # until the request says otherwise

    def __enter__(self) -> RequestRecord:
        self._task = asyncio.current_task()
        if self._task is not None:
            self._in_flight.add(self._task)
        return self

    def __exit__(self, kind: type[BaseException] | None, *_: object) -> None:
        if kind is not None and issubclass(kind, asyncio.CancelledError):
            self.status = CLIENT_CLOSED_REQUEST
        if self._task is not None:
            self._in_flight.discard(self._task)
        ctx, started = self.ctx, self._started
        duration = time.perf_counter() - started
        sent = ctx.sent_upstream_at
        self._tally.request_answered(
            ctx.route,
            self.method,
            self.status,
            duration,
            ctx.ttfb_seconds,
            None if sent is None else sent - started - ctx.body_wait_seconds,
        )
        log_request(ctx, method=self.method, status=self.status, duration_seconds=duration)


@web.middleware
async def gateway_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Give the request an id and context; answer errors with the envelope; log and count."""
    app = request.app
    with RequestRecord(app[IN_FLIGHT], app[TALLY], route_of(request), request.method) as record:
        request[CONTEXT] = record.ctx
        response = await _handle(request, handler, record.ctx)
        record.status = CLIENT_CLOSED_REQUEST if record.ctx.client_gone else response.status
        return response


async def _handle(
    request: web.Request, handler: Handler, ctx: RequestContext
) -> web.StreamResponse:
    try:
        return _with_request_id(await handler(request), ctx)
    except GatewayError as exc:
        error = exc
    except web.HTTPException as exc:
        error = error_for_status(exc.status)
    except web.RequestPayloadError:
        # The body could not be read (bad Content-Encoding, broken chunking): client
        # error, and the rest of the body cannot be read either.
        error = BadRequest(
            "The request body could not be read.",
            reason=Reason.MALFORMED_REQUEST,
            close_connection=True,
        )
    except Exception:
        error = unexpected_error(ctx)
    response = error_response(refusal(error, ctx), ctx.request_id)
    if refused_before_body(request):
        # aiohttp still reads and drops what is left for a moment (its lingering time),
        # so that a client still sending reads the answer, then closes.
        response.force_close()
    return _with_request_id(response, ctx)


def _with_request_id(response: web.StreamResponse, ctx: RequestContext) -> web.StreamResponse:
    if not response.prepared:
        response.headers[REQUEST_ID_HEADER] = ctx.request_id
    return response


def refused_before_body(request: web.Request) -> bool:
    """True when the request's body has not all arrived (it was never read)."""
    content = request.content
    if content.is_eof():
        return False
    length = request.content_length
    return length is None or content.total_bytes < length


def refusal(exc: GatewayError, ctx: RequestContext) -> GatewayError:
    """`exc`, its reason noted for the request's log line."""
    ctx.reason = ctx.reason or exc.reason
    return exc


def unexpected_error(ctx: RequestContext) -> GatewayError:
    """A bug: logged with its traceback, answered by a 500 that says nothing of it."""
    log.exception("unhandled_error", request_id=ctx.request_id, route=ctx.route)
    return InternalError("The gateway failed; this is our fault.")


def error_response(exc: GatewayError, request_id: str | None = None) -> web.Response:
    """The JSON envelope for `exc`, with its headers."""
    rendered = render_error(exc, request_id)
    response = web.Response(status=rendered.status, body=rendered.body, headers=rendered.headers)
    if rendered.close_connection:
        response.force_close()
    return response
