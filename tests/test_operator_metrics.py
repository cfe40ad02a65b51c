"""The metrics the alerts and the dashboard in deploy/ read, beyond the request counts:
the LISTEN connection, the database pool and its failures, upstream errors by reason,
and the gateway's own added latency (gateway_overhead_seconds).

Prometheus metrics are process-global, so tests compare values before and after their
own requests, and poll /metrics with a deadline (a request is counted as its handler
finishes, which can be just after the client has the answer).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any

import aiohttp
import asyncpg
import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from bench.fake_upstream import RunningUpstream
from gateway.access.listener import LISTENER, ChangeListener
from gateway.config import CONFIG, Config
from gateway.errors import DatabaseUnavailable
from gateway.platform import metrics
from gateway.platform.database import POOL, QueryLimiter
from gateway.serve.health import readyz
from tests.conftest import UNREACHABLE_DSN, RunningGateway
from tests.factories import Seed

CHAT_URL = "/api/openrouter/chat/completions"
CHAT_BODY: dict[str, Any] = {
    "model": "openai/gpt-4o-mini",
    "messages": [{"role": "user", "content": "hello"}],
}
DEADLINE_SECONDS = 5.0
POLL_SECONDS = 0.02
# Nothing listens here: a pool or a LISTEN connection on it fails as a database that is down.
# How long the slow-upload test's client waits between a request's head and its body.
UPLOAD_PAUSE_SECONDS = 0.4

Labels = Mapping[str, str]


def closed_port() -> int:
    """A loopback port nothing listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


async def scrape(client: aiohttp.ClientSession, gateway: RunningGateway) -> str:
    async with client.get(str(gateway.url) + "/metrics") as response:
        assert response.status == 200
        return await response.text()


def value(text: str, name: str, labels: Labels | None = None) -> float | None:
    """Sum of the samples `name` whose labels include `labels`; None when there is none."""
    wanted = dict(labels or {})
    found = [
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name and wanted.items() <= sample.labels.items()
    ]
    return sum(found) if found else None


def registry_value(name: str, labels: Labels | None = None) -> float:
    """A sample of this process's registry (0 when it has none yet)."""
    return REGISTRY.get_sample_value(name, dict(labels or {})) or 0.0


async def scrape_until(
    client: aiohttp.ClientSession,
    gateway: RunningGateway,
    done: Callable[[str], bool],
    what: str,
) -> str:
    """Poll /metrics until `done(text)`; return the text, or fail at the deadline."""
    deadline = time.monotonic() + DEADLINE_SECONDS
    while True:
        text = await scrape(client, gateway)
        if done(text):
            return text
        assert time.monotonic() < deadline, f"/metrics never showed {what}"
        await asyncio.sleep(POLL_SECONDS)


async def member_token(seed: Seed) -> str:
    org_id = await seed.org()
    _user_id, token = await seed.member_with_key(org_id)
    return token


async def chat(
    client: aiohttp.ClientSession,
    gateway: RunningGateway,
    token: str | None,
    *,
    chunked: bool = False,
    body: dict[str, Any] = CHAT_BODY,
) -> int:
    """POST a chat completion and read it whole; its status. `chunked` sends the body in
    chunks, which the proxy route's own server hands to aiohttp."""
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    encoded = json.dumps(body).encode()

    async def pieces() -> AsyncIterator[bytes]:
        yield encoded

    data: Any = pieces() if chunked else encoded
    async with client.post(str(gateway.url) + CHAT_URL, data=data, headers=headers) as reply:
        # A stream the gateway cut raises: the status is what the tests look at.
        with contextlib.suppress(aiohttp.ClientPayloadError):
            await reply.read()
        return reply.status


# --- LISTEN -------------------------------------------------------------------------------


async def test_listen_connected_is_1_on_a_running_gateway(
    gateway: RunningGateway, client: aiohttp.ClientSession
) -> None:
    """gateway_listen_connected reads 1 once the gateway's LISTEN connection is up."""
    await scrape_until(
        client, gateway, lambda text: value(text, "gateway_listen_connected") == 1.0, "LISTEN up"
    )
    assert gateway.app[LISTENER].connected.is_set()


async def test_listen_connected_is_0_while_the_listen_database_does_not_answer(
    gateway_factory: Callable[..., Awaitable[RunningGateway]], client: aiohttp.ClientSession
) -> None:
    """A gateway whose LISTEN URL nobody answers on reads 0 (the pool itself works)."""
    metrics.LISTEN_CONNECTED.set(1)  # as a process whose listener was up
    gateway = await gateway_factory(DATABASE_LISTEN_URL=UNREACHABLE_DSN)
    await scrape_until(
        client, gateway, lambda text: value(text, "gateway_listen_connected") == 0.0, "LISTEN down"
    )
    async with client.get(str(gateway.url) + "/readyz") as response:
        assert response.status == 200
        assert (await response.json())["change_notifications"] is False


async def test_listener_losing_its_connection_sets_the_gauge_to_0(db_url: str) -> None:
    """Connected, the listener sets 1; when the connection ends (here: the task stops),
    it sets 0."""
    listener = ChangeListener(db_url, on_change=lambda _change: None, on_reset=lambda: None)
    task = asyncio.create_task(listener.run())
    try:
        await asyncio.wait_for(listener.connected.wait(), DEADLINE_SECONDS)
        assert registry_value("gateway_listen_connected") == 1.0
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert registry_value("gateway_listen_connected") == 0.0


# --- Database -----------------------------------------------------------------------------


async def test_pool_and_pending_query_gauges_are_exported_with_sane_values(
    gateway: RunningGateway, client: aiohttp.ClientSession
) -> None:
    """The pool gauges count the gateway's connections by state; a connection held counts
    as in_use; no query is pending on an idle gateway."""
    config = gateway.app[CONFIG]
    async with client.get(str(gateway.url) + "/readyz") as response:
        assert response.status == 200  # the pool has connected
    text = await scrape(client, gateway)
    in_use = value(text, "gateway_database_pool_connections", {"state": "in_use"})
    idle = value(text, "gateway_database_pool_connections", {"state": "idle"})
    assert in_use is not None and idle is not None
    assert in_use >= 0 and idle >= 0
    assert 1 <= in_use + idle <= config.database_pool_max_size
    assert value(text, "gateway_database_pending_queries") == 0.0
    async with gateway.app[POOL].acquire():
        held = await scrape(client, gateway)
        held_in_use = value(held, "gateway_database_pool_connections", {"state": "in_use"})
        assert held_in_use is not None and held_in_use >= 1


async def test_pending_queries_and_overload_are_counted(pool: asyncpg.Pool) -> None:
    """A query running counts in gateway_database_pending_queries until it ends; one past
    the limit is refused and counted as operation="overloaded"."""
    limiter = QueryLimiter(limit=1)
    tally = metrics.Tally()
    tally.follow_database(queries=limiter)
    tally.fold()
    pending_before = registry_value("gateway_database_pending_queries")
    overloaded = {"operation": "overloaded"}
    overloaded_before = registry_value("gateway_database_unavailable_total", overloaded)
    release = asyncio.Event()

    async def held(conn: asyncpg.Connection) -> int:
        await release.wait()
        result: int = await conn.fetchval("SELECT 1")
        return result

    running = asyncio.create_task(limiter.run(pool, DEADLINE_SECONDS, held))
    deadline = time.monotonic() + DEADLINE_SECONDS
    while limiter.in_flight == 0:
        assert time.monotonic() < deadline
        await asyncio.sleep(POLL_SECONDS)
    tally.fold()
    assert registry_value("gateway_database_pending_queries") == pending_before + 1
    with pytest.raises(DatabaseUnavailable):
        await limiter.run(pool, DEADLINE_SECONDS, held)
    assert registry_value("gateway_database_unavailable_total", overloaded) == (
        overloaded_before + 1
    )
    release.set()
    assert await running == 1
    tally.fold()
    assert registry_value("gateway_database_pending_queries") == pending_before


async def test_failed_and_paused_queries_are_counted_as_query(dead_pool: asyncpg.Pool) -> None:
    """A query the database does not answer counts once, and so does each one refused in the
    pause after it."""
    limiter = QueryLimiter(limit=10, retry_after_failure_seconds=60)
    labels = {"operation": "query"}
    before = registry_value("gateway_database_unavailable_total", labels)

    async def select(conn: asyncpg.Connection) -> Any:
        return await conn.fetchval("SELECT 1")

    for _ in range(2):  # the first fails to connect, the second is refused at once
        with pytest.raises(DatabaseUnavailable):
            await limiter.run(dead_pool, 1.0, select)
    assert registry_value("gateway_database_unavailable_total", labels) == before + 2


async def test_readyz_counts_an_unavailable_database(
    dead_pool: asyncpg.Pool, make_config: Callable[..., Config]
) -> None:
    """/readyz answering 503 counts operation="readyz"."""
    app = web.Application()
    app[CONFIG] = make_config(DATABASE_QUERY_TIMEOUT_SECONDS=1)
    app[POOL] = dead_pool
    labels = {"operation": "readyz"}
    before = registry_value("gateway_database_unavailable_total", labels)
    response = await readyz(make_mocked_request("GET", "/readyz", app=app))
    assert response.status == 503
    assert registry_value("gateway_database_unavailable_total", labels) == before + 1


# --- Upstream -----------------------------------------------------------------------------


def upstream_errors(text: str, reason: str) -> float:
    return value(text, "gateway_upstream_errors_total", {"reason": reason}) or 0.0


async def test_unreachable_upstream_is_counted_by_reason(
    gateway_factory: Callable[..., Awaitable[RunningGateway]],
    client: aiohttp.ClientSession,
    seed: Seed,
) -> None:
    """A 502 upstream_unreachable counts one gateway_upstream_errors_total of that reason."""
    gateway = await gateway_factory(OPENROUTER_BASE_URL=f"http://127.0.0.1:{closed_port()}/api/v1")
    token = await member_token(seed)
    before = await scrape(client, gateway)
    assert await chat(client, gateway, token) == 502
    await scrape_until(
        client,
        gateway,
        lambda text: (
            upstream_errors(text, "upstream_unreachable")
            == upstream_errors(before, "upstream_unreachable") + 1
        ),
        "one more upstream_unreachable",
    )


@pytest.mark.parametrize(
    ("setting", "reason"),
    [
        ({"fail_status": 402}, "upstream_payment_required"),
        ({"chunk_count": 5, "die_after_chunks": 2}, "broken_stream"),
    ],
)
async def test_upstream_refusing_or_breaking_is_counted_by_reason(
    gateway: RunningGateway,
    upstream: RunningUpstream,
    client: aiohttp.ClientSession,
    seed: Seed,
    setting: dict[str, int],
    reason: str,
) -> None:
    """OpenRouter refusing the gateway's own account (402) and a stream cut mid-response
    are each counted under their reason, and nothing else is."""
    token = await member_token(seed)
    for name, setting_value in setting.items():
        setattr(upstream.settings, name, setting_value)
    before = await scrape(client, gateway)
    await chat(client, gateway, token, body={**CHAT_BODY, "stream": True})
    after = await scrape_until(
        client,
        gateway,
        lambda text: upstream_errors(text, reason) == upstream_errors(before, reason) + 1,
        f"one more {reason}",
    )
    total = "gateway_upstream_errors_total"
    assert (value(after, total) or 0) - (value(before, total) or 0) == 1


# --- The gateway's own latency ------------------------------------------------------------


@pytest.mark.parametrize("chunked", [False, True], ids=["own-server", "aiohttp"])
async def test_overhead_is_observed_once_per_request_sent_upstream(
    gateway: RunningGateway, client: aiohttp.ClientSession, seed: Seed, chunked: bool
) -> None:
    """Each request forwarded adds one gateway_overhead_seconds observation, on both of the
    proxy route's servers, and a refusal (never sent upstream) none."""
    token = await member_token(seed)
    count, total = "gateway_overhead_seconds_count", "gateway_overhead_seconds_sum"
    duration_total = "gateway_request_duration_seconds_sum"
    ok = {"route": CHAT_URL, "method": "POST", "status": "200"}
    refused = {"route": CHAT_URL, "method": "POST", "status": "401"}
    before = await scrape(client, gateway)
    assert await chat(client, gateway, token, chunked=chunked) == 200
    assert await chat(client, gateway, None, chunked=chunked) == 401

    def both_counted(text: str) -> bool:
        return all(
            (value(text, "gateway_requests_total", labels) or 0)
            == (value(before, "gateway_requests_total", labels) or 0) + 1
            for labels in (ok, refused)
        )

    after = await scrape_until(client, gateway, both_counted, "both requests counted")
    assert (value(after, count) or 0) - (value(before, count) or 0) == 1
    added = (value(after, total) or 0) - (value(before, total) or 0)
    assert 0 < added < (value(after, duration_total) or 0) - (value(before, duration_total) or 0)


async def test_overhead_leaves_out_a_body_still_arriving(
    gateway: RunningGateway, client: aiohttp.ClientSession, seed: Seed
) -> None:
    """A body sent well after its head: the wait is the client's, not the gateway's
    (overhead stays far below it, while the request's duration includes it)."""
    token = await member_token(seed)
    body = json.dumps(CHAT_BODY).encode()
    head = (
        f"POST {CHAT_URL} HTTP/1.1\r\nHost: {gateway.url.host}:{gateway.url.port}\r\n"
        f"Authorization: Bearer {token}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode()
    count, total = "gateway_overhead_seconds_count", "gateway_overhead_seconds_sum"
    before = await scrape(client, gateway)
    reader, writer = await asyncio.open_connection(gateway.url.host, gateway.url.port)
    try:
        writer.write(head)
        await writer.drain()
        await asyncio.sleep(UPLOAD_PAUSE_SECONDS)
        writer.write(body)
        await writer.drain()
        assert (await reader.readline()).startswith(b"HTTP/1.1 200")
        await reader.read()
    finally:
        writer.close()
        await writer.wait_closed()
    after = await scrape_until(
        client,
        gateway,
        lambda text: (value(text, count) or 0) == (value(before, count) or 0) + 1,
        "the slow upload's overhead",
    )
    assert (value(after, total) or 0) - (value(before, total) or 0) < UPLOAD_PAUSE_SECONDS / 2


def test_folded_overhead_is_observed_only_when_given() -> None:
    """The tally passes overheads to the histogram; None (not sent upstream) is skipped."""
    tally = metrics.Tally()
    before = registry_value("gateway_overhead_seconds_count")
    tally.request_answered("/test/overhead", "POST", 200, 0.01, 0.005, 0.0004)
    tally.request_answered("/test/overhead", "POST", 402, 0.001, None, None)
    tally.request_answered("/test/overhead", "POST", 401, 0.001, None)
    tally.fold()
    assert registry_value("gateway_overhead_seconds_count") == before + 1
    assert registry_value("gateway_overhead_seconds_bucket", {"le": "0.0005"}) >= 1
