"""OpenRouter failing under a running gateway: refusing connections, too slow, dying mid-body.

The gateway is a `python -m gateway serve` subprocess on the test's database; the
upstream is the fake OpenRouter, or a raw loopback server that breaks off a JSON body
(`BrokenJsonUpstream`), both in the test's event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from bench.fake_upstream import DONE_FRAME, RunningUpstream
from tests.processes import BrokenJsonUpstream, GatewayProcess, free_port

pytestmark = pytest.mark.timeout(60)

CHAT_PATH = "api/openrouter/chat/completions"
DEADLINE_SECONDS = 3.0
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
            USAGE_SPOOL_DIR=tmp_path / "spool",
            **settings,
        )
        started.append(process)
        await process.wait_ready(client)
        return process

    yield start
    for process in started:
        await process.stop()


def chat(
    client: aiohttp.ClientSession, gateway: GatewayProcess, token: str, *, stream: bool
) -> Any:
    """POST a chat completion to the gateway (use as an async context manager)."""
    body = {"model": "openai/gpt-4o-mini", "stream": stream, "messages": []}
    return client.post(
        gateway.url / CHAT_PATH, json=body, headers={"Authorization": f"Bearer {token}"}
    )


async def refusal(
    client: aiohttp.ClientSession, gateway: GatewayProcess, token: str, *, stream: bool
) -> tuple[int, str | None, float]:
    """Status, error_type and seconds taken of a request the gateway refuses."""
    started = time.monotonic()
    async with chat(client, gateway, token, stream=stream) as resp:
        body = await resp.json()
    return resp.status, body.get("error_type"), time.monotonic() - started


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
async def test_upstream_refusing_connections_is_502_upstream_unreachable(
    start_gateway: StartGateway, client: aiohttp.ClientSession, token: str, stream: bool
) -> None:
    """Nothing listens at the upstream's address: 502 upstream_unreachable, at once."""
    gateway = await start_gateway(f"http://127.0.0.1:{free_port()}/api/v1")
    status, reason, took = await refusal(client, gateway, token, stream=stream)
    assert (status, reason) == (502, "upstream_unreachable")
    assert took < 1.0, took


@contextlib.asynccontextmanager
async def hanging_up_upstream() -> AsyncIterator[str]:
    """An upstream that reads each request and closes the connection without a word."""

    async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.close()

    server = await asyncio.start_server(hang_up, "127.0.0.1", 0)
    try:
        yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/api/v1"
    finally:
        server.close()
        await server.wait_closed()


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
async def test_upstream_closing_before_its_headers_is_502_upstream_unreachable(
    start_gateway: StartGateway, client: aiohttp.ClientSession, token: str, stream: bool
) -> None:
    """The upstream drops the connection before answering: 502 upstream_unreachable, at once."""
    async with hanging_up_upstream() as url:
        gateway = await start_gateway(url)
        status, reason, took = await refusal(client, gateway, token, stream=stream)
    assert (status, reason) == (502, "upstream_unreachable")
    assert took < 1.0, took


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
async def test_upstream_without_headers_in_time_is_504_and_is_cancelled(
    start_gateway: StartGateway,
    upstream: RunningUpstream,
    client: aiohttp.ClientSession,
    token: str,
    stream: bool,
) -> None:
    """No upstream headers within UPSTREAM_TIMEOUT_SECONDS: 504 upstream_timeout, upstream cut."""
    gateway = await start_gateway(upstream.url, UPSTREAM_TIMEOUT_SECONDS=0.5)
    upstream.settings.delay_seconds = 10
    status, reason, took = await refusal(client, gateway, token, stream=stream)
    assert (status, reason) == (504, "upstream_timeout")
    assert 0.45 < took < 1.2, took
    await upstream.recorder.wait_for(lambda r: r.cancelled == 1, timeout=DEADLINE_SECONDS)
    assert upstream.recorder.completed == 0


async def test_upstream_dying_mid_stream_never_looks_complete(
    start_gateway: StartGateway,
    upstream: RunningUpstream,
    client: aiohttp.ClientSession,
    token: str,
) -> None:
    """The upstream dies after 2 of 5 chunks: the client gets them, an error or a cut, no [DONE]."""
    gateway = await start_gateway(upstream.url)
    upstream.settings.chunk_count = 5
    upstream.settings.die_after_chunks = 2
    lines: list[bytes] = []
    broken = False
    async with asyncio.timeout(DEADLINE_SECONDS), chat(client, gateway, token, stream=True) as resp:
        assert resp.status == 200
        try:
            while line := await resp.content.readline():
                lines.append(line)
        except aiohttp.ClientPayloadError:
            broken = True
    body = b"".join(lines)
    assert body.count(b'"content":"tok') == 2, body
    error_events = [line for line in lines if line.startswith(b'data: {"error"')]
    assert broken or error_events, body
    assert DONE_FRAME not in body, body


@pytest.mark.parametrize(
    ("chunked", "reset"),
    [(False, False), (True, False), (False, True), (True, True)],
    ids=["content-length", "chunked", "content-length-rst", "chunked-rst"],
)
async def test_upstream_dying_mid_json_body_never_looks_complete(
    start_gateway: StartGateway,
    client: aiohttp.ClientSession,
    token: str,
    chunked: bool,
    reset: bool,
) -> None:
    """The upstream dies halfway through a JSON body: the client's body breaks off too."""
    broken_upstream = await BrokenJsonUpstream(
        chunked=chunked, hold_open=False, reset=reset
    ).start()
    try:
        gateway = await start_gateway(broken_upstream.url)
        received = b""
        async with (
            asyncio.timeout(DEADLINE_SECONDS),
            chat(client, gateway, token, stream=False) as resp,
        ):
            assert resp.status == 200
            with pytest.raises(aiohttp.ClientPayloadError):
                async for chunk in resp.content.iter_any():
                    received += chunk
    finally:
        await broken_upstream.close()
    assert BrokenJsonUpstream.BODY.startswith(received), received
    assert len(received) < len(BrokenJsonUpstream.BODY)
    with pytest.raises(ValueError):
        json.loads(received)
