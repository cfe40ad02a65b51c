"""How a request served on the proxy route's own connection gets its response: `ConnectionSink`.

It writes the relayed response straight to the connection (`fastpath.ProxyConnection`),
with the HTTP/1.1 framing aiohttp would add: a Date header (formatted once a second),
Content-Length or chunked encoding, Connection: close when the connection ends. The head
waits to leave with the first body bytes, so that a response that arrives whole goes out
in one write.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Mapping
from email.utils import formatdate
from http import HTTPStatus
from typing import Protocol

from multidict import CIMultiDict

from gateway.proxy.upstream import NO_BODY_STATUSES


class Connection(Protocol):
    """The connection a sink writes to (`fastpath.ProxyConnection`)."""

    async def send(self, data: bytes) -> None:
        """Write, then wait while the client reads slower than the upstream sends."""

    def close(self) -> None:
        """Close the connection."""


@functools.lru_cache(maxsize=1)
def _http_date_at(second: int) -> str:
    """The Date header's value for a second: formatted once per second, not per response."""
    return formatdate(second, usegmt=True)


def _http_date() -> str:
    return _http_date_at(int(time.time()))


def status_phrase(status: int) -> str:
    """The reason phrase for a status the gateway answers with itself."""
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"


def encode_head(status: int, reason: str, headers: Mapping[str, str]) -> bytes:
    """A response head as it goes on the wire, written by the gateway's own servers."""
    lines = [f"HTTP/1.1 {status} {reason}\r\n"]
    lines.extend(f"{name}: {value}\r\n" for name, value in headers.items())
    lines.append("\r\n")
    # Upstream headers were decoded with surrogateescape: their bytes go out unchanged.
    return "".join(lines).encode("utf-8", "surrogateescape")


class ConnectionSink:
    """A relayed response written straight to the connection."""

    def __init__(self, connection: Connection, close: bool) -> None:
        self._connection = connection
        self.closes = close  # the connection ends with this response
        self._head = b""
        self._chunked = False
        self.status = 0
        self.started = False
        self.ended = False

    async def start(
        self, status: int, reason: str, headers: CIMultiDict[str], content_length: int | None
    ) -> None:
        """Prepare the head; it leaves with the first body bytes (or at the end)."""
        self.status = status
        if "Date" not in headers:
            headers["Date"] = _http_date()
        if status in NO_BODY_STATUSES or status < 200:
            pass
        elif content_length is not None:
            headers["Content-Length"] = str(content_length)
        else:
            headers["Transfer-Encoding"] = "chunked"
            self._chunked = True
        if self.closes:
            headers["Connection"] = "close"
        self._head = encode_head(status, reason, headers)
        self.started = True

    async def write(self, data: bytes) -> None:
        if data and self._chunked:
            data = b"%x\r\n%b\r\n" % (len(data), data)
        if self._head:
            data, self._head = self._head + data, b""
        if data:
            await self._connection.send(data)

    async def end(self) -> None:
        tail = b"0\r\n\r\n" if self._chunked else b""
        data, self._head = self._head + tail, b""
        if data:
            await self._connection.send(data)
        self.ended = True

    def abort(self) -> None:
        self._connection.close()
