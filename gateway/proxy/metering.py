"""Reading what a completion cost from the upstream's own response, as it passes through.

OpenRouter reports `usage` (tokens and `cost` in USD) in the JSON of a plain response,
and in a separate chunk near the end of a stream. The readers here see the bytes the
client gets, unchanged, and take from them only `model` and `usage` (and a stream's
in-band `error`).

They decode with msgspec (`proxy/usage_json.py`) into typed structs that hold just those
members: every other member (the completion's text, `choices`, `*_details`...) is
skipped by the decoder without building a Python object, which is why this costs less
than `json.loads` does for the same answer (metering runs for every completion; `bench/`
measures it). For any JSON text the answer is the one `json.loads` gives
(`tests/test_metering.py` holds the two to that); `usage_json.py` says how.

In a stream only `data:` lines are read (`:` comment lines never), and of those only the
first (the stream's model) and the ones that mention usage, an error or `[DONE]`: a
substring search per few kilobytes, and one small decode per line it finds.

No I/O, and no charge: the proxy feeds the readers, asks the `Meter` for the usage and
turns that into the ledger's charge.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from gateway.access.rule import is_free_model
from gateway.proxy.usage_json import (
    RESPONSE,
    STREAM_CHUNK,
    Usage,
    UsageMembers,
    decode,
    requested_model,
    usage_of,
)

# A usage line longer than this is not a usage line; stop buffering rather than grow.
MAX_LINE_BYTES = 1 << 20
# A stream's chunks are read together once this many bytes have come (and at the end):
# a few kilobytes per open stream, read a few times per stream rather than per chunk.
READ_EVERY_BYTES = 16 * 1024
_DATA_PREFIX = b"data:"


class JsonUsageReader:
    """Collects a plain JSON response and reads its `usage` at the end."""

    __slots__ = ("_chunks", "_size", "overflowed")

    def __init__(self) -> None:
        self._chunks: list[bytes] = []
        self._size = 0
        self.overflowed = False

    def feed(self, chunk: bytes) -> None:
        """See the next bytes of the response body."""
        if self.overflowed:
            return
        self._size += len(chunk)
        if self._size > MAX_LINE_BYTES * 16:
            self.overflowed, self._chunks = True, []
            return
        self._chunks.append(chunk)

    def usage(self) -> Usage | None:
        """The response's usage, once the body is complete."""
        if self.overflowed or not self._chunks:
            return None
        body = self._chunks[0] if len(self._chunks) == 1 else b"".join(self._chunks)
        response = decode(RESPONSE, body)
        if response is None or not isinstance(response.usage, UsageMembers):
            return None
        model = response.model
        return usage_of(response.usage, model if isinstance(model, str) else None)


_WORTH_READING = (b'"usage"', b'"error"', b"[DONE]")


def _lines_worth_reading(complete: bytes, after: int) -> list[tuple[int, int]]:
    """Where the lines that may hold usage, an error or the end are, in order."""
    lines = set()
    for needle in _WORTH_READING:
        at = complete.find(needle, after)
        while at != -1:
            start = complete.rfind(b"\n", 0, at) + 1
            end = complete.find(b"\n", at)
            end = len(complete) if end == -1 else end
            lines.add((start, end))
            at = complete.find(needle, end)
    return sorted(lines)


class SseUsageReader:
    """Follows a `text/event-stream` response and keeps the last usage it reported.

    Chunks are kept as they arrive and read a few kilobytes at a time (and at the end):
    a stream is hundreds of small chunks, and looking at each one as it passed cost more
    than reading them together. Of the lines, only `data:` lines are read, and of those
    only the first (for the stream's model) and the ones that mention usage, an error or
    `[DONE]`.
    """

    __slots__ = (
        "_error",
        "_last_usage",
        "_model",
        "_partial",
        "_saw_done",
        "_seen_data",
        "_unread",
        "_unread_bytes",
    )

    def __init__(self) -> None:
        self._unread: list[bytes] = []
        self._unread_bytes = 0
        self._partial = b""
        self._seen_data = False
        self._last_usage: Usage | None = None
        self._model: str | None = None
        self._error: dict[str, Any] | None = None
        self._saw_done = False

    def feed(self, chunk: bytes) -> None:
        """See the next bytes of the stream, in whatever pieces the network cut it."""
        self._unread.append(chunk)
        self._unread_bytes += len(chunk)
        if self._unread_bytes >= READ_EVERY_BYTES:
            self._read_unread()

    def usage(self) -> Usage | None:
        """The last usage the stream reported so far (the final one wins)."""
        self._read_unread()
        return self._last_usage

    @property
    def model(self) -> str | None:
        """The model the stream named (its first data line, or its usage chunk)."""
        self._read_unread()
        return self._model

    @property
    def error(self) -> dict[str, Any] | None:
        """The in-band error event the stream sent, if any."""
        self._read_unread()
        return self._error

    @property
    def saw_done(self) -> bool:
        """Whether the stream sent its `data: [DONE]`."""
        self._read_unread()
        return self._saw_done

    def _read_unread(self) -> None:
        if not self._unread:
            return
        unread = self._unread[0] if len(self._unread) == 1 else b"".join(self._unread)
        self._unread, self._unread_bytes = [], 0
        data = self._partial + unread if self._partial else unread
        end = data.rfind(b"\n")
        if end == -1:
            self._partial = data if len(data) <= MAX_LINE_BYTES else b""
            return
        rest = data[end + 1 :]
        self._partial = rest if len(rest) <= MAX_LINE_BYTES else b""
        complete = data[:end]
        after = self._first_data_line(complete) if not self._seen_data else 0
        for start, end in _lines_worth_reading(complete, after):
            if complete.startswith(_DATA_PREFIX, start):  # not a comment, event: or id:
                self._data(complete[start + len(_DATA_PREFIX) : end].strip())

    def _first_data_line(self, complete: bytes) -> int:
        """Read the stream's first `data:` line, if it is here; return where it ends."""
        start = 0
        if not complete.startswith(_DATA_PREFIX):
            start = complete.find(b"\n" + _DATA_PREFIX) + 1
            if start == 0:
                return 0  # comments so far
        end = complete.find(b"\n", start)
        end = len(complete) if end == -1 else end
        self._seen_data = True
        self._data(complete[start + len(_DATA_PREFIX) : end].strip())
        return end

    def _data(self, payload: bytes) -> None:
        """One `data:` line's payload: the stream's first, or one worth reading."""
        if not payload.startswith(b"{"):  # only an object holds a model, usage or error
            if payload == b"[DONE]":
                self._saw_done = True
            return
        chunk = decode(STREAM_CHUNK, payload)
        if chunk is None:
            return
        if isinstance(chunk.model, str):
            self._model = chunk.model
        if isinstance(chunk.error, dict):
            self._error = chunk.error
        if isinstance(chunk.usage, UsageMembers):
            self._last_usage = usage_of(chunk.usage, self._model)


class Meter:
    """Follows one metered request: its model, and the usage its response reported."""

    __slots__ = ("_body", "_model", "_model_known", "_reader", "streamed")

    def __init__(self, body: bytes) -> None:
        self._body = body
        self._model: str | None = None
        self._model_known = False
        self._reader: SseUsageReader | JsonUsageReader | None = None
        self.streamed = False

    def model(self) -> str | None:
        """The requested model (read from the body once, on first ask)."""
        if not self._model_known:
            self._model, self._model_known = requested_model(self._body), True
        return self._model

    def start(self, content_type: str) -> Callable[[bytes], None]:
        """The response's headers arrived: pick the reader its content type needs, and
        return what to feed every body chunk to (the reader's own `feed`, called for
        every chunk of every stream, with no call in between)."""
        self.streamed = content_type == "text/event-stream"
        self._reader = SseUsageReader() if self.streamed else JsonUsageReader()
        return self._reader.feed

    def usage(self) -> Usage:
        """What the request is charged: the usage the upstream reported, nothing for
        `:free` models; with none reported (an error, a response cut short or never
        begun), the requested model at no cost.

        The model is the one the upstream says it ran, else the one requested.
        """
        usage = self._reader.usage() if self._reader is not None else None
        if usage is None:
            return Usage(self.model(), None, None, 0)
        model = usage.model or self.model()
        cost = 0 if is_free_model(model) else usage.cost_microdollars
        return Usage(model, usage.prompt_tokens, usage.completion_tokens, cost)
