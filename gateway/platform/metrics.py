"""Prometheus metrics, as module constants, and the `/metrics` endpoint.

Labels are bounded sets: route templates, methods, statuses, reasons. They never carry
keys, organization ids or raw paths.
"""

from __future__ import annotations

import os
import weakref
from collections.abc import Sized

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
    "Time from request to the last byte of the response.",
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

CACHE_HIT = ENTITLEMENT_CACHE.labels(result="hit")
CACHE_MISS = ENTITLEMENT_CACHE.labels(result="miss")
CACHE_STALE = ENTITLEMENT_CACHE.labels(result="stale")

# labels() costs a lock and a dict lookup; requests reuse the children they made.
_request_children: dict[tuple[str, str, int], Counter] = {}

# Requests answered and not yet counted: (route, method, status, duration, upstream TTFB).
# A request appends one tuple; `fold` counts them a few times a second and before every
# scrape. Three metric updates, each taking a lock, cost more per request than the
# whole log line; in a batch they run with warm caches, off the request path.
_answered: list[tuple[str, str, int, float, float | None]] = []
# Past this many, the request that reaches it folds (when nothing else does, as in tests
# that never start the app's background tasks).
FOLD_AT = 10_000


class _Tally:
    """Per-request counts kept as plain integers and put into the metrics at each fold.

    prometheus_client takes a lock for every increment; a handful per request cost
    several microseconds on the proxy path.
    """

    open_streams = 0
    cache_hits = 0
    cache_misses = 0


# Queues of charges not yet written (the usage ledgers): the pending gauge is their length.
_pending_queues: weakref.WeakSet[Sized] = weakref.WeakSet()


def stream_opened() -> None:
    _Tally.open_streams += 1


def stream_closed() -> None:
    _Tally.open_streams -= 1


def cache_hit() -> None:
    _Tally.cache_hits += 1


def cache_miss() -> None:
    _Tally.cache_misses += 1


def follow_pending(queue: Sized) -> None:
    """Report `len(queue)` as part of gateway_usage_pending (for as long as it lives)."""
    _pending_queues.add(queue)


def request_answered(
    route: str, method: str, status: int, duration_seconds: float, ttfb_seconds: float | None
) -> None:
    """Note one answered request for the request, duration and upstream TTFB metrics."""
    _answered.append((route, method, status, duration_seconds, ttfb_seconds))
    if len(_answered) >= FOLD_AT:
        fold()


def fold(limit: int | None = None) -> bool:
    """Put what was tallied into the metrics: all of it, or the oldest `limit` requests.

    Returns True while requests remain. Folding takes about 2 us a request, so the
    flusher folds in slices and lets requests in between: one fold of 0.2 s at 7,000
    requests a second held the event loop for 2.4 ms, which every request arriving
    meanwhile waited for.
    """
    if limit is None or limit >= len(_answered):
        batch = _answered.copy()
        _answered.clear()
    else:
        batch = _answered[:limit]
        del _answered[:limit]
    counts: dict[tuple[str, str, int], int] = {}
    for route, method, status, duration, ttfb in batch:
        key = (route, method, status)
        counts[key] = counts.get(key, 0) + 1
        REQUEST_DURATION.observe(duration)
        if ttfb is not None:
            UPSTREAM_TTFB.observe(ttfb)
    children = _request_children
    for key, count in counts.items():
        child = children.get(key)
        if child is None:
            route, method, status = key
            child = children[key] = REQUESTS.labels(route, method, str(status))
        child.inc(count)
    hits, misses = _Tally.cache_hits, _Tally.cache_misses
    _Tally.cache_hits = _Tally.cache_misses = 0
    if hits:
        CACHE_HIT.inc(hits)
    if misses:
        CACHE_MISS.inc(misses)
    ACTIVE_STREAMS.set(_Tally.open_streams)
    USAGE_PENDING.set(sum(len(queue) for queue in list(_pending_queues)))
    return bool(_answered)


def exposition_registry() -> CollectorRegistry:
    """The registry to expose: every worker's values when `serve --workers N` runs."""
    if not os.environ.get(MULTIPROCESS_DIR_VARIABLE):
        return REGISTRY
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)
    return registry


async def metrics_handler(_request: web.Request) -> web.Response:
    """Serve every metric in the Prometheus text format."""
    fold()
    response = web.Response(body=generate_latest(exposition_registry()))
    response.headers["Content-Type"] = CONTENT_TYPE_LATEST
    return response
