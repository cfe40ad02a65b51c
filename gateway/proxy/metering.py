"""Reading what a completion cost from the upstream's own response, as it passes through.

OpenRouter reports `usage` (tokens and `cost` in USD) in the JSON of a plain response,
and in a separate chunk near the end of a stream. The readers here see the bytes the
client gets, unchanged, and take from them only `model` and `usage` (and a stream's
in-band `error`).

They decode with msgspec into typed structs that hold just those members: every other
member (the completion's text, `choices`, `*_details`...) is skipped by the decoder
without building a Python object, which is why this costs less than `json.loads` does
for the same answer (metering runs for every completion; `bench/` measures it). The
members are typed `Any` and judged after the decode, so a member of an unexpected type
is read the way `json.loads` reads it rather than failing the whole response: tokens
count only as JSON integers, `cost` goes through `usd_to_microdollars`. Text msgspec
refuses but Python's `json` reads (`NaN`, numbers past a float, a lone `\\ud800` escape as
JavaScript's `JSON.stringify` writes a split surrogate pair) is decoded by `json.loads`
and converted to the same structs, so for any JSON text the answer is the one
`json.loads` gives (`tests/test_metering.py` holds the two to that); a body neither
reads gives no usage. One difference is left: bytes that are not UTF-8 inside a skipped
member are not looked at, where `json.loads` refuses the whole body (and charged nothing).

In a stream only `data:` lines are read (`:` comment lines never), and of those only the
first (the stream's model) and the ones that mention usage, an error or `[DONE]`: a
substring search per few kilobytes, and one small decode per line it finds.

No I/O, and no charge: the proxy feeds the readers, asks the `Meter` for the usage and
turns that into the ledger's charge.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from decimal import ROUND_HALF_UP, Decimal, InvalidOperation
from typing import Any, NamedTuple, TypeVar

import msgspec

from gateway.access.rule import is_free_model
from gateway.common.money import MICRODOLLARS_PER_USD

BIGINT_MAX = 2**63 - 1
# Below this many USD (the most one request is charged) a float cost converts exactly
# without Decimal, unless it lies within _NEAR_HALF of a half microdollar.
_FAST_USD_LIMIT = 10_000.0
_NEAR_HALF = 1e-4
METERED_PATHS = frozenset({"chat/completions", "completions"})
# A usage line longer than this is not a usage line; stop buffering rather than grow.
MAX_LINE_BYTES = 1 << 20
# A stream's chunks are read together once this many bytes have come (and at the end):
# a few kilobytes per open stream, read a few times per stream rather than per chunk.
READ_EVERY_BYTES = 16 * 1024
_DATA_PREFIX = b"data:"


class Usage(NamedTuple):
    """What the upstream said a request used; `cost_microdollars` is exact integer money."""

    model: str | None
    prompt_tokens: int | None
    completion_tokens: int | None
    cost_microdollars: int


def usd_to_microdollars(cost: Any) -> int:
    """USD (a JSON number) as whole microdollars, rounded half up; junk counts as 0."""
    if type(cost) is float and 0 < cost < _FAST_USD_LIMIT:
        # Below the limit the product is within 1e-5 of the exact decimal's (two float
        # roundings of at most 2**-53 of 1e10 each), so unless it lies within _NEAR_HALF
        # of a half, rounding it gives the exact decimal's answer.
        scaled = cost * MICRODOLLARS_PER_USD
        if abs(scaled - math.floor(scaled) - 0.5) > _NEAR_HALF:
            return math.floor(scaled + 0.5)
    try:
        value = Decimal(str(cost))
    except (InvalidOperation, ValueError):
        return 0
    if not value.is_finite() or value <= 0:
        return 0
    micro = int((value * MICRODOLLARS_PER_USD).to_integral_value(rounding=ROUND_HALF_UP))
    return min(micro, BIGINT_MAX)


# --- What is decoded ----------------------------------------------------------------------
# Only these members; msgspec skips the others (and ignores unknown ones: no
# `forbid_unknown_fields`). A duplicated key resolves as in `json.loads`: the last wins.
# `gc=False`: decoded values hold no cycles, so the collector need not track them.


class _UsageMembers(msgspec.Struct, gc=False):
    """The members of `usage` that are charged (`total_tokens`, `is_byok`, the details
    objects are skipped). `Any`: judged after the decode (`_usage`)."""

    prompt_tokens: Any = None
    completion_tokens: Any = None
    cost: Any = 0


# `usage` as any JSON value, so that one which is not an object (`null`, a string) gives
# no usage without failing the decode of the rest (a stream chunk's model still counts).
_UsageValue = _UsageMembers | list[Any] | str | int | float | bool | None


class _Response(msgspec.Struct, gc=False):
    """A plain JSON completion: its model and its usage."""

    model: Any = None
    usage: _UsageValue = None


class _StreamChunk(msgspec.Struct, gc=False):
    """One `data:` payload of a stream: its model, its usage, an in-band error."""

    model: Any = None
    usage: _UsageValue = None
    error: Any = None


class _Request(msgspec.Struct, gc=False):
    """A completion request: only the model it asks for (`messages` are skipped)."""

    model: Any = None


_RESPONSE = msgspec.json.Decoder(_Response)
_STREAM_CHUNK = msgspec.json.Decoder(_StreamChunk)
_REQUEST = msgspec.json.Decoder(_Request)

_Decoded = TypeVar("_Decoded", _Response, _StreamChunk, _Request)


def _decode(decoder: msgspec.json.Decoder[_Decoded], text: bytes) -> _Decoded | None:
    """The JSON object `text` as the decoder's struct, as `json.loads` would read it; None
    when it is not a JSON object."""
    try:
        return decoder.decode(text)
    except msgspec.MsgspecError:
        pass  # not JSON to msgspec, or not an object: ask the json module (rare)
    except RecursionError:
        return None  # nested past the recursion limit: json.loads gives up there too
    try:
        # NaN, Infinity, a number past a float, a lone surrogate escape: json.loads reads
        # them, msgspec does not. Whatever json.loads reads is converted to the same struct.
        return msgspec.convert(json.loads(text), decoder.type)
    except (ValueError, RecursionError, msgspec.MsgspecError):
        return None


def _usage(usage: _UsageMembers, model: str | None) -> Usage:
    prompt, completion = usage.prompt_tokens, usage.completion_tokens
    # Positional: a NamedTuple built from keywords costs twice as much, once per request.
    return Usage(
        model,
        prompt if type(prompt) is int else None,  # an integer: not a bool, not a float
        completion if type(completion) is int else None,
        usd_to_microdollars(usage.cost),
    )


# --- The readers --------------------------------------------------------------------------


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
        response = _decode(_RESPONSE, body)
        if response is None or not isinstance(response.usage, _UsageMembers):
            return None
        model = response.model
        return _usage(response.usage, model if isinstance(model, str) else None)


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
        chunk = _decode(_STREAM_CHUNK, payload)
        if chunk is None:
            return
        if isinstance(chunk.model, str):
            self._model = chunk.model
        if isinstance(chunk.error, dict):
            self._error = chunk.error
        if isinstance(chunk.usage, _UsageMembers):
            self._last_usage = _usage(chunk.usage, self._model)


def requested_model(body: bytes) -> str | None:
    """The model a completion request asks for, read as the upstream reads it, or None.

    The body is decoded as JSON (a duplicated key resolves as the upstream resolves it,
    last one wins): a scan for the first "model" could be told one model while the
    upstream runs another. Only `model` is decoded (the conversation is skipped), and only
    when the answer matters (no credit left, or no usage reported).
    """
    request = _decode(_REQUEST, body)
    model = request.model if request is not None else None
    return model if isinstance(model, str) else None


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
