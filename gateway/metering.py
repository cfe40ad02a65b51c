"""Reading what a completion cost from the upstream's own response, as it passes through.

OpenRouter reports `usage` (tokens and `cost` in USD) in the JSON of a plain response,
and in a separate chunk near the end of a stream. The readers here see the bytes the
client gets, unchanged, and only read what can hold usage: in a stream, the first
`data:` line (the model) and the `data:` lines that mention usage, an error or `[DONE]`
(`:` comment lines never); in a JSON response, its end. OpenRouter's own shape is read
with a few anchored patterns, anything else by decoding. Metering runs for every
completion, so its cost is measured (`bench/`). No I/O: the proxy feeds the readers,
the usage module charges.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from decimal import ROUND_HALF_UP, Decimal, InvalidOperation
from typing import Any, NamedTuple

from gateway.rule import MICRODOLLARS_PER_USD, is_free_model
from gateway.usage import Charge

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


def usage_from_object(obj: Any, model: str | None = None) -> Usage | None:
    """The usage in a decoded response object or stream chunk, if it carries one."""
    if not isinstance(obj, dict):
        return None
    usage = obj.get("usage")
    if not isinstance(usage, dict):
        return None
    reported_model = obj.get("model")
    return _usage(usage, reported_model if isinstance(reported_model, str) else model)


def _usage(usage: dict[str, Any], model: str | None) -> Usage:
    # Positional: a NamedTuple built from keywords costs twice as much, once per request.
    return Usage(
        model,
        _int_or_none(usage.get("prompt_tokens")),
        _int_or_none(usage.get("completion_tokens")),
        usd_to_microdollars(usage.get("cost", 0)),
    )


def _int_or_none(value: Any) -> int | None:
    return value if type(value) is int else None  # not a bool, not a float


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
        usage = usage_at_the_end(body)
        if usage is not None:
            return usage
        try:
            return usage_from_object(json.loads(body))
        except (ValueError, RecursionError):
            return None


_USAGE_KEY = b'"usage"'
_MODEL_KEY = b'"model"'
_WHITESPACE = b" \t\r\n"
_CLOSE_BRACE = 0x7D
# A key's colon and the start of its value: an object for usage, a string without
# escapes for the model (one with escapes is left to the full decode).
_USAGE_MEMBER = re.compile(rb'"usage"[ \t\r\n]*:[ \t\r\n]*(?=\{)')
_MODEL_MEMBER = re.compile(rb'"model"[ \t\r\n]*:[ \t\r\n]*"([^"\\]*)"')
_BACKSLASH = 0x5C
# The C scanner behind json.loads, called directly: the value at an index of a str and
# where it ends (json.loads adds a wrapper, a type check and two whitespace matches).
_SCAN_JSON_VALUE: Callable[[str, int], tuple[Any, int]]
_SCAN_JSON_VALUE = json.JSONDecoder().scan_once  # type: ignore[attr-defined]


# OpenRouter's own shape, read without decoding: a body that opens with `id`, `provider`
# and `model`, and ends with a usage object that starts with the tokens and the cost,
# its other members (`is_byok`, `*_details`) scalars or flat objects whose strings hold
# no brace, bracket, quote or backslash. Its skeleton (those characters alone) then
# shows that it ends just before the body's closing brace, not inside an array. Keys
# already read may not come again (a decoder keeps the last). Anything else is read by
# the general path, so this only has to give the same answer when it matches JSON.
_INT = rb"(0|[1-9][0-9]*)"
_NUMBER = rb"(-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][-+]?[0-9]+)?)"
_PLAIN_TEXT = rb"[\x20\x21\x23-\x5b\x5d-\x7e]*"  # printable ASCII, no quote or backslash
_OPENROUTER_HEAD = re.compile(
    rb'\{"id":"'
    + _PLAIN_TEXT
    + rb'","provider":"'
    + _PLAIN_TEXT
    + rb'","model":"('
    + _PLAIN_TEXT
    + rb')"'
)
_OPENROUTER_USAGE = re.compile(
    rb'"usage":\{"prompt_tokens":'
    + _INT
    + rb',"completion_tokens":'
    + _INT
    + rb',"total_tokens":(?:0|[1-9][0-9]*),"cost":'
    + _NUMBER
    + rb"(?=[,}])"
)
_NOT_SKELETON = bytes(set(range(256)) - set(b'{}[]"\\'))
# Members with plain strings and flat objects, the usage object's brace, the body's.
_USAGE_TAIL_SKELETON = re.compile(rb'(?:""|\{(?:"")*\})*\}\}\Z')
_KEY_READ = re.compile(rb'"(?:prompt_tokens|completion_tokens|cost|model)"')


def openrouter_usage(body: bytes) -> Usage | None:
    """The usage of a JSON response in OpenRouter's own shape, or None.

    Metering runs for every completion, so this is a handful of C calls: two anchored
    patterns, a search and a translation, each over a few hundred bytes at most.
    """
    at = body.rfind(_USAGE_KEY)
    model = _openrouter_model(body, at)
    known = _OPENROUTER_USAGE.match(body, at) if model is not None else None
    if known is None:
        return None
    tail = body[known.end() :].rstrip(_WHITESPACE)
    if (
        _USAGE_TAIL_SKELETON.match(tail.translate(None, _NOT_SKELETON)) is None
        or _KEY_READ.search(tail) is not None
    ):
        return None
    prompt, completion, cost = known.groups()
    return Usage(
        model,
        int(prompt),
        int(completion),
        # As a decoder reads a JSON number: an int unless it has a fraction or exponent.
        usd_to_microdollars(int(cost) if cost.isdigit() else float(cost)),
    )


def _openrouter_model(body: bytes, before: int) -> str | None:
    """The model named at the head of a body in OpenRouter's shape, when no other "model"
    key comes before `before` (a decoder keeps the last); else None."""
    head = _OPENROUTER_HEAD.match(body)
    if head is None or head.end() >= before or body.find(_MODEL_KEY, head.end(), before) != -1:
        return None
    return head.group(1).decode("ascii")  # printable ASCII without escapes: as it reads


def usage_at_the_end(body: bytes) -> Usage | None:
    """The usage of a JSON response that ends with it, as OpenRouter's do; None when unsure.

    Decoding a whole response to read its last member was the largest part of metering's
    cost. A `"usage"` whose quotes are not escaped is a key (inside a string every quote
    is escaped). When the text from its value to the body's closing brace is one JSON
    object and nothing else, that object is the value and it is the top-level object's
    last member: anything after it (another member, the closing bracket of a nested
    value) is left over. The top-level `"model"` is read the same way: the only one in
    the body, with nothing but the object's own brace opened before it, a plain string.
    Anything else returns None, and the caller decodes the whole body.
    """
    known = openrouter_usage(body)
    if known is not None:
        return known
    closing = len(body.rstrip(_WHITESPACE)) - 1
    if closing <= 0 or body[closing] != _CLOSE_BRACE:
        return None
    at = body.rfind(_USAGE_KEY, 0, closing)
    member = _USAGE_MEMBER.match(body, at) if at > 0 and body[at - 1] != _BACKSLASH else None
    if member is None:
        return None
    try:
        text = body[member.end() : closing].decode()
        usage, end = _SCAN_JSON_VALUE(text, 0)
    except (ValueError, StopIteration, RecursionError):
        return None
    if end != len(text) and not text[end:].isspace():
        return None
    model = _top_level_model(body, at)
    if model is _UNSURE:
        return None
    return _usage(usage, model if isinstance(model, str) else None)


_UNSURE = object()


def _top_level_model(body: bytes, before: int) -> object:
    """The top-level "model" string (or None when there is none), else _UNSURE."""
    at = body.find(_MODEL_KEY)
    if at == -1:
        return None
    if (
        at > before
        or body[at - 1] == _BACKSLASH
        or body.find(_MODEL_KEY, at + 1) != -1
        or body.count(b"{", 0, at) != 1
        or body.find(b"[", 0, at) != -1
    ):
        return _UNSURE
    member = _MODEL_MEMBER.match(body, at)
    if member is None:
        return _UNSURE
    try:
        return member.group(1).decode()
    except UnicodeDecodeError:
        return _UNSURE


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
        if payload == b"[DONE]":
            self._saw_done = True
            return
        if b'"error"' not in payload:
            if b'"usage"' in payload:
                usage = openrouter_usage(payload)
                if usage is not None:
                    self._model, self._last_usage = usage.model, usage
                    return
            else:
                # A content chunk in OpenRouter's shape names the model at its start.
                model = _openrouter_model(payload, len(payload))
                if model is not None:
                    self._model = model
                    return
        self._decoded(payload)

    def _decoded(self, payload: bytes) -> None:
        try:
            obj = json.loads(payload)
        except ValueError:
            return
        if not isinstance(obj, dict):
            return
        if isinstance(obj.get("model"), str):
            self._model = obj["model"]
        if isinstance(obj.get("error"), dict):
            self._error = obj["error"]
        usage = usage_from_object(obj, self._model)
        if usage is not None:
            self._last_usage = usage


def requested_model(body: bytes) -> str | None:
    """The model a completion request asks for, read as the upstream reads it, or None.

    The body is decoded as JSON (a duplicated key resolves as the upstream resolves it,
    last one wins): a scan for the first "model" could be told one model while the
    upstream runs another. Only asked when the answer matters (no credit left, or no
    usage reported), so large conversations are not decoded on every request.
    """
    try:
        obj = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None
    model = obj.get("model") if isinstance(obj, dict) else None
    return model if isinstance(model, str) else None


class Meter:
    """Follows one metered request: its model, its response's usage, and its charge."""

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

    def charge(
        self, request_id: str, organization_id: str, user_id: str, status: int, cancelled: bool
    ) -> Charge:
        """The request's charge: what the upstream reported, nothing for `:free` models.

        The model is the one the upstream says it ran, else the one requested.
        """
        usage = self._reader.usage() if self._reader is not None else None
        if usage is None:
            model, prompt, completion, cost = self.model(), None, None, 0
        else:
            model = usage.model or self.model()
            prompt, completion = usage.prompt_tokens, usage.completion_tokens
            cost = 0 if is_free_model(model) else usage.cost_microdollars
        # Positional: this runs once per metered request.
        return Charge.make(
            request_id,
            organization_id,
            user_id,
            model,
            prompt,
            completion,
            cost,
            self.streamed,
            status,
            cancelled,
        )
