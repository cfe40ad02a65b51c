"""PostgreSQL: where the database is, the connection pool, and asyncpg's errors mapped to ours.

With `DATABASE_URL` unset the gateway runs on an embedded PostgreSQL (the `pgserver`
package ships the server in a wheel) kept under `EMBEDDED_DATA_DIR`, so a first run and
the tests need nothing installed by hand.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import asyncpg
import structlog

from gateway.errors import DatabaseUnavailable

log = structlog.get_logger("gateway.database")
T = TypeVar("T")

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
        raise DatabaseUnavailable(
            "The gateway cannot reach its database right now; retry shortly.",
            headers={"Retry-After": "5"},
        ) from exc


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
    )
    assert pool is not None
    return pool


@contextlib.asynccontextmanager
async def connect(dsn: str, timeout_seconds: float = 10.0) -> AsyncIterator[asyncpg.Connection]:
    """One plain connection, closed on exit (migrations, LISTEN)."""
    conn = await asyncpg.connect(dsn, timeout=timeout_seconds)
    try:
        yield conn
    finally:
        await conn.close()


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
