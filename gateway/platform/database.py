"""PostgreSQL: where the database is, the connection pool, and asyncpg's errors mapped to ours.

With `DATABASE_URL` unset the gateway runs on an embedded PostgreSQL (the `pgserver`
package ships the server in a wheel) kept under `EMBEDDED_DATA_DIR`, so a first run and
the tests need nothing installed by hand.
"""

from __future__ import annotations

import contextlib
import time
import warnings
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import asyncpg
import structlog
from aiohttp import web

from gateway.errors import DatabaseUnavailable
from gateway.platform import metrics

log = structlog.get_logger("gateway.database")
T = TypeVar("T")
_UNREACHABLE = "The gateway cannot reach its database right now; retry shortly."

# Failures that mean "the database did not answer", as opposed to a bug in a query.
UNAVAILABLE_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.CannotConnectNowError,
    asyncpg.TooManyConnectionsError,
    asyncpg.AdminShutdownError,
)


def start_embedded(data_dir: Path) -> Any:
    """Start (or reuse) the embedded PostgreSQL under `data_dir`; return its handle.

    The server stops when the last process holding a handle exits.
    """
    with warnings.catch_warnings():
        # pgserver's lock file falls back to /tmp when XDG_RUNTIME_DIR is unset, and says so.
        warnings.simplefilter("ignore")
        import pgserver  # imported here: only the embedded case needs it

        data_dir = data_dir.expanduser().resolve()
        data_dir.parent.mkdir(parents=True, exist_ok=True)
        return pgserver.get_server(data_dir, cleanup_mode="stop")


@contextlib.contextmanager
def unavailable_as_gateway_error() -> Iterator[None]:
    """Turn "the database did not answer" into `DatabaseUnavailable` (503)."""
    try:
        yield
    except UNAVAILABLE_ERRORS as exc:
        raise DatabaseUnavailable(_UNREACHABLE, headers={"Retry-After": "5"}) from exc


# How operators tell the gateway's pooled connections apart in pg_stat_activity.
APPLICATION_NAME = "kilo-gateway"


async def create_pool(
    dsn: str, *, min_size: int, max_size: int, query_timeout_seconds: float
) -> asyncpg.Pool:
    """Open the connection pool; queries time out after `query_timeout_seconds`."""
    pool = await asyncpg.create_pool(
        dsn,
        min_size=min_size,
        max_size=max_size,
        command_timeout=query_timeout_seconds,
        # A connection that cannot be had in this time is a database outage, not a queue.
        timeout=query_timeout_seconds,
        reset=_nothing_to_reset,
        server_settings={"application_name": APPLICATION_NAME},
    )
    assert pool is not None
    return pool


async def _nothing_to_reset(_conn: asyncpg.Connection) -> None:
    """Pooled connections never LISTEN, lock, SET or keep cursors, so asyncpg's reset query
    (one more round trip on every release, cache misses included) would undo nothing.
    asyncpg still rolls back a transaction left open before calling this."""


@contextlib.asynccontextmanager
async def connect(dsn: str, timeout_seconds: float = 10.0) -> AsyncIterator[asyncpg.Connection]:
    """One plain connection, closed on exit (migrations, LISTEN)."""
    conn = await asyncpg.connect(dsn, timeout=timeout_seconds)
    try:
        yield conn
    finally:
        await conn.close()


class QueryLimiter:
    """Caps the queries waiting on the database at once, and pauses after a failure.

    Past the cap a request gets 503 at once: a slow database would otherwise gather every
    cache miss into an ever longer queue. After the database fails to answer, queries are
    not tried again for `retry_after_failure_seconds`, so a request that can be served
    from stale cache entries is not held up by a doomed connection attempt first.
    """

    def __init__(self, limit: int, retry_after_failure_seconds: float = 1.0) -> None:
        self._limit = limit
        self._retry_after_failure_seconds = retry_after_failure_seconds
        self._paused_until = 0.0
        self.in_flight = 0

    async def run(
        self,
        pool: asyncpg.Pool,
        timeout_seconds: float,
        query: Callable[..., Awaitable[T]],
        *args: Any,
    ) -> T:
        """`run_query`, unless the database just failed or `limit` queries are waiting."""
        if time.monotonic() < self._paused_until:
            metrics.DATABASE_UNAVAILABLE_ON["query"].inc()
            raise DatabaseUnavailable(_UNREACHABLE, headers={"Retry-After": "5"})
        if self.in_flight >= self._limit:
            metrics.DATABASE_UNAVAILABLE_ON["overloaded"].inc()
            raise DatabaseUnavailable(
                "The gateway's database is overloaded; retry shortly.",
                headers={"Retry-After": "1"},
            )
        self.in_flight += 1
        try:
            return await run_query(pool, timeout_seconds, query, *args)
        except DatabaseUnavailable:
            metrics.DATABASE_UNAVAILABLE_ON["query"].inc()
            self._paused_until = time.monotonic() + self._retry_after_failure_seconds
            raise
        finally:
            self.in_flight -= 1

    def resume(self) -> None:
        """The database answers again (the listener reconnected): stop pausing."""
        self._paused_until = 0.0


async def run_query(
    pool: asyncpg.Pool, timeout_seconds: float, query: Callable[..., Awaitable[T]], *args: Any
) -> T:
    """Run a named query on a pooled connection; 503 when the database does not answer.

    Waiting for a free connection counts against the timeout too, so a slow database
    cannot pile requests up without bound.
    """
    with unavailable_as_gateway_error():
        async with pool.acquire(timeout=timeout_seconds) as conn:
            return await query(conn, *args)


# The application's pool and its limiter of queries waiting for a connection.
POOL = web.AppKey("pool", asyncpg.Pool)
QUERIES = web.AppKey("queries", QueryLimiter)
