"""An upstream that breaks HTTP/1.1, end to end: a real gateway in front of a raw server.

The upstream is an `asyncio.start_server` loopback server that answers every request with
the bytes a test gives; the client is aiohttp, as the extension is. Whatever the upstream
sent, the caller gets the gateway's 502 `upstream_protocol_error` envelope and none of
the upstream's bytes.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest

CHAT_PATH = "/api/openrouter/chat/completions"
REASON = "upstream_protocol_error"
EVIL_COOKIE = b"session=evil"


@dataclass
class RawUpstream:
    """A loopback server that writes `response` for each request it reads."""

    response: bytes
    url: str = ""
    requests: int = 0
    closed_by_client: int = 0
    _writers: list[asyncio.StreamWriter] = field(default_factory=list)

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.append(writer)
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            await reader.readexactly(length)
            self.requests += 1
            writer.write(self.response)
            await writer.drain()
            if not await reader.read(1):
                self.closed_by_client += 1
        except (ConnectionError, asyncio.IncompleteReadError):
            self.closed_by_client += 1
        finally:
            writer.close()


@contextlib.asynccontextmanager
async def raw_upstream(response: bytes) -> AsyncIterator[RawUpstream]:
    upstream = RawUpstream(response)
    server = await asyncio.start_server(upstream.serve, "127.0.0.1", 0)
    upstream.url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/api/v1"
    try:
        yield upstream
    finally:
        for writer in upstream._writers:
            writer.close()
        server.close()
        await server.wait_closed()


async def eventually(predicate: Callable[[], bool], within: float = 2.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while not predicate():
        assert loop.time() < deadline, f"condition not met within {within} s"
        await asyncio.sleep(0.01)


def with_body(head: bytes) -> bytes:
    """The head (status line and fields, no blank line) with a JSON body."""
    body = b'{"id":"gen-1","choices":[]}'
    return head + b"\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%b" % (
        len(body),
        body,
    )


BROKEN_RESPONSES = [
    pytest.param(
        with_body(b"HTTP/1.1 200 OK\r\nX-Evil: a\nSet-Cookie: session=evil"),
        id="bare-lf-header-injection",
    ),
    pytest.param(
        with_body(b"HTTP/1.1 200 OK\r\nX-Evil: a\rSet-Cookie: session=evil"),
        id="bare-cr-header-injection",
    ),
    pytest.param(with_body(b"HTTP/1.1 200 OK\r\nX-Evil: a\x00b"), id="nul-in-value"),
    pytest.param(with_body(b"HTTP/1.1 200 OK\nSet-Cookie: session=evil"), id="bare-lf-in-reason"),
    pytest.param(with_body(b"HTTP/1.1 200 O\x00K\r\nX-A: 1"), id="nul-in-reason"),
    pytest.param(with_body(b"HTTP/1.1 099 Early\r\nSet-Cookie: session=evil"), id="status-099"),
    pytest.param(
        b"HTTP/1.1 100 Continue\r\n\r\n" * 2000 + with_body(b"HTTP/1.1 200 OK\r\nX-A: 1"),
        id="2000-interim-heads",
    ),
    pytest.param(
        b"HTTP/1.1 200 OK\r\nSet-Cookie: session=evil\r\nContent-Length: "
        + b"9" * 5000
        + b"\r\n\r\n",
        id="5000-digit-content-length",
    ),
    pytest.param(
        with_body(b"HTTP/1.1 200 OK\r\nSet-Cookie: session=evil\r\nX-Long: " + b"a" * 9000),
        id="9000-byte-header-line",
    ),
]


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
@pytest.mark.parametrize("response", BROKEN_RESPONSES)
async def test_a_response_that_breaks_http_is_502_upstream_protocol_error(
    gateway_factory: Callable[..., Any],
    client: aiohttp.ClientSession,
    token: str,
    response: bytes,
    stream: bool,
) -> None:
    async with raw_upstream(response) as upstream:
        gateway = await gateway_factory(OPENROUTER_BASE_URL=upstream.url)
        body = {"model": "openai/gpt-4o-mini", "stream": stream, "messages": []}
        async with client.post(
            str(gateway.url) + CHAT_PATH, json=body, headers={"Authorization": f"Bearer {token}"}
        ) as resp:
            raw_headers = resp.raw_headers
            envelope = await resp.json()
        assert resp.status == 502
        assert envelope["error_type"] == REASON
        assert envelope["error"]["code"] == 502
        assert envelope["error"]["metadata"] == {"reason": REASON}
        assert "could not read" in envelope["error"]["message"]
        assert "Set-Cookie" not in resp.headers
        assert not [value for _name, value in raw_headers if EVIL_COOKIE in value]
        assert resp.headers["X-Request-Id"]
        # The gateway dropped the connection rather than keep it for another request.
        assert upstream.requests == 1
        await eventually(lambda: upstream.closed_by_client == 1)
