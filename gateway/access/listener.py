"""LISTEN for `gateway_changes` and evict what each notification names.

A purchase, a new member, a revoked key or a moved trial date then reaches every
gateway process within a second instead of after the cache TTL. When the connection
drops, notifications may have been missed, so the caches are cleared once it is back.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

import asyncpg
import structlog
from aiohttp import web

from gateway.common.waiting import wait_until_set
from gateway.platform import metrics
from gateway.platform.database import UNAVAILABLE_ERRORS

CHANNEL = "gateway_changes"
# How operators (and tests) tell the LISTEN connection apart in pg_stat_activity.
APPLICATION_NAME = "kilo-gateway-listener"
log = structlog.get_logger("gateway.listener")


class ChangeListener:
    """Keeps one LISTEN connection up, reconnecting with backoff, and applies changes."""

    def __init__(
        self,
        dsn: str,
        *,
        on_change: Callable[[dict[str, Any]], None],
        on_reset: Callable[[], None],
        on_connected: Callable[[], None] = lambda: None,
        check_interval_seconds: float = 1.0,
        max_backoff_seconds: float = 5.0,
    ) -> None:
        self._dsn = dsn
        self._on_change = on_change
        self._on_reset = on_reset
        self._on_connected = on_connected
        self._check_interval_seconds = check_interval_seconds
        self._max_backoff_seconds = max_backoff_seconds
        self.connected = asyncio.Event()
        # Notifications applied so far: once it moves past a count read before a change,
        # every request from then on is judged on the changed row (tests wait on it).
        self.received = 0

    async def run(self) -> None:
        """Listen forever; cancel the task to stop."""
        backoff = 0.1
        while True:
            try:
                await self._listen_until_lost()
                backoff = 0.1
            except (*UNAVAILABLE_ERRORS, asyncpg.PostgresError) as exc:
                log.warning("listen_connection_failed", error=type(exc).__name__)
            self._disconnected()
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, self._max_backoff_seconds)

    async def _listen_until_lost(self) -> None:
        conn = await asyncpg.connect(
            self._dsn, timeout=5, server_settings={"application_name": APPLICATION_NAME}
        )
        lost = asyncio.Event()
        conn.add_termination_listener(lambda _conn: lost.set())
        try:
            await conn.add_listener(CHANNEL, self._notified)
            # Anything cached before LISTEN began may have missed a change.
            self._on_reset()
            self._on_connected()
            self.connected.set()
            metrics.LISTEN_CONNECTED.set(1)
            log.info("listen_connected", channel=CHANNEL)
            await self._watch(conn, lost)
        finally:
            self._disconnected()
            self._on_reset()
            if not conn.is_closed():
                conn.terminate()
        log.warning("listen_connection_lost", channel=CHANNEL)

    def _disconnected(self) -> None:
        self.connected.clear()
        metrics.LISTEN_CONNECTED.set(0)

    async def _watch(self, conn: asyncpg.Connection, lost: asyncio.Event) -> None:
        """Return when the connection is gone; a ping finds a silently dead peer."""
        while not lost.is_set():
            if not await wait_until_set(lost, self._check_interval_seconds):
                await conn.execute("SELECT 1", timeout=self._check_interval_seconds * 2)

    def _notified(self, _conn: Any, _pid: int, _channel: str, payload: str) -> None:
        try:
            change = json.loads(payload)
        except ValueError:
            change = {}
        self._on_change(change if isinstance(change, dict) else {})
        self.received += 1


LISTENER = web.AppKey("listener", ChangeListener)
