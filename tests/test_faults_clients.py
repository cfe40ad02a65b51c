"""Clients that go away, and a gateway that is told to go away (SIGTERM), with requests in flight.

The gateway is a `python -m gateway serve` subprocess on the test's database. Clients
here are raw loopback sockets, so that "the client closed its connection" happens at a
known instant and costs nothing: the tests time the gateway, not an HTTP client library.
"""

from __future__ import annotations

import asyncio
import json
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest
from yarl import URL

from bench.fake_upstream import DONE_FRAME, Recorder, RunningUpstream
from tests.processes import (
    BrokenJsonUpstream,
    GatewayProcess,
    connection_refused,
    poll_until,
    process_open_fds,
    process_rss_bytes,
    read_metric,
)

pytestmark = pytest.mark.timeout(60)

CHAT_PATH = "/api/openrouter/chat/completions"
COST = 420  # the fake upstream's cost_usd, 0.00042, in microdollars
# The contract: a client that leaves cancels the upstream request within this.
CANCEL_DEADLINE_SECONDS = 0.1
DEADLINE_SECONDS = 3.0
EXIT_DEADLINE_SECONDS = 15.0
StartGateway = Callable[..., Awaitable[GatewayProcess]]


@pytest.fixture
async def start_gateway(
    db_url: str, tmp_path: Path, client: aiohttp.ClientSession
) -> AsyncIterator[StartGateway]:
    """Start gateway subprocesses in front of a given upstream; all are killed afterwards."""
    started: list[GatewayProcess] = []

    async def start(upstream_url: str, **settings: Any) -> GatewayProcess:
        process = await GatewayProcess.start(
            database_url=db_url,
            upstream_url=upstream_url,
            log_dir=tmp_path,
            **{
                "USAGE_SPOOL_DIR": tmp_path / "spool",
                "USAGE_FLUSH_INTERVAL_SECONDS": 0.1,
                **settings,
            },
        )
        started.append(process)
        await process.wait_ready(client)
        return process

    yield start
    for process in started:
        await process.stop()


def chat_request(url: URL, token: str, *, stream: bool) -> bytes:
    """A chat completion as raw HTTP/1.1 bytes."""
    body = json.dumps({"model": "openai/gpt-4o-mini", "stream": stream, "messages": []}).encode()
    head = (
        f"POST {CHAT_PATH} HTTP/1.1\r\nHost: {url.host}:{url.port}\r\n"
        f"Authorization: Bearer {token}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


async def send_chat(
    url: URL, token: str, *, stream: bool
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Open a connection to the gateway and send a chat completion on it."""
    reader, writer = await asyncio.open_connection(url.host, url.port)
    writer.write(chat_request(url, token, stream=stream))
    await writer.drain()
    return reader, writer


async def read_until(reader: asyncio.StreamReader, marker: bytes) -> bytes:
    """Read from the gateway until `marker` has arrived."""
    received = b""
    while marker not in received:
        chunk = await reader.read(65536)
        assert chunk, f"the connection ended before {marker!r}: {received!r}"
        received += chunk
    return received


def hang_up(writer: asyncio.StreamWriter) -> float:
    """Close the client's side of the connection now; return the instant it was closed."""
    closed_at = time.monotonic()
    writer.close()
    return closed_at


def cancellation_instants(recorder: Recorder) -> list[float]:
    """From now on, the instant of every cancellation the fake upstream counts."""
    instants: list[float] = []
    finish = recorder.finish

    def finish_and_note(outcome: Any) -> None:
        before = recorder.cancelled
        finish(outcome)
        if recorder.cancelled > before:
            instants.append(time.monotonic())

    recorder.finish = finish_and_note
    return instants


async def active_streams(client: aiohttp.ClientSession, gateway: GatewayProcess) -> float | None:
    """The gateway's gateway_active_streams gauge."""
    return await read_metric(client, gateway.url, "gateway_active_streams")


# --- The client goes away -----------------------------------------------------------------

# Where the client leaves, and how it knows it got there.
MID_STREAM, BEFORE_FIRST_BYTE = "mid-body", "before-first-byte"


@pytest.mark.parametrize(
    ("stream", "moment"),
    [(True, MID_STREAM), (True, BEFORE_FIRST_BYTE), (False, BEFORE_FIRST_BYTE)],
    ids=["stream-mid-body", "stream-before-first-byte", "json-before-first-byte"],
)
async def test_client_leaving_cancels_the_upstream_within_100ms(
    start_gateway: StartGateway,
    upstream: RunningUpstream,
    client: aiohttp.ClientSession,
    db: asyncpg.Connection,
    token: str,
    stream: bool,
    moment: str,
) -> None:
    """A client hanging up cancels the upstream within 100 ms; the stream gauge returns to 0."""
    gateway = await start_gateway(upstream.url)
    if moment == MID_STREAM:
        upstream.settings.chunk_count = 100
        upstream.settings.chunk_interval_seconds = 0.2
    else:
        upstream.settings.delay_seconds = 30
    cancelled_at = cancellation_instants(upstream.recorder)
    reader, writer = await send_chat(gateway.url, token, stream=stream)
    if moment == MID_STREAM:
        await read_until(reader, b'"content":"tok0 "')
        assert await active_streams(client, gateway) == 1
    else:
        await upstream.recorder.wait_for(lambda r: r.in_flight == 1, timeout=DEADLINE_SECONDS)
    closed_at = hang_up(writer)
    await upstream.recorder.wait_for(lambda r: r.cancelled == 1, timeout=DEADLINE_SECONDS)
    assert cancelled_at[0] - closed_at < CANCEL_DEADLINE_SECONDS, cancelled_at[0] - closed_at
    assert upstream.recorder.completed == 0
    await poll_until(
        lambda: active_streams(client, gateway), lambda n: n == 0, within_seconds=DEADLINE_SECONDS
    )
    # The one charge of the request, marked as cut short by the client.
    row = await poll_until(
        lambda: db.fetchrow("SELECT status, cancelled, cost_microdollars FROM llm_usage"),
        lambda r: r is not None,
        within_seconds=DEADLINE_SECONDS,
    )
    assert row["cancelled"] is True and row["cost_microdollars"] == 0, dict(row)


async def test_client_leaving_mid_json_body_cancels_the_upstream_within_100ms(
    start_gateway: StartGateway, client: aiohttp.ClientSession, token: str
) -> None:
    """A client hanging up halfway through a slow JSON body closes the upstream within 100 ms."""
    slow_upstream = await BrokenJsonUpstream(chunked=False, hold_open=True).start()
    try:
        gateway = await start_gateway(slow_upstream.url)
        reader, writer = await send_chat(gateway.url, token, stream=False)
        await read_until(reader, b'"model":"openai/gpt-4o-mini"')
        closed_at = hang_up(writer)
        await poll_until(
            lambda: asyncio.sleep(0, slow_upstream.peer_closed_at),
            bool,
            within_seconds=DEADLINE_SECONDS,
            interval_seconds=0.005,
        )
        took = slow_upstream.peer_closed_at[0] - closed_at
        assert took < CANCEL_DEADLINE_SECONDS, took
        await poll_until(
            lambda: active_streams(client, gateway),
            lambda n: n == 0,
            within_seconds=DEADLINE_SECONDS,
        )
    finally:
        await slow_upstream.close()


ABANDONED_REQUESTS = 10_000
CONCURRENCY = 100
RSS_GROWTH_LIMIT_BYTES = 20 * 1024 * 1024


async def abandon_batch(
    gateway: GatewayProcess, upstream: RunningUpstream, token: str, *, mid_stream: bool
) -> None:
    """CONCURRENCY requests at once, each abandoned mid-stream or before its first byte."""
    received = upstream.recorder.received
    connections = await asyncio.gather(
        *(send_chat(gateway.url, token, stream=mid_stream) for _ in range(CONCURRENCY))
    )
    if mid_stream:
        await asyncio.gather(*(read_until(reader, b"data: {") for reader, _ in connections))
    else:
        await upstream.recorder.wait_for(
            lambda r: r.received >= received + CONCURRENCY, timeout=DEADLINE_SECONDS
        )
    for _reader, writer in connections:
        writer.close()
    await upstream.recorder.wait_for(lambda r: r.in_flight == 0, timeout=DEADLINE_SECONDS)


@pytest.mark.timeout(180)
async def test_ten_thousand_abandoned_requests_leak_nothing(
    start_gateway: StartGateway,
    upstream: RunningUpstream,
    client: aiohttp.ClientSession,
    token: str,
) -> None:
    """10,000 requests abandoned mid-stream or before the first byte leak no fd, stream or RSS."""
    upstream.recorder.keep_requests = False
    gateway = await start_gateway(upstream.url, ENTITLEMENT_CACHE_TTL_SECONDS=3600)

    async def phase(batches: int, *, mid_stream: bool) -> None:
        upstream.settings.delay_seconds = 0 if mid_stream else 30
        upstream.settings.chunk_count = 1000
        upstream.settings.chunk_interval_seconds = 1.0
        for _ in range(batches):
            await abandon_batch(gateway, upstream, token, mid_stream=mid_stream)

    # Warm up: pools, caches and the allocator settle before the baseline is taken.
    await phase(2, mid_stream=True)
    await phase(2, mid_stream=False)
    await poll_until(lambda: active_streams(client, gateway), lambda n: n == 0, within_seconds=3)
    fds_before, rss_before = process_open_fds(gateway.pid), process_rss_bytes(gateway.pid)
    cancelled_before = upstream.recorder.cancelled

    started = time.monotonic()
    batches = ABANDONED_REQUESTS // CONCURRENCY
    try:
        for _ in range(batches // 10):
            await phase(5, mid_stream=True)
            await phase(5, mid_stream=False)
    except (OSError, TimeoutError, AssertionError) as exc:
        exc.add_note(gateway.describe())
        raise
    took = time.monotonic() - started

    assert upstream.recorder.cancelled - cancelled_before == ABANDONED_REQUESTS
    assert upstream.recorder.completed == 0
    await poll_until(lambda: active_streams(client, gateway), lambda n: n == 0, within_seconds=3)
    fds_after = await poll_until(
        lambda: asyncio.sleep(0, process_open_fds(gateway.pid)),
        lambda fds: fds <= fds_before,
        within_seconds=5,
    )
    rss_growth = process_rss_bytes(gateway.pid) - rss_before
    assert rss_growth < RSS_GROWTH_LIMIT_BYTES, (rss_growth, fds_before, fds_after, took)


# --- The gateway is told to stop (SIGTERM) ------------------------------------------------


async def stream_to_the_end(url: URL, token: str) -> tuple[bytes, float]:
    """One stream read until the gateway ends it; the bytes, and when it ended."""
    reader, writer = await send_chat(url, token, stream=True)
    try:
        received = b""
        while chunk := await reader.read(65536):
            received += chunk
            if received.endswith(b"0\r\n\r\n"):  # the last chunk of a chunked body
                break
    except ConnectionResetError:
        pass
    finally:
        writer.close()
    return received, time.monotonic()


async def test_sigterm_stops_accepting_drains_streams_flushes_charges_and_exits_0(
    start_gateway: StartGateway,
    upstream: RunningUpstream,
    db: asyncpg.Connection,
    token: str,
) -> None:
    """SIGTERM: new connections refused at once, 5 streams finish with [DONE], charged, exit 0."""
    # Nothing is flushed in the background: only the shutdown can write these charges.
    gateway = await start_gateway(
        upstream.url, SHUTDOWN_TIMEOUT_SECONDS=10, USAGE_FLUSH_INTERVAL_SECONDS=60
    )
    upstream.settings.chunk_count = 20
    upstream.settings.chunk_interval_seconds = 0.1
    streams = [asyncio.create_task(stream_to_the_end(gateway.url, token)) for _ in range(5)]
    await upstream.recorder.wait_for(lambda r: r.in_flight == 5, timeout=DEADLINE_SECONDS)

    gateway.send(signal.SIGTERM)
    signalled = time.monotonic()
    await poll_until(
        lambda: connection_refused(gateway.url), bool, within_seconds=0.5, interval_seconds=0.005
    )
    assert time.monotonic() - signalled < 0.5
    outcomes = await asyncio.gather(*streams)
    for body, _ended in outcomes:
        assert body.startswith(b"HTTP/1.1 200 "), body[:200]
        assert DONE_FRAME in body, body[-300:]
    assert await gateway.wait(EXIT_DEADLINE_SECONDS) == 0, gateway.log()[-3000:]
    # Written before the process exited: no waiting here.
    rows = await db.fetch("SELECT status, cancelled, cost_microdollars FROM llm_usage")
    assert sorted(tuple(r) for r in rows) == [(200, False, COST)] * 5


async def test_stream_outlasting_the_drain_timeout_is_cut_at_it_and_still_charged(
    start_gateway: StartGateway,
    upstream: RunningUpstream,
    db: asyncpg.Connection,
    token: str,
) -> None:
    """SIGTERM with a 10 s stream and a 1 s drain: cut at ~1 s, exit 0, charged as cancelled."""
    drain_seconds = 1.0
    gateway = await start_gateway(
        upstream.url, SHUTDOWN_TIMEOUT_SECONDS=drain_seconds, USAGE_FLUSH_INTERVAL_SECONDS=60
    )
    upstream.settings.chunk_count = 100
    upstream.settings.chunk_interval_seconds = 0.1
    stream = asyncio.create_task(stream_to_the_end(gateway.url, token))
    await upstream.recorder.wait_for(lambda r: r.in_flight == 1, timeout=DEADLINE_SECONDS)

    gateway.send(signal.SIGTERM)
    signalled = time.monotonic()
    body, ended = await stream
    assert await gateway.wait(EXIT_DEADLINE_SECONDS) == 0, gateway.log()[-3000:]
    exited = time.monotonic()
    assert DONE_FRAME not in body
    rows = await db.fetch("SELECT status, cancelled FROM llm_usage")
    assert [tuple(r) for r in rows] == [(200, True)]
    cut_after = ended - signalled
    assert drain_seconds - 0.1 < cut_after < drain_seconds + 0.5, (
        f"the stream was cut {cut_after:.2f} s after SIGTERM, exit after"
        f" {exited - signalled:.2f} s; SHUTDOWN_TIMEOUT_SECONDS={drain_seconds}"
    )
