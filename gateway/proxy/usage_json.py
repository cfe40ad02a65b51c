"""Decoding OpenRouter's JSON for what metering needs: `model` and `usage`, nothing else.

msgspec decodes into typed structs holding just those members (every other member is
skipped without building a Python object). The members are typed `Any` and judged after
the decode, so a member of an unexpected type is read the way `json.loads` reads it
rather than failing the whole response: tokens count only as JSON integers, `cost` goes
through `usd_to_microdollars`. Text msgspec refuses but Python's `json` reads (`NaN`,
numbers past a float, a lone surrogate escape as JavaScript's `JSON.stringify` writes a
split pair) is decoded by `json.loads` and converted to the same structs. One difference
is left: bytes that are not UTF-8 inside a skipped member are not looked at, where
`json.loads` refuses the whole body (and charged nothing). `proxy/metering.py` feeds
these the bytes as they pass.
"""

from __future__ import annotations

import json
import math
from decimal import ROUND_HALF_UP, Decimal, InvalidOperation
from typing import Any, NamedTuple, TypeVar

import msgspec

from gateway.common.money import MICRODOLLARS_PER_USD

BIGINT_MAX = 2**63 - 1
# Below this many USD (the most one request is charged) a float cost converts exactly
# without Decimal, unless it lies within _NEAR_HALF of a half microdollar.
_FAST_USD_LIMIT = 10_000.0
_NEAR_HALF = 1e-4


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


class UsageMembers(msgspec.Struct, gc=False):
    """The members of `usage` that are charged (`total_tokens`, `is_byok`, the details
    objects are skipped). `Any`: judged after the decode (`_usage`)."""

    prompt_tokens: Any = None
    completion_tokens: Any = None
    cost: Any = 0


# `usage` as any JSON value, so that one which is not an object (`null`, a string) gives
# no usage without failing the decode of the rest (a stream chunk's model still counts).
_UsageValue = UsageMembers | list[Any] | str | int | float | bool | None


class Response(msgspec.Struct, gc=False):
    """A plain JSON completion: its model and its usage."""

    model: Any = None
    usage: _UsageValue = None


class StreamChunk(msgspec.Struct, gc=False):
    """One `data:` payload of a stream: its model, its usage, an in-band error."""

    model: Any = None
    usage: _UsageValue = None
    error: Any = None


class Request(msgspec.Struct, gc=False):
    """A completion request: only the model it asks for (`messages` are skipped)."""

    model: Any = None


RESPONSE = msgspec.json.Decoder(Response)
STREAM_CHUNK = msgspec.json.Decoder(StreamChunk)
REQUEST = msgspec.json.Decoder(Request)

_Decoded = TypeVar("_Decoded", Response, StreamChunk, Request)


def decode(decoder: msgspec.json.Decoder[_Decoded], text: bytes) -> _Decoded | None:
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


def usage_of(usage: UsageMembers, model: str | None) -> Usage:
    prompt, completion = usage.prompt_tokens, usage.completion_tokens
    # Positional: a NamedTuple built from keywords costs twice as much, once per request.
    return Usage(
        model,
        prompt if type(prompt) is int else None,  # an integer: not a bool, not a float
        completion if type(completion) is int else None,
        usd_to_microdollars(usage.cost),
    )


# --- The readers --------------------------------------------------------------------------


def requested_model(body: bytes) -> str | None:
    """The model a completion request asks for, read as the upstream reads it, or None.

    The body is decoded as JSON (a duplicated key resolves as the upstream resolves it,
    last one wins): a scan for the first "model" could be told one model while the
    upstream runs another. Only `model` is decoded (the conversation is skipped), and only
    when the answer matters (no credit left, or no usage reported).
    """
    request = decode(REQUEST, body)
    model = request.model if request is not None else None
    return model if isinstance(model, str) else None
