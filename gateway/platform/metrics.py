"""Prometheus metrics, as module constants, the per-request `Tally`, and `/metrics`.

Labels are bounded sets: route templates, methods, statuses, reasons. They never carry
keys, organization ids or raw paths.
"""

from __future__ import annotations

import os
import weakref
from collections.abc import Sized
from typing import Protocol

from aiohttp import web
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)

# prometheus_client's own switch for sharing metrics between worker processes; it must
# be set before this module is first imported, which `serve --workers N` does.
MULTIPROCESS_DIR_VARIABLE = "PROMETHEUS_MULTIPROC_DIR"

# Proxy overhead is sub-millisecond; upstream calls take seconds.
_DURATION_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
)  # fmt: skip

REQUESTS = Counter(
    "gateway_requests_total", "Requests answered, by route template.", ["route", "method", "status"]
)
BLOCKED = Counter(
    "gateway_blocked_total",
    "Requests the entitlement rule refused (mode=enforce) or would refuse (mode=shadow).",
    ["reason", "mode"],
)
REQUEST_DURATION = Histogram(
    "gateway_request_duration_seconds",
    "Time from request to the last byte of the response, by route template and status"
    " class (2xx, 4xx, ...): a refusal and a stream of the same route are not averaged.",
    ["route", "status_class"],
    buckets=_DURATION_BUCKETS,
)
UPSTREAM_TTFB = Histogram(
    "gateway_upstream_ttfb_seconds",
    "Time from forwarding a request to the upstream's response headers.",
    buckets=_DURATION_BUCKETS,
)
ENTITLEMENT_CACHE = Counter(
    "gateway_entitlement_cache_total",
    "Organization entitlement fact lookups, by result: hit, miss, or stale (served past"
    " the TTL because the database did not answer).",
    ["result"],
)
ACTIVE_STREAMS = Gauge(
    "gateway_active_streams",
    "Upstream responses being relayed right now.",
    # With several workers, the live processes' values add up.
    multiprocess_mode="livesum",
)

CHARGED_MICRODOLLARS = Counter(
    "gateway_charged_microdollars",
    "Microdollars charged to organizations' credits (written to the ledger).",
)
USAGE_PENDING = Gauge(
    "gateway_usage_pending",
    "Charges recorded but not yet written to the database.",
    multiprocess_mode="livesum",
)
USAGE_FLUSH_SECONDS = Histogram(
    "gateway_usage_flush_seconds",
    "Time to write one batch of charges.",
    buckets=_DURATION_BUCKETS,
)

USAGE_SPOOLED = Counter(
    "gateway_usage_spooled",
    "Charges appended to the spool on local disk (USAGE_SPOOL_DIR) because the database"
    " did not take them in time.",
)
USAGE_REPLAYED = Counter(
    "gateway_usage_replayed",
    "Charges read back from spool files and written to the database (or, refused for"
    " their content, set aside: gateway_usage_rejected_total).",
)
USAGE_REJECTED = Counter(
    "gateway_usage_rejected",
    "Charges the database refused for their content, set aside in rejected-*.jsonl.",
)

OVERHEAD = Histogram(
    "gateway_overhead_seconds",
    "The gateway's own time before a request goes upstream: from the request's start"
    " (its head read) to forwarding it, less any wait for a body still arriving (the"
    " client's time). Requests answered without the upstream are not observed.",
    buckets=_DURATION_BUCKETS,
)
UPSTREAM_ERRORS = Counter(
    "gateway_upstream_errors",
    "Upstream failures, by reason: upstream_unreachable, upstream_timeout and"
    " upstream_protocol_error (no usable response), upstream_payment_required (the"
    " gateway's OpenRouter account refused), broken_stream (cut mid-response).",
    ["reason"],
)
# Made up front: every reason exports a 0 before its first failure, for rate().
UPSTREAM_ERROR = {
    reason: UPSTREAM_ERRORS.labels(reason=reason)
    for reason in (
        "upstream_unreachable",
        "upstream_protocol_error",
        "upstream_timeout",
        "upstream_payment_required",
        "broken_stream",
    )
}

LISTEN_CONNECTED = Gauge(
    "gateway_listen_connected",
    "1 while the LISTEN connection for change notifications is up, 0 otherwise.",
    # With several workers, the lowest: one worker without notifications is enough.
    multiprocess_mode="livemin",
)
DATABASE_POOL_CONNECTIONS = Gauge(
    "gateway_database_pool_connections",
    "Open connections of the database pool, by state: in_use (lent to a query) or idle.",
    ["state"],
    multiprocess_mode="livesum",
)
DATABASE_PENDING_QUERIES = Gauge(
    "gateway_database_pending_queries",
    "Request-path queries (cache misses) waiting for or running on a pooled connection;"
    " past DATABASE_MAX_PENDING_QUERIES requests get 503 at once.",
    multiprocess_mode="livesum",
)
DATABASE_UNAVAILABLE = Counter(
    "gateway_database_unavailable",
    "Times the database did not answer, by operation: query (a request's lookup, or"
    " one refused during the pause after a failure), overloaded (the pending-queries"
    " cap), usage_flush (a batch of charges), readyz (a /readyz probe).",
    ["operation"],
)
DATABASE_UNAVAILABLE_ON = {
    operation: DATABASE_UNAVAILABLE.labels(operation=operation)
    for operation in ("query", "overloaded", "usage_flush", "readyz")
}

POOL_IN_USE = DATABASE_POOL_CONNECTIONS.labels(state="in_use")
POOL_IDLE = DATABASE_POOL_CONNECTIONS.labels(state="idle")
CACHE_HIT = ENTITLEMENT_CACHE.labels(result="hit")
CACHE_MISS = ENTITLEMENT_CACHE.labels(result="miss")
CACHE_STALE = ENTITLEMENT_CACHE.labels(result="stale")


class ConnectionPool(Protocol):
    """What the pool gauges read of an asyncpg pool."""

    def get_size(self) -> int: ...
    def get_idle_size(self) -> int: ...
    def is_closing(self) -> bool: ...


class PendingQueries(Protocol):
    """What the pending-queries gauge reads of a `database.QueryLimiter`."""

    in_flight: int


# Past this many answered requests waiting to be counted, the request that reaches it
# folds (when nothing else does, as in tests that never start the app's background tasks).
FOLD_AT = 10_000


class Tally:
    """The application's per-request counts, kept as plain numbers and put into the
    Prometheus metrics at each fold (a few times a second, and before every scrape).

    prometheus_client takes a lock for every update; three updates a request cost more
    than the whole log line, and a handful more for streams and cache lookups cost
    several microseconds on the proxy path. In a batch they run with warm caches, off
    the request path. One per application (`TALLY`), not per module, so that two
    applications in one process (the tests) never count each other's requests.
    """

    __slots__ = (
        "_answered",
        "_children",
        "_durations",
        "_pending",
        "_pool",
        "_queries",
        "cache_hits",
        "cache_misses",
        "open_streams",
    )

    def __init__(self) -> None:
        # Requests answered and not yet counted: (route, method, status, duration, TTFB,
        # overhead).
        self._answered: list[tuple[str, str, int, float, float | None, float | None]] = []
        # labels() costs a lock and a dict lookup; requests reuse the children they made.
        self._children: dict[tuple[str, str, int], Counter] = {}
        self._durations: dict[tuple[str, int], Histogram] = {}
        # Queues of charges not yet written (the usage ledgers): the pending gauge.
        self._pending: weakref.WeakSet[Sized] = weakref.WeakSet()
        # The application's pool and query limiter: the database gauges.
        self._pool: ConnectionPool | None = None
        self._queries: PendingQueries | None = None
        self.open_streams = 0
        self.cache_hits = 0
        self.cache_misses = 0

    def stream_opened(self) -> None:
        self.open_streams += 1

    def stream_closed(self) -> None:
        self.open_streams -= 1

    def cache_hit(self) -> None:
        self.cache_hits += 1

    def cache_miss(self) -> None:
        self.cache_misses += 1

    def follow_pending(self, queue: Sized) -> None:
        """Report `len(queue)` as part of gateway_usage_pending (for as long as it lives)."""
        self._pending.add(queue)

    def follow_database(
        self, pool: ConnectionPool | None = None, queries: PendingQueries | None = None
    ) -> None:
        """Report the pool's connections and the limiter's queries in flight at each fold."""
        self._pool = pool or self._pool
        self._queries = queries or self._queries

    def _report_database(self) -> None:
        pool, queries = self._pool, self._queries
        if pool is not None and not pool.is_closing():
            idle = pool.get_idle_size()
            POOL_IN_USE.set(pool.get_size() - idle)
            POOL_IDLE.set(idle)
        if queries is not None:
            DATABASE_PENDING_QUERIES.set(queries.in_flight)

    def request_answered(
        self,
        route: str,
        method: str,
        status: int,
        duration_seconds: float,
        ttfb_seconds: float | None,
        overhead_seconds: float | None = None,
    ) -> None:
        """Note one answered request for the request, duration, upstream TTFB and overhead
        metrics (the last two None when the request did not go upstream)."""
        self._answered.append(
            (route, method, status, duration_seconds, ttfb_seconds, overhead_seconds)
        )
        if len(self._answered) >= FOLD_AT:
            self.fold()

    def fold(self, limit: int | None = None) -> bool:
        """Put what was tallied into the metrics: all of it, or the oldest `limit` requests.

        Returns True while requests remain. Folding takes about 2 us a request, so the
        flusher folds in slices and lets requests in between: one fold of 0.2 s at 7,000
        requests a second held the event loop for 2.4 ms, which every request arriving
        meanwhile waited for.
        """
        answered = self._answered
        if limit is None or limit >= len(answered):
            batch = answered.copy()
            answered.clear()
        else:
            batch = answered[:limit]
            del answered[:limit]
        counts: dict[tuple[str, str, int], int] = {}
        durations = self._durations
        for route, method, status, duration, ttfb, overhead in batch:
            key = (route, method, status)
            counts[key] = counts.get(key, 0) + 1
            by_class = (route, status // 100)
            histogram = durations.get(by_class)
            if histogram is None:
                histogram = durations[by_class] = REQUEST_DURATION.labels(
                    route, f"{status // 100}xx"
                )
            histogram.observe(duration)
            if ttfb is not None:
                UPSTREAM_TTFB.observe(ttfb)
            if overhead is not None:
                OVERHEAD.observe(overhead)
        children = self._children
        for key, count in counts.items():
            child = children.get(key)
            if child is None:
                route, method, status = key
                child = children[key] = REQUESTS.labels(route, method, str(status))
            child.inc(count)
        hits, misses = self.cache_hits, self.cache_misses
        self.cache_hits = self.cache_misses = 0
        if hits:
            CACHE_HIT.inc(hits)
        if misses:
            CACHE_MISS.inc(misses)
        ACTIVE_STREAMS.set(self.open_streams)
        USAGE_PENDING.set(sum(len(queue) for queue in list(self._pending)))
        self._report_database()
        return bool(answered)


TALLY = web.AppKey("tally", Tally)


def exposition_registry() -> CollectorRegistry:
    """The registry to expose: every worker's values when `serve --workers N` runs."""
    if not os.environ.get(MULTIPROCESS_DIR_VARIABLE):
        return REGISTRY
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)
    return registry


async def metrics_handler(request: web.Request) -> web.Response:
    """Serve every metric in the Prometheus text format."""
    request.app[TALLY].fold()
    response = web.Response(body=generate_latest(exposition_registry()))
    response.headers["Content-Type"] = CONTENT_TYPE_LATEST
    return response
