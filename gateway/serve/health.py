"""Health checks for operators and orchestrators.

`/healthz` says the process is alive and serving; `/readyz` says it can do its job,
which needs PostgreSQL to answer (and is 503 otherwise, so a load balancer skips it).
"""

from __future__ import annotations

from aiohttp import web

from gateway.access.listener import LISTENER
from gateway.config import CONFIG
from gateway.platform import metrics
from gateway.platform.database import POOL, UNAVAILABLE_ERRORS


async def healthz(_request: web.Request) -> web.Response:
    """Alive: the event loop answers."""
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """Ready: PostgreSQL answers a query within the query timeout."""
    timeout = request.app[CONFIG].database_query_timeout_seconds
    try:
        async with request.app[POOL].acquire(timeout=timeout) as conn:
            await conn.fetchval("SELECT 1", timeout=timeout)
    except UNAVAILABLE_ERRORS:
        metrics.DATABASE_UNAVAILABLE_ON["readyz"].inc()
        return web.json_response({"status": "unavailable", "database": "down"}, status=503)
    listening = request.app[LISTENER].connected.is_set()
    return web.json_response({"status": "ok", "database": "up", "change_notifications": listening})
