"""Request heads the proxy route's own connection handler serves itself, and no others.

The head is parsed by llhttp (through `httptools`), the parser aiohttp itself is built
on, so both read the same bytes the same way. What llhttp reports is then held to a
narrow whitelist (HTTP/1.1, a few methods, a plain path and query, ASCII field values,
no repeated singleton header, a Content-Length within bounds, nothing that changes body
framing or the protocol). `parse_head` returns None for anything else, and that request
and its connection go to aiohttp, which keeps every refusal and every unusual case.
"""

from __future__ import annotations

import dataclasses
import re

import httptools
from multidict import CIMultiDict, CIMultiDictProxy

from gateway.platform.aiohttp_internals import SINGLETON_HEADERS

# A longer head goes to aiohttp, whose limits then apply (8190 bytes a line).
MAX_HEAD_BYTES = 8190
# aiohttp refuses more header lines than this.
MAX_HEADERS = 128
# More digits than any body the gateway accepts (and int() refuses past 4,300).
MAX_LENGTH_DIGITS = 15
_METHODS = frozenset({b"GET", b"POST", b"PUT", b"PATCH", b"DELETE", b"OPTIONS"})
# Headers whose handling stays aiohttp's: body framing and decoding, interim responses,
# protocol switches.
_HAND_OVER_HEADERS = frozenset({"transfer-encoding", "content-encoding", "expect", "upgrade"})
# No percent-encoding, dot or empty segments: paths aiohttp might read differently.
_PLAIN_PATH = re.compile(r"/api/openrouter/[A-Za-z0-9\-_~!$&'()*+,;=:@/.]*")
_PLAIN_QUERY = re.compile(r"[!-\"$-~]*")  # visible ASCII but "#"
_FIELD_VALUE = re.compile(rb"[\t -~]*")  # no control characters, ASCII only


@dataclasses.dataclass(frozen=True, slots=True)
class RequestHead:
    """A request head the proxy route's own handler serves itself."""

    method: str
    raw_path: str
    query_string: str
    headers: CIMultiDictProxy[str]
    content_length: int
    close: bool


class _HeadFields:
    """llhttp's callbacks for one head: the target and the header lines, as they come."""

    __slots__ = ("complete", "fields", "url")

    def __init__(self) -> None:
        self.url = b""
        self.fields: list[tuple[bytes, bytes]] = []
        self.complete = False

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.fields.append((name, value))

    def on_headers_complete(self) -> None:
        self.complete = True


def parse_head(head: bytes | bytearray, max_body_bytes: int) -> RequestHead | None:
    """The request head (up to and with its blank line) if it is one served here, else None."""
    if len(head) > MAX_HEAD_BYTES:
        return None
    fields = _HeadFields()
    parser = httptools.HttpRequestParser(fields)
    try:
        parser.feed_data(head)
    except httptools.HttpParserUpgrade:
        return None  # CONNECT, Upgrade: aiohttp's
    except httptools.HttpParserError:
        return None  # aiohttp's parser, llhttp too, refuses it in the envelope
    if not fields.complete or parser.get_http_version() != "1.1":
        return None
    method = parser.get_method()
    if method not in _METHODS or len(fields.fields) > MAX_HEADERS:
        return None
    try:
        target = fields.url.decode("ascii")
    except UnicodeDecodeError:
        return None
    path, _, query = target.partition("?")
    if (
        not _PLAIN_PATH.fullmatch(path)
        or "//" in path
        or "/." in path
        or not _PLAIN_QUERY.fullmatch(query)
    ):
        return None
    return _whitelisted(method.decode(), path, query, fields.fields, max_body_bytes)


def _whitelisted(
    method: str,
    path: str,
    query: str,
    fields: list[tuple[bytes, bytes]],
    max_body_bytes: int,
) -> RequestHead | None:
    """The head, if its header lines are all ones served here."""
    headers: CIMultiDict[str] = CIMultiDict()
    content_length: int | None = None
    singletons: set[str] = set()
    close = False
    for raw_name, raw_value in fields:
        if not _FIELD_VALUE.fullmatch(raw_value):
            return None
        # llhttp holds names to the token grammar: ASCII.
        name, value = raw_name.decode("ascii"), raw_value.decode("ascii").strip(" \t")
        lowered = name.lower()
        if lowered in _HAND_OVER_HEADERS:
            return None
        if lowered in SINGLETON_HEADERS:
            if lowered in singletons:
                return None  # aiohttp answers 400
            singletons.add(lowered)
        if lowered == "content-length":
            if not value.isdigit() or len(value) > MAX_LENGTH_DIGITS:
                return None
            content_length = int(value)
        elif lowered == "connection":
            # Not llhttp's should_keep_alive(): it forgets once a message without a
            # body is complete, as here.
            close = close or "close" in {token.strip().lower() for token in value.split(",")}
        headers.add(name, value)
    if "host" not in singletons:
        return None  # aiohttp answers 400
    if content_length is None:
        content_length = 0
    if content_length > max_body_bytes:
        return None  # aiohttp answers 413
    return RequestHead(method, path, query, CIMultiDictProxy(headers), content_length, close)
