"""Server-sent event streams through the gateway: bytes, timing, disconnects, broken upstreams.

Every test runs a real gateway in front of the fake OpenRouter and reads the stream as the
Kilo Code extension would, line by line as it arrives.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from bench.fake_upstream import DONE_FRAME, MID_STREAM_ERROR_MODEL, RunningUpstream
from tests.conftest import RunningGateway
from tests.factories import Seed

CHAT_PATH = "/api/openrouter/chat/completions"
DEADLINE_SECONDS = 2.0
STREAM_BODY: dict[str, Any] = {
    "model": "openai/gpt-4o-mini",
    "stream": True,
    "messages": [{"role": "user", "content": "hello"}],
}


async def trialing_token(seed: Seed) -> str:
    """A token of the owner of a new, trialing organization."""
    org_id = await seed.org()
    _user_id, token = await seed.member_with_key(org_id)
    return token


def stream_request(
    client: aiohttp.ClientSession,
    gateway: RunningGateway,
    token: str,
    body: dict[str, Any] = STREAM_BODY,
) -> Any:
    """POST a streaming chat completion to the gateway (use as an async context manager)."""
    return client.post(
        str(gateway.url) + CHAT_PATH, json=body, headers={"Authorization": f"Bearer {token}"}
    )


async def active_streams(client: aiohttp.ClientSession, gateway: RunningGateway) -> float:
    """The gateway's gateway_active_streams gauge, read from /metrics."""
    async with client.get(str(gateway.url) + "/metrics") as resp:
        text = await resp.text()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "gateway_active_streams":
                return float(sample.value)
    raise AssertionError("gateway_active_streams is not exported")


async def wait_for_active_streams(
    client: aiohttp.ClientSession, gateway: RunningGateway, expected: float
) -> None:
    """Poll /metrics until the active-streams gauge reads `expected`, or fail at the deadline."""
    deadline = time.monotonic() + DEADLINE_SECONDS
    while (value := await active_streams(client, gateway)) != expected:
        assert time.monotonic() < deadline, f"gateway_active_streams stayed {value}"
        await asyncio.sleep(0.02)


async def test_stream_passes_through_byte_for_byte(
    gateway: RunningGateway, upstream: RunningUpstream, client: aiohttp.ClientSession, seed: Seed
) -> None:
    """An SSE stream (comment, chunks, usage, [DONE]) reaches the client byte for byte."""
    token = await trialing_token(seed)
    async with stream_request(client, gateway, token) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        proxied = await resp.read()
    async with client.post(upstream.url + "/chat/completions", json=STREAM_BODY) as resp:
        direct = await resp.read()
    assert proxied == direct
    assert proxied.startswith(b": OPENROUTER PROCESSING\n\n")
    assert b'"usage":{' in proxied
    assert proxied.endswith(DONE_FRAME)


async def test_chunks_arrive_as_the_upstream_sends_them(
    gateway: RunningGateway, upstream: RunningUpstream, client: aiohttp.ClientSession, seed: Seed
) -> None:
    """Content chunks reach the client spaced as sent, not buffered until the end."""
    upstream.settings.chunk_count = 4
    upstream.settings.chunk_interval_seconds = 0.25
    token = await trialing_token(seed)
    content_arrivals: list[float] = []
    async with stream_request(client, gateway, token) as resp:
        while line := await resp.content.readline():
            if line.startswith(b"data: {") and b'"content":"tok' in line:
                content_arrivals.append(time.monotonic())
        ended = time.monotonic()
    assert len(content_arrivals) == 4
    gaps = [later - earlier for earlier, later in itertools.pairwise(content_arrivals)]
    assert all(gap >= 0.15 for gap in gaps), gaps
    assert ended - content_arrivals[0] >= 0.5


async def test_client_disconnect_mid_stream_cancels_upstream(
    gateway: RunningGateway, upstream: RunningUpstream, client: aiohttp.ClientSession, seed: Seed
) -> None:
    """A client leaving mid-stream cancels the upstream request and ends the active stream."""
    upstream.settings.chunk_count = 50
    upstream.settings.chunk_interval_seconds = 0.1
    token = await trialing_token(seed)
    streams_before = await active_streams(client, gateway)
    resp = await stream_request(client, gateway, token)
    while not (await resp.content.readline()).startswith(b"data: {"):
        pass
    assert await active_streams(client, gateway) == streams_before + 1
    resp.close()
    await upstream.recorder.wait_for(lambda r: r.cancelled == 1, timeout=2)
    assert upstream.recorder.completed == 0
    await wait_for_active_streams(client, gateway, streams_before)


async def test_client_leaving_before_first_byte_cancels_upstream(
    gateway: RunningGateway, upstream: RunningUpstream, client: aiohttp.ClientSession, seed: Seed
) -> None:
    """A client that gives up while the upstream has not answered yet cancels the upstream."""
    upstream.settings.delay_seconds = 5
    token = await trialing_token(seed)

    async def request() -> None:
        async with stream_request(client, gateway, token) as resp:
            await resp.read()

    with pytest.raises(TimeoutError):
        await asyncio.wait_for(request(), timeout=0.3)
    await upstream.recorder.wait_for(lambda r: r.cancelled == 1, timeout=2)
    assert upstream.recorder.completed == 0


async def test_upstream_dying_mid_stream_never_looks_complete(
    gateway: RunningGateway, upstream: RunningUpstream, client: aiohttp.ClientSession, seed: Seed
) -> None:
    """When the upstream dies mid-stream the client gets the first chunks, then no [DONE]."""
    upstream.settings.chunk_count = 5
    upstream.settings.die_after_chunks = 2
    token = await trialing_token(seed)
    lines: list[bytes] = []
    payload_error = False
    async with stream_request(client, gateway, token) as resp:
        assert resp.status == 200
        try:
            while line := await resp.content.readline():
                lines.append(line)
        except aiohttp.ClientPayloadError:
            payload_error = True
    content = [line for line in lines if b'"content":"tok' in line]
    assert len(content) == 2
    assert b'"content":"tok0 "' in content[0] and b'"content":"tok1 "' in content[1]
    error_events = [line for line in lines if line.startswith(b'data: {"error"')]
    assert payload_error or error_events
    assert not any(line.startswith(b"data: [DONE]") for line in lines)


async def test_mid_stream_error_event_passes_through(
    gateway: RunningGateway, upstream: RunningUpstream, client: aiohttp.ClientSession, seed: Seed
) -> None:
    """An in-band error event the upstream sends mid-stream reaches the client unchanged."""
    body = {**STREAM_BODY, "model": MID_STREAM_ERROR_MODEL}
    token = await trialing_token(seed)
    async with stream_request(client, gateway, token, body) as resp:
        assert resp.status == 200
        proxied = await resp.read()
    async with client.post(upstream.url + "/chat/completions", json=body) as resp:
        direct = await resp.read()
    assert proxied == direct
    assert b'"error":{"code":502,"message":"Provider disconnected"}' in proxied
    assert DONE_FRAME not in proxied
