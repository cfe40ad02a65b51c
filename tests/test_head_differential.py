"""The fast path reads every head it serves exactly as aiohttp would, or hands it over.

Random request heads, some well formed and most not (odd methods and targets, bare CR or
LF, NUL, obs-fold, repeated or missing Host, framing headers, non-ASCII, too many lines),
go both to `proxyserver.parse_head` and to aiohttp's own parser (llhttp, as the server
runs it). Whenever the fast path serves a head, aiohttp must accept the same bytes and
read the same method, path, query, headers, body length and keep-alive; otherwise the
two could frame or route one connection differently (request smuggling). A head the fast
path declines is aiohttp's anyway, so any answer is fine there.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from aiohttp.base_protocol import BaseProtocol
from aiohttp.http_parser import HttpRequestParser
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from gateway.serve.heads import RequestHead, parse_head

# Thousands of examples each, all CPU: 11 s alone, and past the default 60 s when the
# cores are shared with the other xdist workers. The limit is there to catch a hang.
pytestmark = pytest.mark.timeout(240)
MAX_BODY = 10_000


def pieces(good: list[str], bad: list[str]) -> tuple[st.SearchStrategy[str], ...]:
    """A plausible piece of a head, and one that may be hostile."""
    return st.sampled_from(good), st.sampled_from(good + bad)


_METHOD, _ANY_METHOD = pieces(["POST", "GET", "OPTIONS"], ["PUT", "HEAD", "TRACE", "post", ""])
_PATH_CHAR, _ANY_PATH_CHAR = pieces(
    [*"abcz/-_~0123456789"],
    [*".%?#=&:@!$'()*+,; ", "%2F", "\t", "\x00", "\x7f", "é", "\r", "\n", "//", "/.."],
)
_VERSION, _ANY_VERSION = pieces(["HTTP/1.1"], ["HTTP/1.0", "HTTP/2.0", "http/1.1", "HTTP/1.1 "])
_NAME, _ANY_NAME = pieces(
    ["Connection", "Authorization", "X-Kilocode-OrganizationId", "X-A", "Content-Type"],
    [
        *(
            "Content-Length",
            "Host",
            "host",
            "Transfer-Encoding",
            "Expect",
            "Upgrade",
            "Content-Encoding",
            "X A",
        ),
        *("X-A ", " X-A", "", "X\x00A", "Ünïcode", "X-\x7f"),
    ],
)
_VALUE_PIECE, _ANY_VALUE_PIECE = pieces(
    ["gw", "12", "0", "1", "close", "keep-alive", "Bearer t", "application/json", " ", ","],
    [
        *("", "\t", "\x00", "\r", "\n", "\x7f", "é", "\x80", "+5", "-1", "0x10", "99999"),
        *("chunked", "100-continue", "gzip", "websocket", "upgrade"),
    ],
)
_SEPARATOR, _ANY_SEPARATOR = pieces([": ", ":", ":\t"], [" : ", ": \t ", " :"])
_LINE_END, _ANY_LINE_END = pieces(["\r\n"], ["\n", "\r", "\r\r\n", "\n\r"])
_TARGET_START, _ANY_TARGET_START = pieces(
    ["/api/openrouter/", "/api/openrouter/chat/completions", "/api/openrouter/models?a=1&b="],
    ["/healthz", "*", "http://gw/api/openrouter/chat/completions"],
)
_LENGTH = st.builds("Content-Length: {}\r\n".format, st.integers(0, 20))
_OFTEN = st.sampled_from([True, True, True, True, False])


def _line(method: Any, start: Any, char: Any, version: Any) -> Any:
    return st.builds(
        lambda m, t, tail, v: f"{m} {t}{''.join(tail)} {v}",
        method,
        start,
        st.lists(char, max_size=8),
        version,
    )


def _field(name: Any, separator: Any, piece: Any, end: Any) -> Any:
    return st.builds(
        lambda n, s, v, e: f"{n}{s}{''.join(v)}{e}",
        name,
        separator,
        st.lists(piece, max_size=3),
        end,
    )


_PLAUSIBLE_LINE = _line(_METHOD, _TARGET_START, _PATH_CHAR, _VERSION)
_ANY_LINE = _line(_ANY_METHOD, _ANY_TARGET_START, _ANY_PATH_CHAR, _ANY_VERSION)
_PLAUSIBLE_FIELD = _field(_NAME, _SEPARATOR, _VALUE_PIECE, _LINE_END)
_ANY_FIELD = _field(_ANY_NAME, _ANY_SEPARATOR, _ANY_VALUE_PIECE, _ANY_LINE_END)


@st.composite
def heads(draw: Any) -> bytes:
    """A request head with its blank line: mostly plausible lines, a hostile one now and then."""
    line = draw(st.one_of(_PLAUSIBLE_LINE, _PLAUSIBLE_LINE, _ANY_LINE))
    field = st.one_of(*[_PLAUSIBLE_FIELD] * 6, _ANY_FIELD)
    fields = draw(st.lists(field, max_size=6))
    # Usually a Host and a length, so that the head may be one served here.
    for usual in ("Host: gw\r\n", draw(_LENGTH)):
        if draw(_OFTEN):
            fields.insert(draw(st.integers(0, len(fields))), usual)
    if not draw(st.integers(0, 20)):  # now and then, more lines than aiohttp takes
        fields.extend(["X-Filler: 1\r\n"] * draw(st.integers(120, 140)))
    return (line + "\r\n" + "".join(fields) + "\r\n").encode("utf-8", "surrogatepass")


def aiohttp_reads(raw: bytes, loop: asyncio.AbstractEventLoop) -> Any:
    """aiohttp's reading of one request (raises what aiohttp would refuse it with)."""
    parser = HttpRequestParser(BaseProtocol(loop), loop, 2**16, max_line_size=8190)
    messages, _upgraded, _tail = parser.feed_data(raw)
    assert len(messages) == 1, "aiohttp did not read exactly one request"
    return messages[0][0]


def assert_same_reading(served: RequestHead, message: Any) -> None:
    assert message.method == served.method
    assert message.version == (1, 1)
    assert message.url.raw_path == served.raw_path
    assert message.url.raw_query_string == served.query_string
    # Names compare without case: aiohttp spells the ones it knows its own way.
    assert [(k.lower(), v) for k, v in message.headers.items()] == [
        (k.lower(), v) for k, v in served.headers.items()
    ]
    assert int(message.headers.get("Content-Length", "0")) == served.content_length
    assert message.should_close == served.close
    assert not message.chunked and not message.upgrade and message.compression is None


def check_head(raw: bytes) -> None:
    served = parse_head(raw, MAX_BODY)
    if served is None:
        return  # aiohttp's to serve or refuse
    loop = asyncio.new_event_loop()
    try:
        message = aiohttp_reads(raw + b"x" * served.content_length, loop)
    finally:
        loop.close()
    assert_same_reading(served, message)


@settings(max_examples=3000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(heads())
@example(b"POST /api/openrouter/chat/completions HTTP/1.1\r\nHost: gw\r\nContent-Length: 2\r\n\r\n")
@example(b"GET /api/openrouter/models?a=1&b HTTP/1.1\r\nHost: gw\r\nX-A:\t v \t\r\n\r\n")
@example(b"POST /api/openrouter/chat/completions HTTP/1.1\r\nhost: a\r\nHost: b\r\n\r\n")
@example(b"POST /api/openrouter/chat/completions HTTP/1.1\r\nContent-Length: 1\r\n\r\n")
def test_the_fast_path_reads_a_head_as_aiohttp_does_or_hands_it_over(raw: bytes) -> None:
    check_head(raw)


@settings(max_examples=2000, deadline=None)
@given(st.data())
def test_a_mutated_head_is_read_as_aiohttp_does_or_handed_over(data: st.DataObject) -> None:
    """A well-formed head with bytes replaced, inserted or removed anywhere."""
    raw = bytearray(
        b"POST /api/openrouter/chat/completions?x=1 HTTP/1.1\r\nHost: gw\r\n"
        b"Authorization: Bearer sk-kilo-1\r\nConnection: keep-alive\r\n"
        b"Content-Type: application/json\r\nContent-Length: 5\r\n\r\n"
    )
    for _ in range(data.draw(st.integers(1, 4))):
        at = data.draw(st.integers(0, len(raw) - 1))
        byte = data.draw(st.sampled_from(b"\r\n\x00\t :/?#%.\x7f\x80aZ0"))
        action = data.draw(st.sampled_from(["replace", "insert", "delete"]))
        if action == "replace":
            raw[at] = byte
        elif action == "insert":
            raw.insert(at, byte)
        else:
            del raw[at]
    end = raw.find(b"\r\n\r\n")
    if end != -1:
        check_head(bytes(raw[: end + 4]))
