"""Tests for the fake OpenRouter upstream shared by the test suite and the benchmarks."""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from bench.fake_upstream import (
    MID_STREAM_ERROR_MODEL,
    RECORDER,
    RunningUpstream,
    UpstreamSettings,
    create_upstream_app,
    start_upstream,
)

CHAT_STREAM = {"model": "openai/gpt-4o-mini", "stream": True, "messages": []}


@pytest.fixture
async def upstream() -> AsyncIterator[RunningUpstream]:
    """A fake upstream on a free port with default settings."""
    async with await start_upstream() as running:
        yield running


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    """A plain client session."""
    async with aiohttp.ClientSession() as client:
        yield client


def _events(raw: str) -> list[str]:
    """Split an SSE body into its events (without the blank-line terminators)."""
    assert raw.endswith("\n\n")
    return raw[:-2].split("\n\n")


def _data(event: str) -> Any:
    """Decode a ``data: {json}`` event."""
    assert event.startswith("data: {"), event
    return json.loads(event.removeprefix("data: "))


@pytest.mark.parametrize("base", ["url", "root_url"])
async def test_stream_shape(
    upstream: RunningUpstream, session: aiohttp.ClientSession, base: str
) -> None:
    upstream.settings.chunk_count = 4
    async with session.post(f"{getattr(upstream, base)}/chat/completions", json=CHAT_STREAM) as r:
        assert r.status == 200
        assert r.headers["Content-Type"].startswith("text/event-stream")
        assert r.headers["Cache-Control"] == "no-cache"
        assert r.headers["Transfer-Encoding"] == "chunked"
        events = _events(await r.text())

    assert events[0] == ": OPENROUTER PROCESSING"
    content = [_data(e) for e in events[1:5]]
    assert [c["choices"][0]["delta"]["content"] for c in content] == [
        "tok0 ",
        "tok1 ",
        "tok2 ",
        "tok3 ",
    ]
    assert {c["object"] for c in content} == {"chat.completion.chunk"}
    assert all(c["id"].startswith("gen-") and c["model"] == "openai/gpt-4o-mini" for c in content)
    finish = _data(events[5])
    assert finish["choices"][0]["finish_reason"] == "stop"
    usage = _data(events[6])
    assert usage["choices"] == []
    assert usage["usage"] == {
        "prompt_tokens": 11,
        "completion_tokens": 7,
        "total_tokens": 18,
        "cost": 0.00042,
        "is_byok": False,
    }
    assert events[7:] == ["data: [DONE]"]
    await upstream.recorder.wait_for(lambda rec: rec.completed == 1)
    assert upstream.recorder.last.json()["stream"] is True


async def test_stream_without_comment_or_usage(
    upstream: RunningUpstream, session: aiohttp.ClientSession
) -> None:
    upstream.settings.keepalive_comment = False
    upstream.settings.send_usage = False
    async with session.post(f"{upstream.url}/chat/completions", json=CHAT_STREAM) as r:
        events = _events(await r.text())
    assert [e.startswith("data: {") for e in events] == [True] * 4 + [False]
    assert all("usage" not in _data(e) for e in events[:4])
    assert events[-1] == "data: [DONE]"


async def test_chunks_are_spaced_in_time(session: aiohttp.ClientSession) -> None:
    settings = UpstreamSettings(chunk_count=3, chunk_interval_seconds=0.2)
    async with await start_upstream(settings) as upstream:
        arrivals: list[float] = []
        async with session.post(f"{upstream.url}/chat/completions", json=CHAT_STREAM) as r:
            async for line in r.content:
                if line.startswith(b"data: {") and b'"content":"tok' in line:
                    arrivals.append(time.monotonic())
    assert len(arrivals) == 3
    gaps = [later - earlier for earlier, later in itertools.pairwise(arrivals)]
    assert all(gap >= 0.15 for gap in gaps), gaps


async def test_delay_before_first_byte(session: aiohttp.ClientSession) -> None:
    async with await start_upstream(UpstreamSettings(delay_seconds=0.3)) as upstream:
        started = time.monotonic()
        async with session.get(f"{upstream.url}/models") as r:
            assert r.status == 200
        assert time.monotonic() - started >= 0.25


async def test_non_stream_chat(upstream: RunningUpstream, session: aiohttp.ClientSession) -> None:
    upstream.settings.cost_usd = 0.5
    request = {"model": "anthropic/claude-3.5-sonnet", "messages": []}
    async with session.post(f"{upstream.url}/chat/completions", json=request) as r:
        assert r.status == 200
        assert r.content_type == "application/json"
        body = await r.json()
    assert body["id"].startswith("gen-")
    assert body["object"] == "chat.completion"
    assert body["model"] == "anthropic/claude-3.5-sonnet"
    assert body["choices"][0]["message"]["content"] == "tok0 tok1 tok2 "
    assert body["choices"][0]["finish_reason"] == "stop"
    assert body["usage"]["cost"] == 0.5
    assert body["usage"]["total_tokens"] == 18


async def test_text_completions(upstream: RunningUpstream, session: aiohttp.ClientSession) -> None:
    request = {"model": "openai/gpt-4o-mini", "prompt": "hi"}
    async with session.post(f"{upstream.root_url}/completions", json=request) as r:
        body = await r.json()
    assert body["object"] == "text_completion"
    assert body["choices"][0]["text"] == "tok0 tok1 tok2 "
    assert body["usage"]["cost"] == 0.00042

    async with session.post(f"{upstream.url}/completions", json={**request, "stream": True}) as r:
        events = _events(await r.text())
    assert [_data(e)["choices"][0]["text"] for e in events[1:4]] == ["tok0 ", "tok1 ", "tok2 "]
    assert events[-1] == "data: [DONE]"


async def test_fail_status_is_live(
    upstream: RunningUpstream, session: aiohttp.ClientSession
) -> None:
    upstream.settings.fail_status = 429
    async with session.post(f"{upstream.url}/chat/completions", json=CHAT_STREAM) as r:
        assert r.status == 429
        assert r.content_type == "application/json"
        body = await r.json()
    assert body["error"]["code"] == 429
    assert body["error"]["message"]

    upstream.settings.fail_status = None
    async with session.post(f"{upstream.url}/chat/completions", json=CHAT_STREAM) as r:
        assert r.status == 200
        await r.read()


async def test_die_after_chunks_truncates_body(
    upstream: RunningUpstream, session: aiohttp.ClientSession
) -> None:
    upstream.settings.chunk_count = 5
    upstream.settings.die_after_chunks = 2
    received: list[bytes] = []
    async with session.post(f"{upstream.url}/chat/completions", json=CHAT_STREAM) as r:
        assert r.status == 200
        with pytest.raises(aiohttp.ClientPayloadError):
            async for line in r.content:
                if line.startswith(b"data: "):
                    received.append(line)
    assert len(received) == 2
    await upstream.recorder.wait_for(lambda rec: rec.aborted == 1 and rec.in_flight == 0)
    assert upstream.recorder.completed == 0


async def test_mid_stream_error(upstream: RunningUpstream, session: aiohttp.ClientSession) -> None:
    request = {**CHAT_STREAM, "model": MID_STREAM_ERROR_MODEL}
    async with session.post(f"{upstream.url}/chat/completions", json=request) as r:
        assert r.status == 200
        events = _events(await r.text())
    assert events[0] == ": OPENROUTER PROCESSING"
    assert _data(events[1])["choices"][0]["delta"]["content"] == "tok0 "
    error = _data(events[2])
    assert error["object"] == "chat.completion.chunk"
    assert error["error"] == {"code": 502, "message": "Provider disconnected"}
    assert error["choices"][0]["finish_reason"] == "error"
    assert len(events) == 3


async def test_client_disconnect_counts_as_cancelled(
    session: aiohttp.ClientSession,
) -> None:
    settings = UpstreamSettings(chunk_count=50, chunk_interval_seconds=0.1)
    async with await start_upstream(settings) as upstream:
        r = await session.post(f"{upstream.url}/chat/completions", json=CHAT_STREAM)
        async for line in r.content:
            if line.startswith(b"data: {"):
                break
        await upstream.recorder.wait_for(lambda rec: rec.in_flight == 1)
        r.close()
        await upstream.recorder.wait_for(lambda rec: rec.cancelled == 1 and rec.in_flight == 0)
        assert upstream.recorder.completed == 0


async def test_echo_and_recording(
    upstream: RunningUpstream, session: aiohttp.ClientSession
) -> None:
    headers = {"Authorization": "Bearer sk-test", "X-Title": "kilo"}
    async with session.put(
        f"{upstream.url}/generation?id=gen-1&x=%20y", data=b"hello", headers=headers
    ) as r:
        assert r.status == 200
        echo = await r.json()
    assert echo["method"] == "PUT"
    assert echo["path"] == "/api/v1/generation"
    assert echo["query_string"] == "id=gen-1&x=%20y"
    assert echo["headers"]["authorization"] == ["Bearer sk-test"]
    assert echo["headers"]["x-title"] == ["kilo"]
    assert echo["body"] == "hello"

    recorded = upstream.recorder.last
    assert (recorded.method, recorded.path, recorded.body) == (
        "PUT",
        "/api/v1/generation",
        b"hello",
    )
    assert recorded.query_string == "id=gen-1&x=%20y"
    assert recorded.headers["authorization"] == "Bearer sk-test"


async def test_models_listing(upstream: RunningUpstream, session: aiohttp.ClientSession) -> None:
    for base in (upstream.url, upstream.root_url):
        async with session.get(f"{base}/models") as r:
            assert r.status == 200
            ids = [m["id"] for m in (await r.json())["data"]]
        assert len(ids) >= 2
        assert any(model_id.endswith(":free") for model_id in ids)


async def test_wait_for_times_out_with_state() -> None:
    recorder = create_upstream_app()[RECORDER]
    with pytest.raises(TimeoutError, match="cancelled=0"):
        await recorder.wait_for(lambda rec: rec.cancelled > 0, timeout=0.05)


async def test_invalid_json_is_400(
    upstream: RunningUpstream, session: aiohttp.ClientSession
) -> None:
    async with session.post(f"{upstream.url}/chat/completions", data=b"not json") as r:
        assert r.status == 400
        assert (await r.json())["error"]["code"] == 400
