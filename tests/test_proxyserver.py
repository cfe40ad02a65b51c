"""The proxy route's own connection handler: what it serves itself, what it hands to aiohttp,
and that a connection behaves the same either way.

First a table of request heads (a pure function). Then a real gateway on a real port,
spoken to byte for byte on raw sockets: keep-alive, pipelining, a body or a head that
arrives in pieces, a connection handed over half-way, refusals, `Connection: close`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import pytest
from multidict import CIMultiDict

from bench.fake_upstream import RunningUpstream
from gateway import config as gateway_config
from gateway.serve.heads import MAX_HEAD_BYTES, parse_head
from tests.conftest import RunningGateway, start_gateway
from tests.factories import Seed
from tests.test_proxy import EXPIRED_AGE, org_member

pytestmark = pytest.mark.usefixtures("blockbuster")

CHAT_PATH = "/api/openrouter/chat/completions"
MAX_BODY = 10_000
DEADLINE_SECONDS = 5.0


def head(*lines: str) -> bytes:
    """A request head with its blank line, as the connection hands it to `parse_head`."""
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


POST_LINE = f"POST {CHAT_PATH} HTTP/1.1"


# --- Which heads are served here ---------------------------------------------------------


def test_a_plain_completion_request_is_served_here() -> None:
    parsed = parse_head(
        head(POST_LINE, "Host: gw", "Authorization: Bearer t", "Content-Length: 12"), MAX_BODY
    )
    assert parsed is not None
    assert (parsed.method, parsed.raw_path, parsed.query_string) == ("POST", CHAT_PATH, "")
    assert parsed.content_length == 12
    assert parsed.headers["authorization"] == "Bearer t"
    assert parsed.close is False


def test_values_are_trimmed_repeated_headers_kept_and_the_query_split_off() -> None:
    parsed = parse_head(
        head(
            "GET /api/openrouter/models?supported_parameters=tools&x=1 HTTP/1.1",
            "Host: gw",
            "X-Title: \t Kilo Code \t",
            "Accept: a",
            "Accept: b",
        ),
        MAX_BODY,
    )
    assert parsed is not None
    assert parsed.raw_path == "/api/openrouter/models"
    assert parsed.query_string == "supported_parameters=tools&x=1"
    assert parsed.headers["X-Title"] == "Kilo Code"
    assert parsed.headers.getall("accept") == ["a", "b"]
    assert parsed.content_length == 0


@pytest.mark.parametrize(
    ("connection", "close"),
    [("close", True), ("keep-alive", False), ("Keep-Alive, Close", True), ("x-foo", False)],
)
def test_connection_close_is_noticed(connection: str, close: bool) -> None:
    parsed = parse_head(head(POST_LINE, "Host: gw", f"Connection: {connection}"), MAX_BODY)
    assert parsed is not None and parsed.close is close


@pytest.mark.parametrize(
    "raw",
    [
        head("GET /healthz HTTP/1.1", "Host: gw"),  # another route
        head("GET /api/organizations/x/usage HTTP/1.1"),
        head(f"POST {CHAT_PATH} HTTP/1.0", "Content-Length: 2"),  # HTTP/1.0
        head(f"HEAD {CHAT_PATH} HTTP/1.1"),  # no body in the answer: aiohttp's
        head(f"post {CHAT_PATH} HTTP/1.1"),  # methods are case-sensitive
        head(f"CONNECT {CHAT_PATH} HTTP/1.1"),
        head(f"POST http://gw{CHAT_PATH} HTTP/1.1"),  # absolute form
        head("POST /api/openrouter/chat%2Fcompletions HTTP/1.1"),  # percent-encoding
        head("POST /api/openrouter//chat/completions HTTP/1.1"),  # empty segment
        head("POST /api/openrouter/./chat/completions HTTP/1.1"),  # dot segments
        head("POST /api/openrouter/../healthz HTTP/1.1"),
        head(f"POST {CHAT_PATH}?a=1#frag HTTP/1.1"),  # a fragment
        head(f"POST {CHAT_PATH}?a=\x7f HTTP/1.1"),
        head(POST_LINE, "Transfer-Encoding: chunked"),  # framing aiohttp reads
        head(POST_LINE, "Content-Length: 2", "Transfer-Encoding: chunked"),
        head(POST_LINE, "Content-Encoding: gzip", "Content-Length: 2"),  # decoded by aiohttp
        head(POST_LINE, "Expect: 100-continue", "Content-Length: 2"),
        head(POST_LINE, "Upgrade: websocket", "Connection: upgrade"),
        head(POST_LINE, "Content-Length: 2", "Content-Length: 2"),  # twice
        head(POST_LINE, "Content-Length: +2"),
        head(POST_LINE, "Content-Length: 0x2"),
        head(POST_LINE, "Content-Length: "),
        head(POST_LINE, f"Content-Length: {MAX_BODY + 1}"),  # aiohttp answers 413
        head(POST_LINE, "Content-Length: " + "9" * 16),
        head(POST_LINE, "Content-Length: " + "1" * 5000),  # more digits than int() reads
        head(POST_LINE, "X-A: b", " folded"),  # obs-fold
        head(POST_LINE, "X-A b"),  # no colon
        head(POST_LINE, "X-A : b"),  # space before the colon
        head(POST_LINE, ": b"),  # no name
        head(POST_LINE, "X-A: b\x00c"),  # NUL
        head(POST_LINE, "X-A: b\nX-B: c"),  # a bare line feed
        head(POST_LINE, "X-A: b\rc"),  # a bare carriage return
        head(POST_LINE, "X-Title: Kilo Cöde"),  # not ASCII
        head(POST_LINE, "X-Big: " + "a" * MAX_HEAD_BYTES),  # past the head limit
    ],
)
def test_anything_unusual_is_handed_to_aiohttp(raw: bytes) -> None:
    with_host = raw.replace(b"\r\n", b"\r\nHost: gw\r\n", 1)  # the one thing wrong is the row's
    assert parse_head(with_host, MAX_BODY) is None


@pytest.mark.parametrize(
    "raw",
    [
        head(POST_LINE, "Content-Length: 2"),  # no Host
        head(POST_LINE, "Host: gw", "Host: gw"),
        head(POST_LINE, "Host: gw", "host: other"),
        head(POST_LINE, "Host: gw", *(f"X-{i}: {i}" for i in range(128))),  # 129 lines
        # Found by the differential test: aiohttp refuses these headers twice.
        head(POST_LINE, "Host: gw", "Content-Type: a", "Content-Type: b"),
        head(POST_LINE, "Host: gw", "User-Agent: a", "user-agent: a"),
    ],
)
def test_heads_aiohttp_refuses_are_handed_to_it(raw: bytes) -> None:
    assert parse_head(raw, MAX_BODY) is None


def test_as_many_header_lines_as_aiohttp_takes_are_served_here() -> None:
    raw = head(POST_LINE, "Host: gw", *(f"X-{i}: {i}" for i in range(127)))
    assert parse_head(raw, MAX_BODY) is not None


# --- A real gateway, raw sockets ---------------------------------------------------------


@dataclass
class Response:
    status: int
    headers: CIMultiDict[str]
    body: bytes

    def json(self) -> object:
        return json.loads(self.body)


async def read_response(reader: asyncio.StreamReader) -> Response:
    """One response from a keep-alive connection (Content-Length or chunked)."""
    async with asyncio.timeout(DEADLINE_SECONDS):
        raw_head = await reader.readuntil(b"\r\n\r\n")
        status_line, *lines = raw_head[:-4].decode("latin-1").split("\r\n")
        headers: CIMultiDict[str] = CIMultiDict()
        for line in lines:
            name, _, value = line.partition(":")
            headers.add(name, value.strip())
        if headers.get("Transfer-Encoding") == "chunked":
            body = b""
            while size := int((await reader.readuntil(b"\r\n"))[:-2], 16):
                body += (await reader.readexactly(size + 2))[:-2]
            await reader.readexactly(2)
        else:
            body = await reader.readexactly(int(headers.get("Content-Length", "0")))
    return Response(int(status_line.split(" ")[1]), headers, body)


def request(
    token: str | None, body: bytes = b'{"model":"m","messages":[]}', *, extra: str = ""
) -> bytes:
    auth = f"Authorization: Bearer {token}\r\n" if token else ""
    return (
        f"{POST_LINE}\r\nHost: gw\r\nContent-Type: application/json\r\n{auth}{extra}"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body


@dataclass
class Conn:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()


@pytest.fixture
async def conn(gateway: RunningGateway) -> AsyncIterator[Conn]:
    reader, writer = await asyncio.open_connection(gateway.url.host, gateway.url.port)
    yield Conn(reader, writer)
    writer.close()
    with contextlib.suppress(ConnectionError):
        await writer.wait_closed()


def assert_completion(response: Response) -> None:
    assert response.status == 200, response.body[:300]
    completion = response.json()
    assert isinstance(completion, dict) and completion["object"] == "chat.completion"
    assert response.headers["X-Request-Id"].startswith("req_")


async def test_requests_on_one_connection_then_another_route_on_it(conn: Conn, token: str) -> None:
    """Two completions served here, then /healthz on the same connection (handed over)."""
    ids = set()
    for _ in range(2):
        await conn.send(request(token))
        response = await read_response(conn.reader)
        assert_completion(response)
        ids.add(response.headers["X-Request-Id"])
    await conn.send(b"GET /healthz HTTP/1.1\r\nHost: gw\r\n\r\n")
    health = await read_response(conn.reader)
    assert health.status == 200
    # And the proxy route still answers on the connection aiohttp now serves.
    await conn.send(request(token))
    last = await read_response(conn.reader)
    assert_completion(last)
    ids.add(last.headers["X-Request-Id"])
    assert len(ids) == 3


async def test_pipelined_requests_are_answered_in_order(
    conn: Conn, token: str, upstream: RunningUpstream
) -> None:
    bodies = [json.dumps({"model": f"m{i}", "messages": []}).encode() for i in range(3)]
    await conn.send(b"".join(request(token, body) for body in bodies))
    responses = [await read_response(conn.reader) for _ in bodies]
    for response in responses:
        assert_completion(response)
    assert [r.json()["model"] for r in responses] == ["m0", "m1", "m2"]  # type: ignore[index]
    assert [r.json()["model"] for r in upstream.recorder.requests] == ["m0", "m1", "m2"]


async def test_a_body_that_arrives_in_pieces_is_forwarded_whole(
    conn: Conn, token: str, upstream: RunningUpstream
) -> None:
    content = "".join(f"{i:07d}" for i in range(40_000))  # 280 kB, no two pieces alike
    body = json.dumps({"model": "m", "messages": [{"role": "user", "content": content}]})
    raw = request(token, body.encode())
    for start in range(0, len(raw), 7000):
        await conn.send(raw[start : start + 7000])
    assert_completion(await read_response(conn.reader))
    assert upstream.recorder.last.body == body.encode()


async def test_a_head_that_arrives_in_pieces_is_served(
    conn: Conn, token: str, upstream: RunningUpstream
) -> None:
    raw = request(token)
    await conn.send(raw[:20])
    await conn.send(raw[20:])
    assert_completion(await read_response(conn.reader))
    assert upstream.recorder.last.json() == {"model": "m", "messages": []}


async def test_a_chunked_request_body_is_forwarded_whole(
    conn: Conn, token: str, upstream: RunningUpstream
) -> None:
    body = b'{"model":"m","messages":[]}'
    await conn.send(
        (f"{POST_LINE}\r\nHost: gw\r\nAuthorization: Bearer {token}\r\n").encode()
        + b"Transfer-Encoding: chunked\r\n\r\n"
        + b"%x\r\n%b\r\n%x\r\n%b\r\n0\r\n\r\n" % (10, body[:10], len(body) - 10, body[10:])
    )
    assert_completion(await read_response(conn.reader))
    assert upstream.recorder.last.body == body


async def test_a_refusal_is_the_envelope_and_the_connection_stays_open(
    conn: Conn, token: str
) -> None:
    await conn.send(request(None))
    refused = await read_response(conn.reader)
    assert refused.status == 401
    assert refused.headers["Content-Type"] == "application/json"
    assert refused.headers["X-Request-Id"].startswith("req_")
    envelope = refused.json()
    assert isinstance(envelope, dict) and envelope["error"]["code"] == 401
    await conn.send(request(token))
    assert_completion(await read_response(conn.reader))


async def test_connection_close_is_honoured(conn: Conn, token: str) -> None:
    await conn.send(request(token, extra="Connection: close\r\n"))
    response = await read_response(conn.reader)
    assert_completion(response)
    assert response.headers["Connection"] == "close"
    async with asyncio.timeout(DEADLINE_SECONDS):
        assert await conn.reader.read() == b""  # the gateway closed its side


async def test_a_stream_is_relayed_in_chunks_exactly_as_the_upstream_sent_it(
    conn: Conn, token: str, upstream: RunningUpstream
) -> None:
    body = json.dumps({"model": "m", "stream": True, "messages": []}).encode()
    await conn.send(request(token, body))
    response = await read_response(conn.reader)
    assert response.status == 200
    assert response.headers["Content-Type"] == "text/event-stream"
    assert response.headers["Transfer-Encoding"] == "chunked"
    events = response.body.split(b"\n\n")
    assert events[0] == b": OPENROUTER PROCESSING"
    assert b"data: [DONE]" in events
    assert sum(e.startswith(b"data: {") for e in events) == upstream.settings.chunk_count + 2


# --- Idle connections ----------------------------------------------------------------------

KEEPALIVE_SECONDS = 0.5


@pytest.fixture
async def brief_gateway(
    make_config: Callable[..., gateway_config.Config],
) -> AsyncIterator[RunningGateway]:
    """A gateway whose idle connections close after half a second."""
    gateway = await start_gateway(make_config(), keepalive_timeout=KEEPALIVE_SECONDS)
    yield gateway
    await gateway.close()


async def closed_by_the_gateway(reader: asyncio.StreamReader) -> float:
    """Seconds until the gateway closes the connection (fails past the deadline)."""
    started = time.monotonic()
    async with asyncio.timeout(DEADLINE_SECONDS):
        assert await reader.read() == b""
    return time.monotonic() - started


async def test_an_idle_keep_alive_connection_is_closed(
    brief_gateway: RunningGateway, token: str
) -> None:
    reader, writer = await asyncio.open_connection(brief_gateway.url.host, brief_gateway.url.port)
    conn = Conn(reader, writer)
    for _ in range(2):  # kept open between requests...
        await conn.send(request(token))
        assert_completion(await read_response(reader))
    waited = await closed_by_the_gateway(reader)  # ...and closed once idle
    assert waited >= KEEPALIVE_SECONDS * 0.9
    writer.close()


@pytest.fixture
async def slow_body_gateway(gateway_factory: Callable[..., Any]) -> RunningGateway:
    """A gateway that waits half a second for a request's body."""
    gateway: RunningGateway = await gateway_factory(BODY_TIMEOUT_SECONDS=BODY_TIMEOUT)
    return gateway


BODY_TIMEOUT = 0.5


def chunked_request(token: str, first_chunk: bytes) -> bytes:
    """A head with a chunked body (a framing aiohttp reads) and its first chunk only."""
    return (
        f"{POST_LINE}\r\nHost: gw\r\nAuthorization: Bearer {token}\r\n"
        "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
    ).encode() + b"%x\r\n%b\r\n" % (len(first_chunk), first_chunk)


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
async def test_a_body_slower_than_the_body_timeout_is_408_and_the_connection_closes(
    slow_body_gateway: RunningGateway, token: str, upstream: RunningUpstream, framing: str
) -> None:
    """Both servers: the whole body has BODY_TIMEOUT_SECONDS, however it trickles."""
    gateway = slow_body_gateway
    reader, writer = await asyncio.open_connection(gateway.url.host, gateway.url.port)
    raw = request(token)
    writer.write(raw[:-5] if framing == "content-length" else chunked_request(token, b'{"mo'))
    await writer.drain()
    started = time.monotonic()
    for _ in range(3):  # a byte now and then does not extend the deadline
        await asyncio.sleep(BODY_TIMEOUT / 4)  # the client's pace, not a wait for the gateway
        writer.write(b" " if framing == "content-length" else b"1\r\n \r\n")
        await writer.drain()
    response = await read_response(reader)
    assert response.status == 408
    assert response.json()["error_type"] == "request_timeout"  # type: ignore[index]
    assert response.headers["Connection"] == "close"
    assert time.monotonic() - started < BODY_TIMEOUT * 4
    await closed_by_the_gateway(reader)
    assert upstream.recorder.received == 0
    writer.close()


LARGE_BODY = 10_000_000


def large_upload_head(token: str) -> bytes:
    return (
        f"{POST_LINE}\r\nHost: gw\r\nAuthorization: Bearer {token}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {LARGE_BODY}\r\n\r\n"
    ).encode()


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
@pytest.mark.parametrize("caller", ["bad key", "expired trial"])
async def test_a_refused_caller_is_answered_before_its_body_arrives(
    gateway: RunningGateway, seed: Seed, upstream: RunningUpstream, framing: str, caller: str
) -> None:
    """The key, the organization and the rule are judged from the head: the refusal goes
    out while the body has not even started, and the connection then closes."""
    if caller == "bad key":
        token, status = "sk-kilo-not-a-key", 401
    else:
        token, status = (await org_member(seed, age=EXPIRED_AGE)).token, 402
    reader, writer = await asyncio.open_connection(gateway.url.host, gateway.url.port)
    writer.write(
        large_upload_head(token) + b"{"
        if framing == "content-length"
        else chunked_request(token, b"{")
    )
    await writer.drain()
    response = await read_response(reader)  # no more body bytes are ever sent
    assert response.status == status
    assert response.headers["Connection"] == "close"
    await closed_by_the_gateway(reader)
    assert upstream.recorder.received == 0
    writer.close()


async def test_a_refused_upload_still_sending_reads_its_answer(
    gateway: RunningGateway, upstream: RunningUpstream
) -> None:
    """A client that sends its whole 10 MB body before reading gets the 401, not a reset:
    the gateway takes and drops the rest for a moment before it closes."""
    reader, writer = await asyncio.open_connection(gateway.url.host, gateway.url.port)
    writer.write(large_upload_head("sk-kilo-not-a-key"))
    piece = b"x" * 65536
    with contextlib.suppress(ConnectionError):
        for _ in range(LARGE_BODY // len(piece)):
            writer.write(piece)
            await writer.drain()
    response = await read_response(reader)
    assert response.status == 401
    assert upstream.recorder.received == 0
    writer.close()


@pytest.mark.parametrize(
    ("host_lines", "extra_headers"),
    [("", 0), ("Host: gw\r\nHost: other\r\n", 0), ("Host: gw\r\n", 130)],
    ids=["no host", "two hosts", "130 headers"],
)
async def test_heads_aiohttp_refuses_are_refused_here_too(
    conn: Conn, token: str, upstream: RunningUpstream, host_lines: str, extra_headers: int
) -> None:
    """A missing or repeated Host, or more than 128 header lines, are aiohttp's 400 in the
    envelope, never forwarded (the fast path used to forward them)."""
    body = b'{"model":"m","messages":[]}'
    extra = "".join(f"X-Filler-{i}: {i}\r\n" for i in range(extra_headers))
    await conn.send(
        (
            f"{POST_LINE}\r\n{host_lines}Authorization: Bearer {token}\r\n{extra}"
            f"Content-Length: {len(body)}\r\n\r\n"
        ).encode()
        + body
    )
    response = await read_response(conn.reader)
    assert response.status == 400
    assert response.json()["error_type"] == "malformed_request"  # type: ignore[index]
    assert upstream.recorder.received == 0
