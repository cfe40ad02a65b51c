"""What the upstream client hands its callers: the response, or an error saying what failed.

Apart from the client (`upstream.py`, which re-exports all of it) because the connection
(`connection.py`) makes the responses and raises the errors, and the client is built on
the connection: here they sit below both.

Errors the caller sees are the client's own, and say what happened on the wire, not
what to answer (`proxy.route` maps them to HTTP, once): before the head `UpstreamDown` (no
connection, or it closed), `UpstreamSilent` (no head in time) and `UpstreamMisspoke` (a
response that broke HTTP/1.1), all `UpstreamFailed`; after it `UpstreamBroke`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from multidict import CIMultiDictProxy

if TYPE_CHECKING:
    from gateway.proxy.connection import Connection


class UpstreamFailed(Exception):
    """No usable response head: the request may not have reached the upstream at all."""


class UpstreamDown(UpstreamFailed):
    """No connection to the upstream, or it closed before answering."""


class UpstreamSilent(UpstreamFailed):
    """The upstream sent no response head within the head timeout."""


class UpstreamMisspoke(UpstreamFailed):
    """The upstream's response broke HTTP/1.1; it was dropped with its connection."""


class UpstreamBroke(Exception):
    """The upstream connection failed, misspoke or went silent in the middle of a body."""


class UpstreamResponse:
    """One response: status and headers at once, the body chunk by chunk."""

    __slots__ = ("_conn", "content_length", "content_type", "headers", "reason", "status")

    def __init__(
        self,
        conn: Connection,
        status: int,
        reason: str,
        headers: CIMultiDictProxy[str],
        content_length: int | None,
    ) -> None:
        self._conn = conn
        self.status = status
        self.reason = reason
        self.headers = headers
        self.content_length = content_length
        content_type = headers.get("Content-Type", "")
        self.content_type = content_type.partition(";")[0].strip().lower()

    @property
    def complete(self) -> bool:
        """True once the whole body has arrived (and been taken)."""
        return self._conn.body_done and not self._conn.chunks

    def buffered(self) -> bytes:
        """Body bytes that have arrived and not been taken yet, without waiting."""
        return self._conn.take_all()

    async def read_chunk(self) -> bytes:
        """The next piece of the body as it arrived; b"" at its end; `UpstreamBroke` if cut."""
        return await self._conn.next_chunk()

    def release(self) -> None:
        """Done with the response: reuse the connection if the body ended cleanly, else close."""
        self._conn.finish()

    def close(self) -> None:
        """Drop the connection (which tells the upstream to stop generating)."""
        self._conn.abort()
