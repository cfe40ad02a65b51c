"""structlog set up for one JSON object per line, and the one line each request gets.

Nothing secret is ever passed to a logger: no token, key hash or upstream key. The
request line carries ids, statuses and timings only.

Lines are written to a buffered stream and flushed by the application every
`FLUSH_INTERVAL_SECONDS` and at shutdown, not one write system call per line: on the
request path that call cost more than the rest of the log line. A crash can lose at most
the last fraction of a second of lines.
"""

from __future__ import annotations

import functools
import io
import logging
import sys
import time
from datetime import UTC, datetime
from json.encoder import encode_basestring_ascii
from typing import TextIO

import structlog

from gateway.common.context import RequestContext

FLUSH_INTERVAL_SECONDS = 0.2
_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING}
_STDOUT_BUFFER_BYTES = 1 << 16


class _LineWriter:
    """A structlog logger that writes each rendered line to the stream, unflushed."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream

    def msg(self, message: str) -> None:
        self._stream.write(message + "\n")

    debug = info = warning = warn = error = critical = exception = fatal = log = msg


class _State:
    """Where request lines go: set once by `setup_logging`, for the whole process, as the
    logging it configures (structlog's and the standard library's) is process-wide."""

    stream: TextIO = sys.stdout
    request_lines = True


def setup_logging(level: str = "info", stream: TextIO | None = None) -> None:
    """Send structlog's JSON lines (and the standard library's) to `stream` (stdout)."""
    stream = stream or _buffered_stdout()
    numeric = _LEVELS.get(level, logging.ERROR)
    _State.stream = stream
    _State.request_lines = numeric <= logging.INFO
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=lambda *_args: _LineWriter(stream),
        cache_logger_on_first_use=False,
    )
    # aiohttp's and asyncpg's own warnings go to the same stream as JSON lines too.
    handler = logging.StreamHandler(stream)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                structlog.processors.JSONRenderer(),
            ],
            foreign_pre_chain=[
                structlog.stdlib.add_logger_name,
                structlog.processors.add_log_level,
                structlog.processors.TimeStamper(fmt="iso", utc=True),
                structlog.processors.format_exc_info,
            ],
        )
    )
    logging.basicConfig(level=max(numeric, logging.WARNING), handlers=[handler], force=True)


def _buffered_stdout() -> TextIO:
    """stdout with a 64 KiB buffer of its own, whatever PYTHONUNBUFFERED says."""
    raw = open(sys.stdout.fileno(), "wb", buffering=_STDOUT_BUFFER_BYTES, closefd=False)  # noqa: SIM115
    return io.TextIOWrapper(raw, encoding="utf-8", write_through=False)


def flush() -> None:
    """Push buffered lines out (called periodically and at shutdown)."""
    _State.stream.flush()


def log_request(ctx: RequestContext, *, method: str, status: int, duration_seconds: float) -> None:
    """Write the request's one canonical log line (same shape as structlog's lines).

    Formatted directly rather than through structlog's processor chain and json.dumps:
    this line is written for every request, and every field is a plain value whose JSON
    form is known (ids and routes are escaped all the same).
    """
    if not _State.request_lines:
        return
    ttfb = "null" if ctx.ttfb_seconds is None else f"{ctx.ttfb_seconds * 1000:.3f}"
    upstream_status = "null" if ctx.upstream_status is None else str(ctx.upstream_status)
    _State.stream.write(
        f'{{"request_id": {_text(ctx.request_id)}, "method": {_text(method)},'
        f' "route": {_text(ctx.route)}, "status": {status},'
        f' "organization_id": {_text(ctx.organization_id)}, "user_id": {_text(ctx.user_id)},'
        f' "verdict": {_text(ctx.verdict)}, "reason": {_text(ctx.reason)},'
        f' "upstream_status": {upstream_status}, "duration_ms": {duration_seconds * 1000:.3f},'
        f' "ttfb_ms": {ttfb}, "event": "request", "level": "info",'
        f' "timestamp": "{_now_iso()}"}}\n'
    )


def _text(value: str | None) -> str:
    return "null" if value is None else encode_basestring_ascii(value)


@functools.lru_cache(maxsize=1)
def _iso_second(second: int) -> str:
    """A timestamp's whole-second part: formatted once per second, not per line."""
    return datetime.fromtimestamp(second, UTC).strftime("%Y-%m-%dT%H:%M:%S")


def _now_iso() -> str:
    now = time.time()
    second = int(now)
    return f"{_iso_second(second)}.{int((now - second) * 1_000_000):06d}Z"
