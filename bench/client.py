"""Timing as the client sees it, with aiohttp on uvloop: low-rate latency, streams, memory.

At concurrency 1 a Python client is accurate enough and sees what wrk cannot: when the
first byte of a stream arrives, and the gap between one content chunk and the next. The
memory scenario holds many streams open at once and counts every one that fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Final, TypeVar

import aiohttp

T = TypeVar("T")
TokenSource = Callable[[], str | None]
_DONE: Final = b"data: [DONE]"
_WARMUP_REQUESTS: Final = 2
# A request slower than this is an error, not a sample (wrk uses the same limit).
REQUEST_TIMEOUT_SECONDS: Final = 10.0


def run_async(coroutine: Awaitable[T]) -> T:
    """Run a coroutine to completion on uvloop (the stdlib loop if uvloop is missing)."""
    try:
        import uvloop

        factory: Callable[[], asyncio.AbstractEventLoop] | None = uvloop.new_event_loop
    except ImportError:
        factory = None
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(_as_coroutine(coroutine))


async def _as_coroutine(awaitable: Awaitable[T]) -> T:
    """Wrap any awaitable so asyncio.Runner accepts it."""
    return await awaitable


def _headers(token: str | None) -> dict[str, str]:
    """Content type and, when there is a token, the bearer Authorization."""
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    return headers


@dataclass
class Timing:
    """One response: total time, first body byte, and when each SSE data event arrived."""

    status: int
    latency_ns: int
    ttfb_ns: int | None
    event_ns: list[int]
    saw_done: bool


async def timed_request(
    session: aiohttp.ClientSession, url: str, token: str | None, body: bytes
) -> Timing:
    """POST ``body`` and time the response's arrival, event by event."""
    started = time.perf_counter_ns()
    ttfb: int | None = None
    events: list[int] = []
    pending = b""
    saw_done = False
    async with session.post(url, data=body, headers=_headers(token)) as response:
        async for chunk in response.content.iter_any():
            now = time.perf_counter_ns()
            ttfb = now - started if ttfb is None else ttfb
            pending += chunk
            *complete, pending = pending.split(b"\n\n")
            for event in complete:
                if event.startswith(_DONE):
                    saw_done = True
                elif event.startswith(b"data: "):
                    events.append(now - started)
    return Timing(response.status, time.perf_counter_ns() - started, ttfb, events, saw_done)


@dataclass
class ClientSamples:
    """Microsecond samples from a run of sequential requests."""

    latency_us: list[float] = field(default_factory=list)
    ttfb_us: list[float] = field(default_factory=list)
    gap_us: list[float] = field(default_factory=list)
    statuses: Counter[int] = field(default_factory=Counter)
    errors: int = 0

    def add(self, timing: Timing, content_chunks: int) -> None:
        """Keep one response's figures; gaps only between content chunks."""
        self.statuses[timing.status] += 1
        self.latency_us.append(timing.latency_ns / 1e3)
        if timing.ttfb_ns is not None and timing.event_ns:
            self.ttfb_us.append(timing.ttfb_ns / 1e3)
        content = timing.event_ns[:content_chunks]
        self.gap_us.extend((b - a) / 1e3 for a, b in itertools.pairwise(content))


async def sequential(
    url: str, tokens: TokenSource, body: bytes, seconds: float, content_chunks: int
) -> ClientSamples:
    """One request at a time for ``seconds`` (after a short untimed warm-up)."""
    samples = ClientSamples()
    connector = aiohttp.TCPConnector(limit=1)
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_SECONDS)
    async with aiohttp.ClientSession(
        connector=connector, timeout=timeout, auto_decompress=False
    ) as session:
        for _ in range(_WARMUP_REQUESTS):
            with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                await timed_request(session, url, tokens(), body)
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            try:
                timing = await timed_request(session, url, tokens(), body)
            except (aiohttp.ClientError, TimeoutError):
                samples.errors += 1
                continue
            samples.add(timing, content_chunks)
    return samples


@dataclass
class StreamHold:
    """How many streams opened, peaked together, finished cleanly, or failed and why."""

    requested: int
    completed: int = 0
    open_now: int = 0
    peak_open: int = 0
    statuses: Counter[int] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    seconds: float = 0.0


async def _hold_one(
    session: aiohttp.ClientSession, url: str, token: str | None, body: bytes, hold: StreamHold
) -> None:
    """Open one stream, read it to the end, and record how it went."""
    try:
        async with session.post(url, data=body, headers=_headers(token)) as response:
            hold.statuses[response.status] += 1
            hold.open_now += 1
            hold.peak_open = max(hold.peak_open, hold.open_now)
            try:
                data = await response.read()
            finally:
                hold.open_now -= 1
    except (aiohttp.ClientError, TimeoutError) as exc:
        hold.errors[type(exc).__name__] += 1
        return
    if response.status != 200:
        hold.errors[f"status {response.status}"] += 1
    elif _DONE not in data:
        hold.errors["no [DONE]"] += 1
    else:
        hold.completed += 1


async def hold_streams(
    url: str, tokens: TokenSource, body: bytes, count: int, ramp_seconds: float
) -> StreamHold:
    """Open ``count`` streams spread over ``ramp_seconds`` and wait for all of them."""
    hold = StreamHold(count)
    connector = aiohttp.TCPConnector(limit=0, force_close=True)
    timeout = aiohttp.ClientTimeout(total=120)
    started = time.monotonic()
    async with aiohttp.ClientSession(
        connector=connector, timeout=timeout, auto_decompress=False
    ) as session:
        tasks = []
        for index in range(count):
            delay = ramp_seconds * index / count
            tasks.append(
                asyncio.create_task(_after(delay, _hold_one(session, url, tokens(), body, hold)))
            )
        await asyncio.gather(*tasks)
    hold.seconds = time.monotonic() - started
    return hold


async def _after(delay_seconds: float, coroutine: Awaitable[None]) -> None:
    """Await ``coroutine`` after a delay."""
    await asyncio.sleep(delay_seconds)
    await coroutine
