"""`UpstreamClient` against real sockets.

Most upstreams here are `asyncio.start_server` servers that send exactly the bytes a test
needs, so framing, splits and timing are under the test's control; one is an
`aiohttp.web` server. Nothing of `gateway.upstream` is mocked.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from aiohttp import web

from gateway.proxy.route import upstream_error
from gateway.proxy.upstream import (
    MAX_HEAD_BYTES,
    MAX_HEADERS,
    MAX_INTERIM_RESPONSES,
    MAX_LINE_BYTES,
    PAUSE_AT_BYTES,
    Origin,
    UpstreamBroke,
    UpstreamClient,
    UpstreamDown,
    UpstreamMisspoke,
    UpstreamResponse,
    UpstreamSilent,
)

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


Reply = tuple[tuple[bytes, ...], bool]


def reply(*parts: bytes, close: bool = False) -> Reply:
    """What the scripted server does for one request: write `parts`, then maybe hang up."""
    return parts, close


HANG_UP = reply(close=True)  # read the request, answer nothing, close
SILENCE = reply()  # read the request, answer nothing, keep the connection open


def ok(body: bytes = b"ok", *headers: str) -> bytes:
    lines = ["HTTP/1.1 200 OK", *headers, f"Content-Length: {len(body)}", "", ""]
    return "\r\n".join(lines).encode() + body


def case(*values: object, id: str) -> object:
    """A named test parameter."""
    return pytest.param(*values, id=id)


async def read_request(reader: asyncio.StreamReader) -> bytes | None:
    """One request (head and Content-Length body) as received; None at the client's EOF."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as exc:
        if exc.partial:
            raise AssertionError(f"the client sent a partial request: {exc.partial!r}") from exc
        return None
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    return head + await reader.readexactly(length)


class FakeServer:
    """A TCP server on 127.0.0.1 that counts connections; scripted unless given a handler."""

    def __init__(self, replies: list[Reply], handler: Handler | None) -> None:
        self.replies = replies
        self.handler = handler or self._scripted
        self.port = 0
        self.accepted = 0
        self.closed_by_client = 0  # connections on which the server saw the client's EOF
        self.requests: list[bytes] = []
        self.errors: list[BaseException] = []
        self._writers: list[asyncio.StreamWriter] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._server: asyncio.Server | None = None

    async def start(self, host: str) -> None:
        self._server = await asyncio.start_server(self._accept, host, 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        self._writers.append(writer)
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            await self.handler(reader, writer)
        except ConnectionError:
            self.closed_by_client += 1
        except Exception as exc:
            self.errors.append(exc)
        finally:
            self._tasks.discard(task)
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    async def _scripted(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            request = await read_request(reader)
            if request is None:
                self.closed_by_client += 1
                return
            self.requests.append(request)
            parts, close = self.replies.pop(0)
            for index, part in enumerate(parts):
                if index:
                    await asyncio.sleep(0.001)  # so each part arrives in its own read
                writer.write(part)
                await writer.drain()
            if close:
                return

    def half_close_all(self) -> None:
        """Send EOF on every open connection (a client that honours it then closes too)."""
        for writer in self._writers:
            if not writer.is_closing() and writer.can_write_eof():
                writer.write_eof()

    async def stop(self) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()
        assert not self.errors, self.errors


async def eventually(predicate: Callable[[], bool], within: float = 1.0) -> None:
    """Wait until `predicate()` holds; fail after `within` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError(f"condition not met within {within} s")
        await asyncio.sleep(0.002)


async def read_body(response: UpstreamResponse) -> bytes:
    """The whole body; the response is released when it ended and closed when it broke."""
    pieces = []
    try:
        while chunk := await response.read_chunk():
            pieces.append(chunk)
    except BaseException:
        response.close()
        raise
    assert response.complete
    response.release()
    return b"".join(pieces)


async def assert_protocol_error(
    client: UpstreamClient, server: FakeServer, caplog: pytest.LogCaptureFixture
) -> None:
    """The request fails with a 502 upstream_protocol_error and its connection is closed."""
    try:
        response = await client.request("GET", "/", [], b"")
    except UpstreamMisspoke as exc:
        error = upstream_error(exc)  # what the proxy answers
        assert (error.status, error.reason) == (502, "upstream_protocol_error")
        assert (
            error.message == "OpenRouter sent a response the gateway could not read; retry shortly."
        )
    else:
        response.close()
        pytest.fail(
            f"relayed a broken head: {response.status} {response.reason!r} {response.headers!r}"
        )
    await eventually(lambda: server.closed_by_client == 1)
    # Refused by the parser, not by an exception escaping into the event loop.
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


@pytest.fixture
async def serve() -> AsyncIterator[Callable[..., Awaitable[FakeServer]]]:
    servers: list[FakeServer] = []

    async def start(
        *replies: Reply, handler: Handler | None = None, host: str = "127.0.0.1"
    ) -> FakeServer:
        server = FakeServer(list(replies), handler)
        await server.start(host)
        servers.append(server)
        return server

    yield start
    for server in servers:
        await server.stop()


@pytest.fixture
async def make_client() -> AsyncIterator[Callable[..., UpstreamClient]]:
    clients: list[UpstreamClient] = []

    def make(port: int, *, host="127.0.0.1", head=2.0, idle=2.0) -> UpstreamClient:
        client = UpstreamClient(
            f"http://{host}:{port}",
            connect_timeout_seconds=2.0,
            head_timeout_seconds=head,
            idle_timeout_seconds=idle,
        )
        clients.append(client)
        return client

    yield make
    for client in clients:
        await client.close()


# -- body framing ------------------------------------------------------------------------

HEAD_CHUNKED = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
CL_RESPONSE = ok(b"hello world", "Content-Type: Text/Plain; charset=utf-8")
CHUNKED_RESPONSE = (
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Type: text/plain\r\n\r\n"
    b"5;a=b\r\nhello\r\n"
    b"1A\r\nabcdefghijklmnopqrstuvwxyz\r\n"
    b'00a;x="y"\r\n0123456789\r\n'
    b"0;last=1\r\nX-Trailer: yes\r\nOther: 2\r\n\r\n"
)
CHUNKED_BODY = b"hello" + b"abcdefghijklmnopqrstuvwxyz" + b"0123456789"
CLOSE_RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nuntil the very end"


@pytest.mark.parametrize(
    ("whole", "body", "length", "close"),
    [
        case(CL_RESPONSE, b"hello world", 11, False, id="content-length"),
        case(CHUNKED_RESPONSE, CHUNKED_BODY, None, False, id="chunked"),
        case(CLOSE_RESPONSE, b"until the very end", None, True, id="until-close"),
    ],
)
async def test_body_whole_and_split_at_every_byte(serve, make_client, whole, body, length, close):
    splits = range(len(whole) + 1)  # 0 and len(whole): all of it in one write
    server = await serve(*(reply(whole[:i], whole[i:], close=close) for i in splits))
    client = make_client(server.port)
    for split in splits:
        response = await client.request("GET", f"/split/{split}", [], b"")
        assert (response.status, response.reason) == (200, "OK"), split
        assert (response.content_length, response.content_type) == (length, "text/plain")
        assert await read_body(response) == body, split
    # One connection throughout (so the trailers were consumed), unless the close ends the body.
    assert server.accepted == (len(splits) if close else 1)


@pytest.mark.parametrize(
    ("method", "status"),
    [("HEAD", "200 OK"), ("GET", "204 No Content"), ("GET", "304 Not Modified")],
)
async def test_head_204_and_304_have_no_body_despite_content_length(
    serve, make_client, method, status
):
    head = f"HTTP/1.1 {status}\r\nContent-Length: 5\r\n\r\n".encode()
    server = await serve(reply(head), reply(ok(b"second")))
    client = make_client(server.port)
    response = await client.request(method, "/", [], b"")
    assert response.status == int(status[:3])
    assert await read_body(response) == b""
    # Had the client waited for five body bytes, "second" would have been eaten as them.
    assert await read_body(await client.request("GET", "/", [], b"")) == b"second"
    assert server.accepted == 1


@pytest.mark.parametrize("separate_writes", [False, True])
async def test_interim_100_and_103_are_skipped(serve, make_client, separate_writes):
    parts = (
        b"HTTP/1.1 100 Continue\r\n\r\n",
        b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n",
        ok(b"final", "X-Final: 1"),
    )
    server = await serve(reply(*parts) if separate_writes else reply(b"".join(parts)))
    client = make_client(server.port)
    response = await client.request("GET", "/", [], b"")
    assert (response.status, response.headers["X-Final"]) == (200, "1")
    assert "Link" not in response.headers
    assert await read_body(response) == b"final"


async def test_101_switching_protocols_is_a_protocol_error(serve, make_client, caplog):
    server = await serve(reply(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n"))
    await assert_protocol_error(make_client(server.port), server, caplog)


# -- malformed responses -----------------------------------------------------------------


H200 = b"HTTP/1.1 200 OK\r\n"
LONG_HEAD = H200 + b"X: " + b"a" * (MAX_HEAD_BYTES + 100)


@pytest.mark.parametrize(
    "head",
    [
        case(b"SSH-2.0-OpenSSH_9.6\r\n\r\n", id="not-http"),
        case(b"HTTP/2 200 OK\r\n\r\n", id="http2-version"),
        case(b"HTTP/1.1 2000 OK\r\n\r\n", id="four-digit-status"),
        case(b"HTTP/1.1 20 OK\r\n\r\n", id="two-digit-status"),
        case(b"HTTP/1.1 OK 200\r\n\r\n", id="non-digit-status"),
        case(H200 + b"NoColonHere\r\n\r\n", id="header-without-colon"),
        case(H200 + b": empty-name\r\n\r\n", id="header-empty-name"),
        case(H200 + b"Name : v\r\n\r\n", id="space-before-colon"),
        case(H200 + b"X-A: a\r\n folded\r\n\r\n", id="obs-fold"),
        case(H200 + b"\tX-A: a\r\n\r\n", id="leading-whitespace"),
        case(H200 + b"Content-Length: 5\r\nContent-Length: 6\r\n\r\nhello!", id="cl-conflict"),
        case(H200 + b"Content-Length: 5, 6\r\n\r\nhello!", id="cl-list"),
        case(H200 + b"Content-Length: abc\r\n\r\n", id="cl-letters"),
        case(H200 + b"Content-Length: -5\r\n\r\n", id="cl-negative"),
        case(H200 + b"Content-Length: +5\r\n\r\nhello", id="cl-plus"),
        case(H200 + b"Content-Length: 0x5\r\n\r\nhello", id="cl-hex"),
        case(LONG_HEAD, id="head-too-long-unfinished"),
        case(LONG_HEAD + b"\r\n\r\n", id="head-too-long-in-one-read"),
        case(
            H200 + "Content-Length: \uff15\r\n\r\nhello".encode(),
            id="cl-fullwidth-digit",
        ),
        case(
            H200 + "Content-Length: \u00b2\r\n\r\nhello".encode(),
            id="cl-superscript-digit",
        ),
        case(
            "HTTP/1.1 \uff12\uff10\uff10 OK\r\nContent-Length: 2\r\n\r\nok".encode(),
            id="status-fullwidth-digits",
        ),
    ],
)
async def test_malformed_head_is_a_protocol_error(serve, make_client, caplog, head):
    server = await serve(reply(head))
    await assert_protocol_error(make_client(server.port), server, caplog)


@pytest.mark.parametrize("same_write", [True, False])
@pytest.mark.parametrize(
    "body",
    [
        pytest.param(b"5\r\nhello\r\nzz\r\n", id="bad-chunk-size"),
        pytest.param(b"0x5\r\nhello\r\n0\r\n\r\n", id="hex-prefix-size"),
        pytest.param(b"-5\r\nhello\r\n0\r\n\r\n", id="negative-size"),
        pytest.param(b"\r\nhello\r\n0\r\n\r\n", id="empty-size"),
        pytest.param(b"5\r\nhelloXX\r\n0\r\n\r\n", id="no-crlf-after-data"),
        pytest.param(b"1" * 5000, id="size-line-too-long"),
    ],
)
async def test_malformed_chunked_body_breaks_read_chunk(serve, make_client, body, same_write):
    server = await serve(reply(HEAD_CHUNKED + body) if same_write else reply(HEAD_CHUNKED, body))
    client = make_client(server.port)
    response = await client.request("GET", "/", [], b"")
    assert response.status == 200
    with pytest.raises(UpstreamBroke):
        await read_body(response)
    await eventually(lambda: server.closed_by_client == 1)


# -- protocol violations: llhttp's refusals and RFC 9110's grammar on top ----------------

CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
EVIL_VALUE = b"X-Evil: a\nSet-Cookie: session=evil"


def head_with(*lines: bytes, status: bytes = b"200 OK") -> bytes:
    """A response with these header lines and a two-byte body."""
    return b"".join([b"HTTP/1.1 " + status + b"\r\n", *(line + b"\r\n" for line in lines)]) + (
        b"Content-Length: 2\r\n\r\nok"
    )


@pytest.mark.parametrize(
    "response",
    [
        # With the hand-written parser before llhttp, most of these reached the client and
        # some were a traceback.
        case(head_with(EVIL_VALUE), id="bare-lf-header-injection"),
        case(head_with(b"X-Evil: a\rSet-Cookie: session=evil"), id="bare-cr-in-value"),
        case(head_with(b"X-Evil: a\x00b"), id="nul-in-value"),
        case(head_with(b"X-Evil: a\x7fb"), id="del-in-value"),
        case(head_with(b"X-Evil: a\x1bb"), id="escape-in-value"),
        case(head_with(status=b"200 OK\nSet-Cookie: session=evil"), id="bare-lf-in-reason"),
        case(head_with(status=b"200 O\x00K"), id="nul-in-reason"),
        case(head_with(status=b"200 O\x7fK"), id="del-in-reason"),
        case(head_with(status=b"099 Early"), id="status-099"),
        case(head_with(status=b"000 Zero"), id="status-000"),
        case(head_with(status=b"600 Beyond"), id="status-600"),
        case(head_with().replace(b"HTTP/1.1", b"HTTP/2.0"), id="http-2.0"),
        case(head_with().replace(b"HTTP/1.1", b"HTTP/0.9"), id="http-0.9"),
        case(CONTINUE * 2000 + ok(b"late"), id="2000-interim-heads-in-one-write"),
        case(CONTINUE * (MAX_INTERIM_RESPONSES + 1) + ok(), id="one-interim-head-too-many"),
        case(
            b"HTTP/1.1 199 Odd\r\nContent-Length: 2\r\n\r\nab" + ok(),
            id="interim-head-with-a-body",
        ),
        case(H200 + b"Content-Length: " + b"1" * 5000 + b"\r\n\r\n", id="cl-5000-digits"),
        case(H200 + b"Content-Length: " + b"1" * 19 + b"\r\n\r\n", id="cl-19-digits"),
        case(H200 + b"Content-Length: 2\r\nContent-Length: 3\r\n\r\nok!", id="cl-two-values"),
        case(H200 + b"Content-Length: 2\r\nContent-Length: 2\r\n\r\nok", id="cl-repeated"),
        case(
            head_with(*(b"X-%d: v" % i for i in range(MAX_HEADERS))),  # and Content-Length
            id="129-header-lines",
        ),
        case(head_with(b"X-Long: " + b"a" * 9000), id="9000-byte-header-line"),
        case(
            head_with(b"X-Long: " + b"a" * (MAX_LINE_BYTES - len(b"X-Long: ") + 1)),
            id="8191-byte-header-line",
        ),
        case(head_with(status=b"200 " + b"O" * MAX_LINE_BYTES), id="long-status-line"),
        case(
            head_with(*(b"X-%d: %s" % (i, b"a" * 8000) for i in range(9))),
            id="head-over-64-kib-in-short-lines",
        ),
        case(
            H200 + b"Transfer-Encoding: chunked\r\nContent-Length: 2\r\n\r\n0\r\n\r\n",
            id="cl-and-te",
        ),
    ],
)
async def test_protocol_violation_in_the_head_is_refused_and_the_connection_dropped(
    serve, make_client, caplog, response
):
    server = await serve(reply(response), reply(ok(b"next")))
    client = make_client(server.port)
    await assert_protocol_error(client, server, caplog)
    # The next request goes out on a new connection and is answered.
    assert await read_body(await client.request("GET", "/", [], b"")) == b"next"
    assert server.accepted == 2


async def test_protocol_violation_split_into_many_reads_is_refused(serve, make_client, caplog):
    evil = head_with(b"X-A: 1", EVIL_VALUE)
    server = await serve(reply(*(evil[i : i + 3] for i in range(0, len(evil), 3))))
    await assert_protocol_error(make_client(server.port), server, caplog)


@pytest.mark.parametrize(
    "response",
    [
        case(head_with(*(b"X-%d: v" % i for i in range(MAX_HEADERS - 1))), id="128-headers"),
        case(
            head_with(b"X-Long: " + b"a" * (MAX_LINE_BYTES - len(b"X-Long: "))),
            id="8190-byte-line",
        ),
        case(CONTINUE * MAX_INTERIM_RESPONSES + head_with(), id="10-interim-heads"),
        case(H200 + b"Content-Length: 000000000000000002\r\n\r\nok", id="cl-18-digits"),
        case(head_with(status=b"599 Last"), id="status-599"),
        case(head_with(status=b"200 "), id="empty-reason"),
        case(head_with(status=b"200"), id="no-reason"),
        case(head_with().replace(b"HTTP/1.1", b"HTTP/1.0"), id="http-1.0"),
    ],
)
async def test_heads_at_the_limits_are_accepted(serve, make_client, response):
    server = await serve(reply(response))
    client = make_client(server.port)
    answer = await client.request("GET", "/", [], b"")
    assert answer.content_length == 2
    assert await read_body(answer) == b"ok"


async def test_fields_are_decoded_as_they_came_less_surrounding_whitespace(serve, make_client):
    response = head_with(
        b"X-Padded: \t a  b \t ",
        b"X-Empty:",
        b"X-Utf8: caf\xc3\xa9",
        b"X-Obs-Text: \xff\xfe",
        b"x-padded:last ",
        status=b"200 Tr\xc3\xa8s\tbien",
    )
    server = await serve(reply(response))
    client = make_client(server.port)
    answer = await client.request("GET", "/", [], b"")
    assert answer.reason == "Tr\u00e8s\tbien"
    assert answer.headers.getall("X-Padded") == ["a  b", "last"]
    assert answer.headers["X-Empty"] == ""
    assert answer.headers["X-Utf8"] == "caf\u00e9"
    # Not UTF-8: kept as surrogates, so the proxy sends the same bytes on.
    assert answer.headers["X-Obs-Text"].encode("utf-8", "surrogateescape") == b"\xff\xfe"
    assert list(answer.headers)[:2] == ["X-Padded", "X-Empty"]
    assert await read_body(answer) == b"ok"


async def test_trailers_are_read_and_never_become_headers(serve, make_client):
    response = HEAD_CHUNKED + b"2\r\nok\r\n0\r\nSet-Cookie: session=evil\r\nX-T: 1\r\n\r\n"
    server = await serve(reply(response), reply(ok(b"next")))
    client = make_client(server.port)
    answer = await client.request("GET", "/", [], b"")
    assert await read_body(answer) == b"ok"
    assert "Set-Cookie" not in answer.headers and "X-T" not in answer.headers
    assert await read_body(await client.request("GET", "/", [], b"")) == b"next"
    assert server.accepted == 1


async def test_an_endless_trailer_breaks_the_body(serve, make_client):
    start = HEAD_CHUNKED + b"2\r\nok\r\n0\r\nX-Trailer: "
    server = await serve(reply(start, *(b"a" * 16384 for _ in range(8))))
    client = make_client(server.port)
    answer = await client.request("GET", "/", [], b"")
    assert await answer.read_chunk() == b"ok"
    with pytest.raises(UpstreamBroke):
        await read_body(answer)
    await eventually(lambda: server.closed_by_client == 1)


@pytest.mark.parametrize(
    "body",
    [
        case(b'5 ; x="y"\r\nhello\r\n0\r\n\r\n', id="whitespace-before-extension"),
        case(b"5\nhello\r\n0\r\n\r\n", id="bare-lf-after-size"),
        case(b"5\r\nhello\n0\r\n\r\n", id="bare-lf-after-data"),
        case(b"5\r\nhello\r\n0\r\nX-T: a\nb\r\n\r\n", id="bare-lf-in-trailer"),
    ],
)
async def test_chunked_framing_llhttp_refuses_breaks_the_body(serve, make_client, body):
    server = await serve(reply(HEAD_CHUNKED + body))
    client = make_client(server.port)
    answer = await client.request("GET", "/", [], b"")
    with pytest.raises(UpstreamBroke):
        await read_body(answer)
    await eventually(lambda: server.closed_by_client == 1)


# -- HEAD: llhttp does not know the request was HEAD --------------------------------------

HEAD_FIVE = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n"


async def test_head_response_split_at_every_byte_after_interim_heads_is_reused(serve, make_client):
    # llhttp skips a CRLF between messages: a CRLFCRLF that ends no head.
    whole = CONTINUE + b"\r\n" + CONTINUE + HEAD_FIVE
    splits = range(len(whole) + 1)
    server = await serve(*(r for i in splits for r in (reply(whole[:i], whole[i:]), reply(ok()))))
    client = make_client(server.port)
    for split in splits:
        answer = await client.request("HEAD", "/", [], b"")
        assert (answer.status, answer.headers["Content-Length"]) == (200, "5"), split
        assert answer.content_length is None
        assert await read_body(answer) == b"", split
        assert await read_body(await client.request("GET", "/", [], b"")) == b"ok", split
    assert server.accepted == 1


@pytest.mark.parametrize("same_write", [True, False])
@pytest.mark.parametrize(
    ("head", "stray"),
    [
        case(HEAD_FIVE, b"hello", id="the-body-it-announced"),
        case(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", b"EXTRA", id="content-length-0"),
        case(HEAD_CHUNKED, b"5", id="chunked-part-of-a-size"),
        case(b"HTTP/1.1 200 OK\r\n\r\n", b"\r\n", id="no-length-crlf"),
        case(HEAD_FIVE, ok(b"smuggled", "Set-Cookie: session=evil"), id="a-whole-response"),
    ],
)
async def test_bytes_after_a_head_response_make_the_connection_not_reused(
    serve, make_client, head, stray, same_write
):
    first = reply(head + stray) if same_write else reply(head, stray)
    server = await serve(first, reply(ok(b"second")))
    client = make_client(server.port)
    answer = await client.request("HEAD", "/", [], b"")
    assert answer.status == 200
    if not same_write:
        await asyncio.sleep(0.05)  # the stray bytes arrive before the response is released
    assert await read_body(answer) == b""
    second = await client.request("GET", "/", [], b"")
    assert await read_body(second) == b"second"
    assert "Set-Cookie" not in second.headers
    assert server.accepted == 2


async def test_a_violation_in_a_head_response_is_a_protocol_error(serve, make_client, caplog):
    server = await serve(reply(HEAD_FIVE.replace(b"OK", b"OK\nSet-Cookie: session=evil")))
    client = make_client(server.port)
    with pytest.raises(UpstreamMisspoke):
        await client.request("HEAD", "/", [], b"")
    await eventually(lambda: server.closed_by_client == 1)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


# -- keep-alive --------------------------------------------------------------------------


async def test_sequential_requests_reuse_one_connection(serve, make_client):
    server = await serve(reply(ok(b"one")), reply(ok(b"two")), reply(ok(b"three")))
    client = make_client(server.port)
    for expected in (b"one", b"two", b"three"):
        assert await read_body(await client.request("GET", "/", [], b"")) == expected
    assert (server.accepted, len(server.requests)) == (1, 3)


@pytest.mark.parametrize(
    ("first", "connections"),
    [
        pytest.param(ok(b"a", "Connection: close"), 2, id="connection-close"),
        pytest.param(ok(b"a", "Connection: Keep-Alive, Close"), 2, id="connection-list-close"),
        pytest.param(b"HTTP/1.0 200 OK\r\nContent-Length: 1\r\n\r\na", 2, id="http10"),
        pytest.param(
            b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 1\r\n\r\na",
            1,
            id="http10-keep-alive",
        ),
    ],
)
async def test_connection_header_and_version_decide_reuse(serve, make_client, first, connections):
    # The server keeps every connection open: only the client decides.
    server = await serve(reply(first), reply(ok(b"b")))
    client = make_client(server.port)
    assert await read_body(await client.request("GET", "/", [], b"")) == b"a"
    assert await read_body(await client.request("GET", "/", [], b"")) == b"b"
    assert server.accepted == connections
    if connections == 2:
        await eventually(lambda: server.closed_by_client == 1)  # the first was closed


@pytest.mark.parametrize("how", ["close", "release"])
async def test_response_not_read_to_the_end_is_not_reused(serve, make_client, how):
    server = await serve(reply(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc"), reply(ok()))
    client = make_client(server.port)
    response = await client.request("GET", "/", [], b"")
    assert await response.read_chunk() == b"abc"
    assert not response.complete
    getattr(response, how)()
    await eventually(lambda: server.closed_by_client == 1)
    assert await read_body(await client.request("GET", "/", [], b"")) == b"ok"
    assert server.accepted == 2


@pytest.mark.parametrize(
    ("first", "body"),
    [
        case(ok(b"abc") + b"EXTRA", b"abc", id="content-length"),
        case(ok(b"") + b"EXTRA", b"", id="content-length-0"),
        case(HEAD_CHUNKED + b"3\r\nabc\r\n0\r\n\r\nEXTRA", b"abc", id="chunked"),
        case(b"HTTP/1.1 204 No Content\r\n\r\nEXTRA", b"", id="204"),
    ],
)
async def test_extra_bytes_after_the_body_make_the_connection_not_reused(
    serve, make_client, first, body
):
    server = await serve(reply(first), reply(ok(b"second")))
    client = make_client(server.port)
    assert await read_body(await client.request("GET", "/", [], b"")) == body
    assert await read_body(await client.request("GET", "/", [], b"")) == b"second"
    assert server.accepted == 2


# -- retry -------------------------------------------------------------------------------


async def test_get_on_a_reused_connection_lost_before_the_head_is_retried_once(serve, make_client):
    server = await serve(reply(ok(b"first")), HANG_UP, reply(ok(b"retried")))
    client = make_client(server.port)
    assert await read_body(await client.request("GET", "/a", [], b"")) == b"first"
    assert await read_body(await client.request("GET", "/b", [], b"")) == b"retried"
    assert server.accepted == 2
    assert [r.split(b"\r\n")[0] for r in server.requests] == [
        b"GET /a HTTP/1.1",
        b"GET /b HTTP/1.1",
        b"GET /b HTTP/1.1",
    ]


async def test_post_on_a_reused_connection_lost_before_the_head_is_not_retried(serve, make_client):
    server = await serve(reply(ok(b"first")), HANG_UP, reply(ok(b"must not be asked")))
    client = make_client(server.port)
    assert await read_body(await client.request("GET", "/a", [], b"")) == b"first"
    with pytest.raises(UpstreamDown):
        await client.request("POST", "/b", [], b"{}")
    assert (server.accepted, len(server.requests)) == (1, 2)


async def test_reused_connection_lost_after_part_of_the_head_is_not_retried(serve, make_client):
    server = await serve(reply(ok()), reply(b"HTTP/1.1 200 O", close=True), reply(ok()))
    client = make_client(server.port)
    await read_body(await client.request("GET", "/", [], b""))
    with pytest.raises(UpstreamDown):
        await client.request("GET", "/", [], b"")
    assert (server.accepted, len(server.requests)) == (1, 2)


async def test_protocol_error_on_a_reused_connection_is_not_retried(serve, make_client):
    server = await serve(reply(ok()), reply(head_with(EVIL_VALUE)), reply(ok(b"not asked")))
    client = make_client(server.port)
    await read_body(await client.request("GET", "/", [], b""))
    with pytest.raises(UpstreamMisspoke):
        await client.request("GET", "/", [], b"")
    assert (server.accepted, len(server.requests)) == (1, 2)


async def test_fresh_connection_lost_before_the_head_is_unreachable_without_retry(
    serve, make_client
):
    server = await serve(HANG_UP, reply(ok()))
    client = make_client(server.port)
    with pytest.raises(UpstreamDown):
        await client.request("GET", "/", [], b"")
    assert (server.accepted, len(server.requests)) == (1, 1)


# -- timeouts, refusals, cancellation ----------------------------------------------------


async def test_no_head_in_time_is_upstream_timeout_and_closes_the_connection(serve, make_client):
    server = await serve(SILENCE)
    client = make_client(server.port, head=0.2)
    started = time.monotonic()
    with pytest.raises(UpstreamSilent) as caught:
        await client.request("GET", "/", [], b"")
    elapsed = time.monotonic() - started
    assert upstream_error(caught.value).status == 504
    assert 0.19 <= elapsed < 0.6
    await eventually(lambda: server.closed_by_client == 1, within=0.5)


async def test_silence_mid_body_breaks_read_chunk(serve, make_client):
    server = await serve(reply(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc"))
    client = make_client(server.port, idle=0.2)
    response = await client.request("GET", "/", [], b"")
    assert await response.read_chunk() == b"abc"
    started = time.monotonic()
    with pytest.raises(UpstreamBroke):
        await response.read_chunk()
    assert time.monotonic() - started < 0.6
    response.close()
    await eventually(lambda: server.closed_by_client == 1)


async def test_silence_in_a_close_delimited_body_is_not_its_end(serve, make_client):
    server = await serve(reply(b"HTTP/1.1 200 OK\r\n\r\nabc"))
    client = make_client(server.port, idle=0.2)
    response = await client.request("GET", "/", [], b"")
    assert await response.read_chunk() == b"abc"
    with pytest.raises(UpstreamBroke):
        await response.read_chunk()
    await eventually(lambda: server.closed_by_client == 1)
    await asyncio.sleep(0.01)  # the close has reached the client too
    # The close that followed the silence does not make it a whole body.
    assert not response.complete
    with pytest.raises(UpstreamBroke):
        await response.read_chunk()
    response.close()


@pytest.mark.parametrize(
    ("partial", "received"),
    [
        pytest.param(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc", b"abc", id="length"),
        pytest.param(HEAD_CHUNKED + b"5\r\nhello\r\n3\r\nab", b"helloab", id="chunked-in-data"),
        pytest.param(HEAD_CHUNKED + b"5\r\nhello\r\n", b"hello", id="chunked-between"),
        pytest.param(HEAD_CHUNKED + b"0\r\nX-T: 1\r\n", b"", id="chunked-in-trailers"),
    ],
)
async def test_close_mid_body_breaks_read_chunk(serve, make_client, partial, received):
    server = await serve(reply(partial, close=True))
    client = make_client(server.port)
    response = await client.request("GET", "/", [], b"")
    pieces = []
    with pytest.raises(UpstreamBroke):
        while True:
            pieces.append(await response.read_chunk())
    assert b"".join(pieces) == received
    response.close()


async def test_connection_refused_is_unreachable_fast(make_client):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    client = make_client(port)  # nothing listens there now
    started = time.monotonic()
    with pytest.raises(UpstreamDown) as caught:
        await client.request("GET", "/", [], b"")
    assert upstream_error(caught.value).status == 502
    assert time.monotonic() - started < 0.5


async def test_cancelling_the_request_closes_the_connection(serve, make_client):
    server = await serve(SILENCE)
    client = make_client(server.port)
    task = asyncio.create_task(client.request("GET", "/slow", [], b""))
    await eventually(lambda: len(server.requests) == 1)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await eventually(lambda: server.closed_by_client == 1, within=0.5)


# -- back-pressure -----------------------------------------------------------------------


async def test_slow_reader_pauses_reading_and_every_byte_arrives_in_order(serve, make_client):
    body = os.urandom(24 * 1024 * 1024)
    progress = {"written": 0, "done": False}

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 65536)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body))
        view = memoryview(body)
        for start in range(0, len(body), 65536):
            writer.write(view[start : start + 65536])
            await writer.drain()
            progress["written"] = min(start + 65536, len(body))
        progress["done"] = True
        assert await read_request(reader) is None

    server = await serve(handler=handler)
    client = make_client(server.port, idle=0.2)
    response = await client.request("GET", "/big", [], b"")
    assert response.content_length == len(body)

    # Read nothing for a while: the server's drain() must block long before the end. (The
    # stall also outlasts the idle timeout, which must not count our own slowness.)
    loop = asyncio.get_running_loop()
    deadline, stable_since, last = loop.time() + 3.0, loop.time(), -1
    while loop.time() - stable_since < 0.3:
        assert loop.time() < deadline, "the server never stalled"
        if progress["written"] != last:
            last, stable_since = progress["written"], loop.time()
        await asyncio.sleep(0.01)
    assert not progress["done"]
    assert progress["written"] < len(body) // 2
    first = response.buffered()
    assert 0 < len(first) <= PAUSE_AT_BYTES + 256 * 1024  # at most one read past the mark

    pieces = [first]
    while chunk := await response.read_chunk():
        pieces.append(chunk)
        if len(pieces) % 8 == 0:
            await asyncio.sleep(0.001)  # a slow reader
    response.release()
    assert b"".join(pieces) == body
    assert progress["done"]


# -- the request as sent -----------------------------------------------------------------


async def test_request_is_sent_as_given(serve, make_client):
    big = os.urandom(200_000)  # above the single-write size
    server = await serve(reply(ok()), reply(ok()), reply(ok()), reply(ok()))
    client = make_client(server.port)
    headers = [("X-A", "1"), ("Content-Type", "application/json"), ("x-a", "2 two")]
    await read_body(await client.request("POST", "/api/v1/chat?x=1&y=%20", headers, b'{"a":1}'))
    await read_body(await client.request("GET", "/models", [("Accept", "*/*")], b""))
    await read_body(await client.request("POST", "/empty", [], b""))
    await read_body(await client.request("PUT", "/big", [], big))
    host = f"Host: 127.0.0.1:{server.port}\r\n".encode()
    assert server.requests[:3] == [
        b"POST /api/v1/chat?x=1&y=%20 HTTP/1.1\r\n" + host + b"X-A: 1\r\n"
        b"Content-Type: application/json\r\nx-a: 2 two\r\nContent-Length: 7\r\n\r\n"
        b'{"a":1}',
        b"GET /models HTTP/1.1\r\n" + host + b"Accept: */*\r\n\r\n",
        b"POST /empty HTTP/1.1\r\n" + host + b"Content-Length: 0\r\n\r\n",
    ]
    assert server.requests[3] == b"PUT /big HTTP/1.1\r\n" + host + (
        b"Content-Length: 200000\r\n\r\n" + big
    )


BAD_HEADERS = [
    pytest.param(("X-A", "a\r\nX-Injected: 1"), id="crlf-in-value"),
    pytest.param(("X-A", "a\nb"), id="lf-in-value"),
    pytest.param(("X-A", "a\rb"), id="cr-in-value"),
    pytest.param(("X-A\r\nX-B", "b"), id="crlf-in-name"),
]


@pytest.mark.parametrize("bad", BAD_HEADERS)
async def test_header_with_a_line_break_is_refused_and_nothing_is_sent(serve, make_client, bad):
    server = await serve(reply(ok()))
    client = make_client(server.port)
    await read_body(await client.request("GET", "/first", [], b""))
    with pytest.raises(ValueError):
        await client.request("GET", "/second", [("X-Good", "1"), bad], b"")
    # Half-close every connection: a client closes in turn, so whatever it sent before has
    # been read by the server once it saw the client's EOF.
    server.half_close_all()
    await eventually(lambda: server.closed_by_client == server.accepted)
    assert [r.split(b"\r\n")[0] for r in server.requests] == [b"GET /first HTTP/1.1"]


async def test_a_refused_header_leaves_no_connection_open(serve, make_client):
    server = await serve(reply(ok()))
    client = make_client(server.port)
    await read_body(await client.request("GET", "/first", [], b""))
    with pytest.raises(ValueError):
        await client.request("GET", "/second", [("X-A", "a\r\nb")], b"")
    await client.close()
    try:
        await eventually(lambda: server.closed_by_client == server.accepted)
    finally:
        server.half_close_all()  # so a leaked connection closes before the loop does
        await eventually(lambda: server.closed_by_client == server.accepted)


# -- origin, client close, other servers -------------------------------------------------


@pytest.mark.parametrize(
    ("url", "host", "port", "base_path", "host_header"),
    [
        ("http://example.com", "example.com", 80, "", "example.com"),
        ("http://example.com:80/", "example.com", 80, "", "example.com"),
        ("http://example.com:8080/x", "example.com", 8080, "/x", "example.com:8080"),
        ("https://openrouter.ai/api/v1/", "openrouter.ai", 443, "/api/v1", "openrouter.ai"),
        ("https://openrouter.ai:443/api", "openrouter.ai", 443, "/api", "openrouter.ai"),
        ("https://openrouter.ai:8443", "openrouter.ai", 8443, "", "openrouter.ai:8443"),
        ("http://[::1]:8080/v1", "::1", 8080, "/v1", "[::1]:8080"),
        ("https://[2001:db8::1]/", "2001:db8::1", 443, "", "[2001:db8::1]"),
    ],
)
def test_origin_parse(url, host, port, base_path, host_header):
    origin = Origin.parse(url)
    assert (origin.scheme, origin.host, origin.port) == (url.split(":")[0], host, port)
    assert (origin.base_path, origin.host_header) == (base_path, host_header)


@pytest.mark.parametrize(
    "url", ["ftp://example.com/", "ws://example.com", "example.com", "http:///path", "", "//x"]
)
def test_origin_parse_rejects_non_http_urls(url):
    with pytest.raises(ValueError):
        Origin.parse(url)


async def test_client_close_closes_idle_connections(serve, make_client):
    server = await serve(*(reply(ok()) for _ in range(3)))
    client = make_client(server.port)
    first, second = await asyncio.gather(
        client.request("GET", "/1", [], b""), client.request("GET", "/2", [], b"")
    )
    third = await client.request("GET", "/3", [], b"")  # in flight while the client closes
    await read_body(first)
    await read_body(second)
    assert server.accepted == 3 and server.closed_by_client == 0
    await client.close()
    await eventually(lambda: server.closed_by_client == 2)
    await read_body(third)  # released after close(): closed, not pooled
    await eventually(lambda: server.closed_by_client == 3)


async def test_ipv6_literal_origin(serve, make_client):
    try:
        server = await serve(reply(ok(b"six")), host="::1")
    except OSError:
        pytest.skip("no IPv6 loopback")
    client = make_client(server.port, host="[::1]")
    assert await read_body(await client.request("GET", "/", [], b"")) == b"six"
    assert f"\r\nHost: [::1]:{server.port}\r\n".encode() in server.requests[0]


async def test_against_aiohttp_web_server_streams_and_keeps_alive(aiohttp_server, make_client):
    peers = set()

    async def handle(request: web.Request) -> web.StreamResponse:
        peers.add(request.transport.get_extra_info("peername"))
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(f"{request.host} {request.headers.get('X-Test')} ".encode())
        for piece in (await request.read(), b"data: 1\n\n", b"data: 2\n\n"):
            await response.write(piece)
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_route("*", "/stream", handle)
    server = await aiohttp_server(app)
    client = make_client(server.port)
    for method, body in (("GET", b""), ("POST", b"payload "), ("GET", b"")):
        response = await client.request(method, "/stream", [("X-Test", method)], body)
        assert response.content_type == "text/event-stream"
        assert response.headers["Transfer-Encoding"] == "chunked"
        expected = f"127.0.0.1:{server.port} {method} ".encode() + body
        assert await read_body(response) == expected + b"data: 1\n\ndata: 2\n\n"
    assert len(peers) == 1


class BlackHole:
    """A loopback address and port whose SYNs are dropped: a listener that never accepts,
    with its accept queue full, as an IPv6 address without a route behaves."""

    def __init__(self, port: int) -> None:
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.2", port))
        self.listener.listen(0)
        self.address = self.listener.getsockname()
        self.queued = []
        for _ in range(4):
            filler = socket.socket()
            filler.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                filler.connect(self.address)
            self.queued.append(filler)

    def close(self) -> None:
        for sock in [*self.queued, self.listener]:
            sock.close()


class TwoAddressClient(UpstreamClient):
    """An upstream whose name resolves to a black-holed address first, then a live one
    (the order getaddrinfo gives IPv6 before IPv4)."""

    def __init__(self, dead: tuple[str, int], live: tuple[str, int]) -> None:
        super().__init__(
            f"http://upstream.test:{live[1]}",
            connect_timeout_seconds=3.0,
            head_timeout_seconds=2.0,
            idle_timeout_seconds=2.0,
        )
        self.infos = [
            (socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", dead),
            (socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", live),
        ]

    async def _resolve(self):  # type: ignore[override]
        return self.infos


async def test_a_black_holed_address_does_not_cost_the_request(
    serve: Callable[..., Awaitable[FakeServer]],
) -> None:
    """Happy Eyeballs: while the first address hangs, the next is tried a quarter second
    later and the request is answered; it used to wait out the whole connect budget on
    the first address and answer 502."""
    server = await serve(reply(ok(b"alive")))
    # The same port as the live server: the name has one port and two addresses.
    hole = BlackHole(server.port)
    client = TwoAddressClient(hole.address, ("127.0.0.1", server.port))
    try:
        started = time.monotonic()
        response = await client.request("GET", "/", [("Host", "upstream.test")], b"")
        assert await read_body(response) == b"alive"
        assert time.monotonic() - started < 2.0
    finally:
        await client.close()
        hole.close()
