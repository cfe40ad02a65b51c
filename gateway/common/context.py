"""What one request learns on its way through, for its log line and its metrics."""

from __future__ import annotations

from aiohttp import web

# The client went away before the response was complete (nginx's convention).
CLIENT_CLOSED_REQUEST = 499


class RequestContext:
    """Filled in by the middleware and the handler; read once when the request ends."""

    __slots__ = (
        "body_wait_seconds",
        "client_gone",
        "organization_id",
        "reason",
        "request_id",
        "route",
        "sent_upstream_at",
        "ttfb_seconds",
        "upstream_status",
        "user_id",
        "verdict",
    )

    def __init__(self, request_id: str, route: str) -> None:
        self.request_id = request_id
        self.route = route
        self.organization_id: str | None = None
        self.user_id: str | None = None
        # "allowed", "blocked", "would_block" (shadow) or None when no rule ran.
        self.verdict: str | None = None
        self.reason: str | None = None
        self.upstream_status: int | None = None
        self.ttfb_seconds: float | None = None
        # For the overhead metric: time.perf_counter() as the request went upstream, and
        # how long the gateway waited for a body still arriving (the client's time).
        self.sent_upstream_at: float | None = None
        self.body_wait_seconds = 0.0
        # The client disconnected before the response was complete.
        self.client_gone = False


# The tasks of requests being handled, so that shutdown can wait for them, then cancel.
IN_FLIGHT = web.AppKey("in_flight", set)

CONTEXT = web.RequestKey("context", RequestContext)
