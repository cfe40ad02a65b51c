"""structlog set up for one JSON object per line, and the one line each request gets.

Nothing secret is ever passed to a logger: no token, key hash or upstream key. The
request line carries ids, statuses and timings only.
"""

from __future__ import annotations

import logging
import sys
from typing import TextIO

import structlog

from gateway.context import RequestContext

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING}


def setup_logging(level: str = "info", stream: TextIO | None = None) -> None:
    """Send structlog's JSON lines (and the standard library's) to `stream` (stdout)."""
    stream = stream or sys.stdout
    numeric = _LEVELS.get(level, logging.ERROR)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(stream),
        cache_logger_on_first_use=False,
    )
    # aiohttp's and asyncpg's own warnings go to the same stream; access logs are ours.
    logging.basicConfig(level=max(numeric, logging.WARNING), stream=stream, force=True)


request_log = structlog.get_logger("gateway.request")


def log_request(ctx: RequestContext, *, method: str, status: int, duration_seconds: float) -> None:
    """Write the request's one canonical log line."""
    request_log.info(
        "request",
        request_id=ctx.request_id,
        method=method,
        route=ctx.route,
        status=status,
        organization_id=ctx.organization_id,
        user_id=ctx.user_id,
        verdict=ctx.verdict,
        reason=ctx.reason,
        upstream_status=ctx.upstream_status,
        duration_ms=round(duration_seconds * 1000, 3),
        ttfb_ms=None if ctx.ttfb_seconds is None else round(ctx.ttfb_seconds * 1000, 3),
    )
