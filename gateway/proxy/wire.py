"""HTTP/1.1 as it goes to and comes from the upstream: the request head, the response's.

Parsing is llhttp's (through `httptools`, the parser aiohttp and uvicorn are built on), in
its strict mode, and what it hands over is then held to RFC 9110's grammar here, because
the proxy relays the status line and the headers as they came. llhttp itself takes a
NUL or DEL in the reason phrase, a status of 099 or 600, HTTP/0.9 and HTTP/2.0, any
number of interim responses, a body on a 1xx, and it has no limit on a head's size, its
lines or its headers; those are refused here, with aiohttp's limits (8190 bytes a line,
128 headers). A response that breaks the protocol is never relayed and its connection
never reused.

`HeadParser` is the head's half of a connection's llhttp callback object, apart from the
socket, the body and the timers (`connection.py`), so that the rules the bytes are held to
read in one place.
"""

from __future__ import annotations

from collections.abc import Iterable

import httptools
from multidict import CIMultiDict, CIMultiDictProxy

IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})
# A head longer than this is not one OpenRouter sends (interim heads count towards it).
MAX_HEAD_BYTES = 64 * 1024
# aiohttp's limits: the gateway relays no head that aiohttp's own client would refuse.
MAX_LINE_BYTES = 8190
MAX_HEADERS = 128
# OpenRouter sends no interim response (100 Continue, 103 Early Hints); an upstream that
# sends many is looping, not informing.
MAX_INTERIM_RESPONSES = 10
# Exabytes, past any body; llhttp itself takes up to 2**64 - 1.
MAX_LENGTH_DIGITS = 18

# Responses that never have a body, whatever their headers say (RFC 9112 §6.3).
NO_BODY_STATUSES = frozenset({204, 304})
_VERSIONS = frozenset({"1.0", "1.1"})
_FRAMING_HEADERS = frozenset({b"content-length", b"transfer-encoding"})
# RFC 9110 §5.6.2's tchar, and §5.5's field-vchar (VCHAR and obs-text), SP and HTAB, which
# are also the reason phrase's (RFC 9112 §4); the LF is what the fields are joined with.
_TOKEN_BYTES_LF = b"\n!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
_TEXT_BYTES = b"\t " + bytes(range(0x21, 0x7F)) + bytes(range(0x80, 0x100))
_TEXT_BYTES_LF = b"\n" + _TEXT_BYTES
# Where the response to the request in flight is: waiting for its final head, in its
# body, ended, or broken; idle before the first request.
IDLE, HEAD, BODY, DONE, BROKEN = "idle", "head", "body", "done", "broken"


class Refused(Exception):
    """Raised in a parser callback: the response breaks the protocol (the message says how)."""


class Stray(Exception):
    """Raised in a parser callback: bytes follow the end of the response."""


_OUR_EXCEPTIONS = (Refused, Stray)


def request_head(
    host_header: str, method: str, target: str, headers: Iterable[tuple[str, str]], body: bytes
) -> bytes:
    """The request line and headers; ValueError for a header that would split them."""
    lines = [f"{method} {target} HTTP/1.1\r\nHost: {host_header}\r\n"]
    for name, value in headers:
        if "\r" in value or "\n" in value or "\r" in name or "\n" in name:
            raise ValueError("header name or value with a line break")
        lines.append(f"{name}: {value}\r\n")
    if body or method not in IDEMPOTENT_METHODS:
        lines.append(f"Content-Length: {len(body)}\r\n")
    lines.append("\r\n")
    return "".join(lines).encode("utf-8", "surrogateescape")


class HeadParser:
    """The head's state and llhttp's callbacks for it, up to the final head, checked."""

    _parser: httptools.HttpResponseParser
    _parser_spent: bool
    _head_only: bool
    _phase: str
    _tail: bytes
    _reason: bytes
    _names: list[bytes]
    _values: list[bytes]
    _interims: int
    _interim_bytes: int
    _head_fed: int

    def _reset_head(self, *, head_request: bool) -> None:
        """Parsing state for the next response's head."""
        if self._parser_spent:
            self._parser = httptools.HttpResponseParser(self)
        # llhttp starts each message afresh, but after a HEAD's response it still waits for
        # that response's body. (A connection whose response broke is never reused.)
        self._parser_spent = head_request
        self._head_only = head_request
        self._phase = HEAD
        self._tail = b""  # the last bytes fed of a HEAD's response, for _feed_up_to_head
        self._reason = b""
        self._names = []
        self._values = []
        self._interims = 0
        self._interim_bytes = 0
        self._head_fed = 0  # bytes received while the final head was not complete

    def _misspoke(self, cause: BaseException) -> None:
        """The response broke the protocol (or bytes followed it): the connection's to drop."""
        raise NotImplementedError

    def _feed_parser(self, data: bytes) -> bool:
        """Give llhttp the bytes; False if the response broke the protocol with them."""
        try:
            if self._head_only and self._phase == HEAD:
                self._feed_up_to_head(data)
            else:
                self._parser.feed_data(data)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade) as exc:
            # httptools makes a callback's own exception the context of its error.
            cause = exc.__context__
            if isinstance(exc, httptools.HttpParserCallbackError):
                if not isinstance(cause, _OUR_EXCEPTIONS):
                    raise  # a bug in a callback, not the upstream's doing: let it be seen
            else:
                cause = exc
            self._misspoke(cause)
            return False
        return True

    def _feed_up_to_head(self, data: bytes) -> None:
        """Feed the response to a HEAD up to the end of its final head, never past it.

        llhttp cannot be told that the request was HEAD: past the head it would take as
        body the bytes a Content-Length announces, which never come, and so the next
        response. A head llhttp accepts ends at its first CRLFCRLF (a bare CR or LF it
        refuses), and a 1xx has no body, so the data goes in pieces, each ending at one.
        """
        joined = self._tail + data
        carried = len(self._tail)
        view = memoryview(data)
        fed = search = 0
        while self._phase == HEAD:
            end = joined.find(b"\r\n\r\n", search)
            if end == -1:
                self._parser.feed_data(view[fed:])
                self._tail = joined[-3:]  # a CRLFCRLF may span two reads
                return
            search = end + 4
            self._parser.feed_data(view[fed : search - carried])
            fed = search - carried
        if fed < len(data):
            self._misspoke(Stray("bytes after the head of a response to HEAD"))

    # -- llhttp's callbacks ----------------------------------------------------------

    def on_message_begin(self) -> None:
        if self._phase != HEAD:
            # llhttp goes on to the next message; on this connection there is none yet.
            raise Stray("bytes after the end of the response")

    def on_status(self, status: bytes) -> None:
        self._reason += status  # in pieces when the status line spans two reads

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._phase == HEAD:  # else a trailer: read, never relayed
            self._names.append(name)
            self._values.append(value)

    # -- the checks ------------------------------------------------------------------

    def _checked_head(self) -> tuple[int, str, CIMultiDictProxy[str], int | None] | None:
        """The final head's status, version, headers and Content-Length; None for a 1xx."""
        parser = self._parser
        status = parser.get_status_code()
        if status < 200:
            self._interim(status)
            return None
        # llhttp takes any three digits, and any version of one digit each.
        if status > 599:
            raise Refused(f"status {status}")
        version = parser.get_http_version()
        if version not in _VERSIONS:
            raise Refused(f"HTTP/{version}")
        if self._head_fed > MAX_LINE_BYTES:
            self._check_size()  # else no line, nor the head, can be too long
        if self._reason.translate(None, _TEXT_BYTES):
            raise Refused("a byte outside the reason phrase's grammar")
        headers = self._headers()
        lengths = headers.getall("Content-Length", None)
        content_length = None if lengths is None else _content_length(lengths)
        return status, version, headers, content_length

    def _interim(self, status: int) -> None:
        """An interim response (100 Continue, 103 Early Hints): dropped; the final one follows."""
        if status < 100:
            raise Refused(f"status {status}")
        if status == 101:
            raise Refused("a switch of protocols")
        self._interims += 1
        if self._interims > MAX_INTERIM_RESPONSES:
            raise Refused("more than MAX_INTERIM_RESPONSES interim responses")
        if len(self._names) > MAX_HEADERS:
            raise Refused("more than MAX_HEADERS header lines")
        # A 1xx ends with its head (RFC 9110 §15.2); llhttp would read the body a
        # Content-Length announced on one.
        if any(name.lower() in _FRAMING_HEADERS for name in self._names):
            raise Refused("body framing on an interim response")
        if self._head_fed > MAX_LINE_BYTES:
            self._check_size()
        self._interim_bytes += self._head_size()[0]
        self._reason, self._names, self._values = b"", [], []

    def _head_size(self) -> tuple[int, int]:
        """The head's size and its longest line, less the whitespace llhttp drops."""
        lines = [
            len(name) + 2 + len(value)
            for name, value in zip(self._names, self._values, strict=True)
        ]
        lines.append(len(b"HTTP/1.1 200 ") + len(self._reason))
        return sum(lines) + 2 * len(lines) + 2, max(lines)

    def _check_size(self) -> None:
        size, longest = self._head_size()
        if longest > MAX_LINE_BYTES:
            raise Refused("a head line longer than MAX_LINE_BYTES")
        if self._interim_bytes + size > MAX_HEAD_BYTES:
            raise Refused("a response head longer than MAX_HEAD_BYTES")

    def _headers(self) -> CIMultiDictProxy[str]:
        """The head's fields, held to RFC 9110's grammar, and decoded."""
        names, values = self._names, self._values
        if not names:
            return CIMultiDictProxy(CIMultiDict())
        if len(names) > MAX_HEADERS:
            raise Refused("more than MAX_HEADERS header lines")
        # Joined by a byte no field may hold, all the fields are checked and decoded in a
        # few calls, however many there are.
        joined_names = b"\n".join(names)
        joined_values = b"\n".join(values)
        if joined_names.translate(None, _TOKEN_BYTES_LF) or joined_values.translate(
            None, _TEXT_BYTES_LF
        ):
            raise Refused("a byte outside the field grammar in a header")
        name_list = joined_names.decode("ascii").split("\n")
        value_text = joined_values.decode("utf-8", "surrogateescape")
        value_list = value_text.split("\n")
        if len(name_list) != len(names) or len(value_list) != len(values) or "" in name_list:
            raise Refused("a line break in a header, or an empty name")
        if " \n" in value_text or "\t\n" in value_text or value_text[-1:] in " \t":
            # llhttp drops the whitespace before a value, not after it.
            value_list = [value.rstrip(" \t") for value in value_list]
        # multidict takes a list faster than any other iterable.
        return CIMultiDictProxy(CIMultiDict(list(zip(name_list, value_list, strict=True))))


def _content_length(lengths: list[str]) -> int:
    """The one Content-Length, read strictly (RFC 9110 §8.6)."""
    length = lengths[0]
    # llhttp refuses a repeated field, but takes any number of digits its counter holds.
    if len(lengths) > 1 and any(other != length for other in lengths):
        raise Refused("differing Content-Lengths")
    if not (length.isascii() and length.isdigit() and len(length) <= MAX_LENGTH_DIGITS):
        raise Refused("an invalid Content-Length")
    return int(length)


def persistent(version: str, headers: CIMultiDictProxy[str]) -> bool:
    """Whether the connection stays open after the response (RFC 9112 §9.3)."""
    options = {
        o.strip(" \t") for o in ",".join(headers.getall("Connection", ())).lower().split(",")
    }
    return "close" not in options and (version == "1.1" or "keep-alive" in options)
