"""Reading usage from the upstream's own bytes, with no sockets: `gateway/proxy/metering.py`.

The streams are the fake OpenRouter's real bytes, fetched once per module, then fed to
the readers cut every way the network could cut them.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import json
import types
import unittest.mock
from decimal import ROUND_HALF_UP, Decimal
from typing import Any

import aiohttp
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bench.fake_upstream import MID_STREAM_ERROR_MODEL, UpstreamSettings, start_upstream
from gateway.access.auth import Caller
from gateway.common.context import RequestContext
from gateway.ledger.writer import Charge
from gateway.proxy import metering
from gateway.proxy.charging import Charger
from gateway.proxy.metering import (
    MAX_LINE_BYTES,
    JsonUsageReader,
    Meter,
    SseUsageReader,
    Usage,
    requested_model,
)
from gateway.proxy.usage_json import usd_to_microdollars

MODEL = "openai/gpt-4o-mini"
FREE_MODEL = "meta-llama/llama-3.3-70b-instruct:free"
DEFAULTS = UpstreamSettings()
EXPECTED = Usage(
    model=MODEL,
    prompt_tokens=DEFAULTS.prompt_tokens,
    completion_tokens=DEFAULTS.completion_tokens,
    cost_microdollars=420,
)
BIGINT_MAX = 2**63 - 1


@dataclasses.dataclass(frozen=True)
class Captured:
    """Response bodies exactly as the fake upstream sent them."""

    chat_stream: bytes
    text_stream: bytes
    free_stream: bytes
    error_stream: bytes
    chat_json: bytes


async def _capture() -> Captured:
    upstream = await start_upstream()
    try:
        async with aiohttp.ClientSession() as client:

            async def body(path: str, payload: dict[str, Any]) -> bytes:
                async with client.post(upstream.url + path, json=payload) as response:
                    assert response.status == 200
                    return await response.read()

            chat = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
            return Captured(
                chat_stream=await body("/chat/completions", {**chat, "stream": True}),
                text_stream=await body(
                    "/completions", {"model": MODEL, "prompt": "hi", "stream": True}
                ),
                free_stream=await body(
                    "/chat/completions", {**chat, "model": FREE_MODEL, "stream": True}
                ),
                error_stream=await body(
                    "/chat/completions", {**chat, "model": MID_STREAM_ERROR_MODEL, "stream": True}
                ),
                chat_json=await body("/chat/completions", chat),
            )
    finally:
        await upstream.close()


@pytest.fixture(scope="module")
def captured() -> Captured:
    """The fake upstream's bodies for a chat stream, a text stream, an error stream, JSON."""
    return asyncio.run(_capture())


def read_stream(pieces: list[bytes]) -> SseUsageReader:
    """A reader fed `pieces` in order."""
    reader = SseUsageReader()
    for piece in pieces:
        reader.feed(piece)
    return reader


def cut(data: bytes, positions: list[int]) -> list[bytes]:
    """`data` split at `positions` (any order, duplicates allowed: empty pieces)."""
    bounds = [0, *sorted(positions), len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


# --- SSE streams --------------------------------------------------------------------------


def test_whole_stream_reports_usage_and_done(captured: Captured) -> None:
    """The fake upstream's stream, in one piece, gives its usage and ends with [DONE]."""
    reader = read_stream([captured.chat_stream])
    assert reader.usage() == EXPECTED
    assert reader.saw_done
    assert reader.error is None
    assert reader.model == MODEL


def test_every_single_cut_gives_the_same_usage(captured: Captured) -> None:
    """Cut at every byte boundary, the stream always gives the same usage and [DONE]."""
    stream = captured.chat_stream
    for position in range(len(stream) + 1):
        reader = read_stream(cut(stream, [position]))
        assert reader.usage() == EXPECTED, position
        assert reader.saw_done, position


@pytest.mark.parametrize("name", ["chat_stream", "text_stream"])
def test_one_byte_at_a_time_gives_the_same_usage(captured: Captured, name: str) -> None:
    """Fed one byte per read, chat and text completion streams give the same usage."""
    stream: bytes = getattr(captured, name)
    reader = read_stream([stream[i : i + 1] for i in range(len(stream))])
    assert reader.usage() == EXPECTED
    assert reader.saw_done


@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_any_cuts_give_the_same_usage(captured: Captured, data: st.DataObject) -> None:
    """However many places the stream is cut, in whatever order, the usage is the same."""
    stream = captured.chat_stream
    positions = data.draw(st.lists(st.integers(0, len(stream)), max_size=40))
    assert read_stream(cut(stream, positions)).usage() == EXPECTED


def test_crlf_line_endings_cut_anywhere(captured: Captured) -> None:
    """With `\\r\\n` line endings, cut at every boundary (even between \\r and \\n), same usage."""
    stream = captured.chat_stream.replace(b"\n", b"\r\n")
    for position in range(len(stream) + 1):
        reader = read_stream(cut(stream, [position]))
        assert reader.usage() == EXPECTED, position
        assert reader.saw_done, position


@pytest.mark.parametrize(
    "comment",
    [
        b": OPENROUTER PROCESSING\n\n",
        b': {"usage":{"prompt_tokens":1,"completion_tokens":1,"cost":99}}\n\n',
        b': data: {"usage":{"cost":99}}\n\n',
        b':{"error":{"code":500,"message":"not an error"}}\n\n',
    ],
    ids=["keepalive", "usage-json", "data-in-comment", "error-json"],
)
def test_comment_lines_are_never_parsed(captured: Captured, comment: bytes) -> None:
    """`:` comment lines are ignored even when they hold "usage" or "error" JSON."""
    stream = captured.chat_stream
    done = stream.index(b"data: [DONE]")
    tampered = comment + stream[:done] + comment + stream[done:]
    reader = read_stream([tampered])
    assert reader.usage() == EXPECTED
    assert reader.error is None


def test_a_stream_of_only_comments_has_no_usage() -> None:
    """A stream that sent only keep-alive comments (some mentioning usage) reports none."""
    reader = read_stream([b": OPENROUTER PROCESSING\n\n", b': "usage" {"cost":1}\n\n'])
    assert reader.usage() is None
    assert not reader.saw_done


def test_mid_stream_error_is_recorded(captured: Captured) -> None:
    """An in-band error event is kept in `.error`; no usage, no [DONE]."""
    stream = captured.error_stream
    for position in range(len(stream) + 1):
        reader = read_stream(cut(stream, [position]))
        assert reader.error == {"code": 502, "message": "Provider disconnected"}, position
        assert reader.usage() is None
        assert not reader.saw_done


def test_last_usage_wins() -> None:
    """When a stream reports usage twice, the final report is the one charged."""
    first = {"model": MODEL, "choices": [], "usage": {"prompt_tokens": 1, "cost": 0.001}}
    last = {
        "model": MODEL,
        "choices": [],
        "usage": {"prompt_tokens": 5, "completion_tokens": 9, "cost": 0.002},
    }
    stream = b"".join(b"data: " + json.dumps(o).encode() + b"\n\n" for o in (first, last))
    reader = read_stream([stream, b"data: [DONE]\n\n"])
    assert reader.usage() == Usage(MODEL, 5, 9, 2000)


def test_usage_without_model_takes_the_streams_model() -> None:
    """A usage chunk without `model` is attributed to the model earlier chunks named."""
    stream = (
        b'data: {"model":"a/b","choices":[{"delta":{"content":"x"}}]}\n\n'
        b'data: {"choices":[],"usage":{"prompt_tokens":2,"completion_tokens":3,"cost":1e-5}}\n\n'
    )
    for position in range(len(stream) + 1):
        assert read_stream(cut(stream, [position])).usage() == Usage("a/b", 2, 3, 10), position


@pytest.mark.parametrize(
    "line",
    [
        b'data: not json, but mentions "usage"\n\n',
        b'data: ["usage"]\n\n',
        b'data: {"usage": "none"}\n\n',
        b'event: usage\ndata: {"id":"x"}\n\n',
        b'id: "usage"\n\n',
    ],
    ids=["not-json", "array", "usage-not-object", "event-field", "id-field"],
)
def test_lines_that_are_not_usage_are_skipped(line: bytes) -> None:
    """Malformed or non-usage lines that mention "usage" change nothing and raise nothing."""
    assert read_stream([line]).usage() is None


def test_data_without_space_after_colon() -> None:
    """`data:{...}` (no space) is a data line too, as the SSE format allows."""
    stream = b'data:{"model":"m","usage":{"prompt_tokens":1,"completion_tokens":2,"cost":3e-6}}\n'
    assert read_stream([stream]).usage() == Usage("m", 1, 2, 3)


def test_an_overlong_line_is_dropped_without_losing_later_usage(captured: Captured) -> None:
    """A line longer than the bound is dropped, and the usage after it is still read."""
    huge = b"data: " + b"x" * (MAX_LINE_BYTES + 10) + b"\n\n"
    pieces = [huge[i : i + 65536] for i in range(0, len(huge), 65536)]
    reader = read_stream([*pieces, captured.chat_stream])
    assert reader.usage() == EXPECTED


# --- JSON responses -----------------------------------------------------------------------


def read_json(pieces: list[bytes]) -> Usage | None:
    """The usage a JSON reader fed `pieces` in order reports."""
    reader = JsonUsageReader()
    for piece in pieces:
        reader.feed(piece)
    return reader.usage()


def test_json_response_usage(captured: Captured) -> None:
    """A plain JSON completion's `usage` is read once the body is complete, however cut."""
    body = captured.chat_json
    for position in range(0, len(body) + 1, 7):
        reader = JsonUsageReader()
        for piece in cut(body, [position]):
            reader.feed(piece)
        assert reader.usage() == EXPECTED, position


@pytest.mark.parametrize(
    "body",
    [b"", b"{not json", b"[]", b'{"error":{"code":500,"message":"x"}}', b'{"usage":null}'],
    ids=["empty", "malformed", "array", "error-body", "null-usage"],
)
def test_json_without_usage(body: bytes) -> None:
    """A body with no usable `usage` (empty, malformed, an error) gives None."""
    reader = JsonUsageReader()
    reader.feed(body)
    assert reader.usage() is None


def test_json_overflow_gives_no_usage() -> None:
    """A body past the reader's bound is not buffered further, and gives no usage."""
    reader = JsonUsageReader()
    chunk = b" " * MAX_LINE_BYTES
    for _ in range(17):
        reader.feed(chunk)
    reader.feed(b'{"usage":{"cost":1}}')
    assert reader.overflowed
    assert reader.usage() is None


def test_non_integer_tokens_are_recorded_as_none() -> None:
    """Token counts that are not integers (floats, strings, booleans) are recorded as None."""
    body = {"model": "m", "usage": {"prompt_tokens": 1.5, "completion_tokens": True, "cost": "1"}}
    assert read_json([json.dumps(body).encode()]) == Usage("m", None, None, 1_000_000)


def reference_usage(obj: Any, model: str | None = None) -> Usage | None:
    """The reference reading of a decoded response or stream chunk: its `usage` when that is
    an object, under its `model` when that is a string (else `model`), integer tokens only,
    the cost in microdollars."""
    if not isinstance(obj, dict) or not isinstance(obj.get("usage"), dict):
        return None
    usage, reported = obj["usage"], obj.get("model")
    prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens")
    return Usage(
        reported if isinstance(reported, str) else model,
        prompt if type(prompt) is int else None,
        completion if type(completion) is int else None,
        usd_to_microdollars(usage.get("cost", 0)),
    )


def slow_usage(body: bytes) -> Usage | None:
    """The reference: decode the whole body with `json.loads`, then read its usage."""
    try:
        return reference_usage(json.loads(body))
    except (ValueError, RecursionError):
        return None


USAGE = {"prompt_tokens": 12, "completion_tokens": 34, "total_tokens": 46, "cost": 0.00042}


@pytest.mark.parametrize(
    "body",
    [
        # OpenRouter's order and spacing, and others.
        {"id": "gen-1", "model": MODEL, "choices": [], "usage": USAGE},
        {"model": MODEL, "usage": USAGE},
        {"usage": USAGE},
        {"id": "x", "usage": USAGE, "model": MODEL},  # usage not last
        {"choices": [{"message": {"content": '"usage": {"cost": 9}}'}}], "usage": USAGE},
        {"choices": [{"message": {"role": "model"}}], "model": MODEL, "usage": USAGE},
        {"choices": [{"usage": {"cost": 9}}], "model": MODEL, "usage": USAGE},
        {'x"usage': {"cost": 9}},
        {"nested": {"usage": {"cost": 9}}},
        {"nested": {"model": "other"}, "model": MODEL, "usage": USAGE},
        {"model": 5, "usage": USAGE},
        {"model": MODEL, "usage": None},
        {"model": MODEL, "usage": [1]},
    ],
)
@pytest.mark.parametrize("indent", [None, 2])
def test_usage_agrees_with_decoding_the_whole(body: Any, indent: Any) -> None:
    """The reader gives what decoding the whole body with `json.loads` gives."""
    raw = json.dumps(body, indent=indent).encode()
    assert read_json([raw]) == slow_usage(raw)


def test_openrouters_json_response_is_read(captured: Captured) -> None:
    """The fake OpenRouter's JSON response gives its usage."""
    assert read_json([captured.chat_json]) == EXPECTED


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: (
        st.lists(children, max_size=3)
        | st.dictionaries(st.sampled_from(["usage", "model", "cost", "x", 'a"usage']), children)
    ),
    max_leaves=12,
)


@settings(max_examples=400, derandomize=True, database=None, deadline=None)
@given(
    st.dictionaries(st.sampled_from(["id", "model", "choices", "x", "usage"]), JSON_VALUES),
    st.one_of(
        st.none(), st.fixed_dictionaries({"cost": st.floats(0, 10), "prompt_tokens": st.integers()})
    ),
)
def test_any_body_reads_as_json_loads_reads_it(head: dict[str, Any], usage: Any) -> None:
    """For any JSON object, with or without a trailing usage, the reader agrees with a
    full decode."""
    body = dict(head)
    if usage is not None:
        body.pop("usage", None)
        body["usage"] = usage
    raw = json.dumps(body).encode()
    assert read_json([raw]) == slow_usage(raw)


# OpenRouter's JSON response as of late 2025: usage last, with its details objects.
OPENROUTER_BODY = (
    b'{"id":"gen-1764000000-abc","provider":"OpenAI","model":"openai/gpt-4o-mini",'
    b'"object":"chat.completion","created":1764000000,"choices":[{"logprobs":null,'
    b'"finish_reason":"stop","native_finish_reason":"stop","index":0,"message":{"role":'
    b'"assistant","content":"Hi! {\\"usage\\": 1}","refusal":null,"reasoning":null}}],'
    b'"usage":{"prompt_tokens":12,"completion_tokens":34,"total_tokens":46,"cost":0.00042,'
    b'"is_byok":false,"prompt_tokens_details":{"cached_tokens":0,"audio_tokens":0},'
    b'"cost_details":{"upstream_inference_cost":null,"upstream_inference_prompt_cost":1.8e-06,'
    b'"upstream_inference_completions_cost":2e-05},"completion_tokens_details":'
    b'{"reasoning_tokens":0,"image_tokens":0}}}'
)


def test_openrouters_own_shape_is_read(captured: Captured) -> None:
    """OpenRouter's real response and the fake's give their usage, as a decode does."""
    assert read_json([OPENROUTER_BODY]) == slow_usage(OPENROUTER_BODY)
    assert read_json([OPENROUTER_BODY]) == Usage(MODEL, 12, 34, 420)
    assert read_json([captured.chat_json]) == EXPECTED
    assert read_json([OPENROUTER_BODY + b"\n"]) == Usage(MODEL, 12, 34, 420)


PLAIN_TEXT = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=8)
# Keys near the ones read, so duplicates and look-alikes occur.
USAGE_KEYS = st.sampled_from(
    ["is_byok", "cost", "prompt_tokens", "completion_tokens", "cost_details", "model", "x"]
)
TOP_KEYS = st.sampled_from(["object", "model", "choices", "usage", "x"])
SMALL_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-5, 10**6)
    | st.floats(-1, 1e6)
    | PLAIN_TEXT
    | st.text(max_size=4),
    lambda children: (
        st.dictionaries(USAGE_KEYS, children, max_size=3) | st.lists(children, max_size=2)
    ),
    max_leaves=5,
)


def members(pairs: list[tuple[str, Any]]) -> str:
    """An object's text from (key, value) pairs, duplicates kept as written."""
    return "{" + ",".join(f"{json.dumps(k)}:{json.dumps(v)}" for k, v in pairs) + "}"


@settings(max_examples=600, derandomize=True, database=None, deadline=None)
@given(
    head=st.tuples(PLAIN_TEXT, PLAIN_TEXT, PLAIN_TEXT | st.text(max_size=4)),
    middle=st.lists(st.tuples(TOP_KEYS, SMALL_VALUES), max_size=2),
    tokens=st.tuples(st.integers(0, 10**9), st.integers(-1, 10**9), st.integers(0, 10**9)),
    cost=st.integers(0, 9) | st.floats(0, 10) | st.floats(-1, 0),
    extra=st.lists(st.tuples(USAGE_KEYS, SMALL_VALUES), max_size=3),
    ending=st.sampled_from(["}", "}\n", "} ", "}}", "},1]}", "]}", "}]}"]),
)
def test_openrouters_shape_reads_as_a_decoder_reads_it(
    head: tuple[str, str, str],
    middle: list[tuple[str, Any]],
    tokens: tuple[int, int, int],
    cost: float,
    extra: list[tuple[str, Any]],
    ending: str,
) -> None:
    """Bodies in and near OpenRouter's shape (duplicate keys, nested look-alikes, strings
    with braces and quotes, junk after the usage): the reader agrees with a full decode."""
    usage = [
        ("prompt_tokens", tokens[0]),
        ("completion_tokens", tokens[1]),
        ("total_tokens", tokens[2]),
        ("cost", cost),
        *extra,
    ]
    pairs = [("id", head[0]), ("provider", head[1]), ("model", head[2]), *middle]
    text = members(pairs)[:-1] + f',"usage":{members(usage)}' + ending
    raw = text.encode()
    assert read_json([raw]) == slow_usage(raw)


# --- Equivalence with json.loads ----------------------------------------------------------
# Generated responses, streams and requests, read by the readers and by `json.loads` plus
# the reference reading above, in any cuts: the two must agree on every one.

# Any text, surrogates included (written as `\ud83d` escapes, or encoded as-is, which
# json.loads(bytes) also reads), and text made of JSON's own syntax and the keys read.
TEXT = (
    st.text(max_size=12)
    | st.text(st.characters(exclude_categories=()), max_size=4)
    | st.lists(
        st.sampled_from(
            [
                '"usage"',
                '"model":',
                '"error"',
                "[DONE]",
                "{",
                "}",
                "[",
                "]",
                "\\",
                '"',
                ",",
                ":",
                " ",
                "x",
                "é",
                "\U0001f642",
                "\u2028",
                "\x00",
                "\n",
                "data: ",
            ]
        ),
        max_size=6,
    ).map("".join)
)
NUMBERS = st.integers() | st.floats() | st.integers(-(2**70), 2**70)  # NaN, Infinity too
KEYS = st.sampled_from(["usage", "model", "error", "cost", "prompt_tokens", "x"]) | TEXT
ANY_JSON = st.recursive(
    st.none() | st.booleans() | NUMBERS | TEXT,
    lambda children: st.lists(children, max_size=3) | st.dictionaries(KEYS, children, max_size=3),
    max_leaves=8,
)
# Mostly what OpenRouter sends; now and then anything.
SCALARS = st.none() | st.booleans() | NUMBERS | TEXT
TOKENS = st.integers(0, 10**6) | st.integers(0, 10**6) | st.integers() | SCALARS | ANY_JSON
COSTS = (
    st.floats(0, 10)
    | st.floats(min_value=0, max_value=1e-3)
    | st.integers(0, 9)
    | st.sampled_from(["0.00042", "1e-6", "-1", "1e400", 1e300, -0.0, -1e-6])
    | SCALARS
    | ANY_JSON
)


class Members(list[tuple[str, Any]]):
    """An object written member by member, in this order, duplicate keys kept."""


@dataclasses.dataclass(frozen=True)
class Style:
    """How a generated object is written: escapes, separators, surrounding whitespace."""

    ensure_ascii: bool
    item: str
    key: str
    around: str

    def encode(self, value: Any) -> bytes:
        text = self.around + self.text(value) + self.around
        return text.encode("utf-8", "surrogatepass")

    def text(self, value: Any) -> str:
        if isinstance(value, Members):
            return (
                "{"
                + self.item.join(
                    json.dumps(k, ensure_ascii=self.ensure_ascii) + self.key + self.text(v)
                    for k, v in value
                )
                + "}"
            )
        if isinstance(value, list):
            return "[" + self.item.join(self.text(v) for v in value) + "]"
        return json.dumps(value, ensure_ascii=self.ensure_ascii, separators=(self.item, self.key))


def styles(multiline: bool) -> st.SearchStrategy[Style]:
    """Compact as OpenRouter writes it, spaced, or (outside a stream) indented."""
    items = [",", ", "] + ([",\n  ", ",\r\n\t"] if multiline else [])
    return st.builds(
        Style,
        st.booleans(),
        st.sampled_from(items),
        st.sampled_from([":", ": ", " : "]),
        st.sampled_from(["", " ", "\n", "\r\n\t"] if multiline else [""]),
    )


@st.composite
def shuffled(draw: st.DrawFn, pairs: list[tuple[str, Any]]) -> Members:
    """`pairs` in any order, some left out, with extra members (look-alike keys and
    duplicates of the ones read) anywhere among them."""
    kept = [p for p in draw(st.permutations(pairs)) if draw(st.integers(0, 5))]
    for extra in draw(st.lists(st.tuples(KEYS, ANY_JSON), max_size=3)):
        kept.insert(draw(st.integers(0, len(kept))), extra)
    return Members(kept)


@st.composite
def usage_objects(draw: st.DrawFn) -> Any:
    """OpenRouter's usage object, members reordered, dropped, added or of other types;
    now and then not an object at all."""
    details = {"cached_tokens": draw(TOKENS), "audio_tokens": 0}
    costs = {
        "upstream_inference_cost": draw(st.none() | NUMBERS),
        "upstream_inference_prompt_cost": draw(NUMBERS),
    }
    pairs = [
        ("prompt_tokens", draw(TOKENS)),
        ("completion_tokens", draw(TOKENS)),
        ("total_tokens", draw(TOKENS)),
        ("cost", draw(COSTS)),
        ("is_byok", draw(st.booleans())),
        ("prompt_tokens_details", details),
        ("cost_details", costs),
        ("completion_tokens_details", {"reasoning_tokens": draw(TOKENS)}),
    ]
    other = st.sampled_from([None, [], "none"]) | ANY_JSON
    return draw(st.one_of(shuffled(pairs), shuffled(pairs), shuffled(pairs), other))


MODELS = st.sampled_from([MODEL, FREE_MODEL]) | st.just(MODEL) | TEXT | SCALARS


@st.composite
def responses(draw: st.DrawFn) -> Members:
    """A JSON completion in OpenRouter's shape, with everything about it varied."""
    message = {"role": "assistant", "content": draw(TEXT), "refusal": None}
    choice = {"logprobs": None, "finish_reason": "stop", "index": 0, "message": message}
    pairs = [
        ("id", "gen-" + draw(TEXT)),
        ("provider", draw(TEXT)),
        ("model", draw(MODELS)),
        ("object", "chat.completion"),
        ("created", draw(NUMBERS)),
        ("choices", [choice, *draw(st.lists(ANY_JSON, max_size=2))]),
        ("usage", draw(usage_objects())),
    ]
    return draw(shuffled(pairs))


@settings(max_examples=800, derandomize=True, database=None, deadline=None)
@given(body=responses(), style=styles(multiline=True), data=st.data())
def test_responses_read_as_json_loads_reads_them(
    body: Members, style: Style, data: st.DataObject
) -> None:
    """Any response in and near OpenRouter's shape (members in any order, missing, repeated
    or of another type, unicode, surrogates, NaN, huge numbers, any spacing), cut anywhere:
    the reader's usage is the one `json.loads` and the reference reading give; and so
    is it for the body cut short."""
    raw = style.encode(body)
    positions = data.draw(st.lists(st.integers(0, len(raw)), max_size=8))
    assert read_json(cut(raw, positions)) == slow_usage(raw)
    cut_short = raw[: data.draw(st.integers(0, len(raw)))]  # the upstream broke off
    assert read_json([cut_short]) == slow_usage(cut_short)


@st.composite
def events(draw: st.DrawFn, model: Any) -> tuple[str, Any]:
    """One event of a stream: a data line (a content, usage or error chunk, or junk), a
    comment, or another field."""
    kind = draw(st.sampled_from(["content", "content", "usage", "error", "junk", "comment"]))
    if kind == "comment":
        return "comment", draw(TEXT).replace("\n", " ")
    if kind == "junk":
        junk = ['not json, "usage"', '["usage"]', '{"usage": "none"}', "[DONE]", '"error"', ""]
        return "raw", draw(st.sampled_from(junk))
    pairs = [
        ("id", "gen-1"),
        ("provider", "OpenAI"),
        ("model", draw(st.just(model) | MODELS)),
        ("object", "chat.completion.chunk"),
        ("created", 1764000000),
    ]
    if kind == "content":
        delta = {"role": "assistant", "content": draw(TEXT)}
        pairs.append(("choices", [{"index": 0, "delta": delta, "finish_reason": None}]))
    elif kind == "usage":
        pairs += [("choices", []), ("usage", draw(usage_objects()))]
    else:
        error = draw(st.fixed_dictionaries({"code": NUMBERS, "message": TEXT}) | ANY_JSON)
        pairs.append(("error", error))
    return "data", draw(shuffled(pairs))


@st.composite
def streams(draw: st.DrawFn) -> bytes:
    """An event stream as OpenRouter sends it, and near it."""
    model = draw(MODELS)
    style = draw(styles(multiline=False))
    newline = draw(st.sampled_from(["\n", "\r\n"]))
    prefix = draw(st.sampled_from(["data: ", "data:"]))
    text = ""
    for kind, value in draw(st.lists(events(model), max_size=8)):
        if kind == "comment":
            text += ": " + value + newline + newline
            continue
        if draw(st.booleans()):
            text += draw(st.sampled_from(['event: "usage"', 'id: "error"', "retry: 1"])) + newline
        payload = value if kind == "raw" else style.encode(value).decode("utf-8", "surrogatepass")
        text += prefix + payload + newline + newline
    if draw(st.booleans()):
        text += prefix + "[DONE]" + newline + newline
    return text.encode("utf-8", "surrogatepass")


def reference_stream(
    stream: bytes,
) -> tuple[Usage | None, str | None, dict[str, Any] | None, bool]:
    """The reference reading of a stream: its complete `data:` lines, the first and those
    that mention usage, an error or [DONE], each decoded by `json.loads`; the last usage,
    the last model named, the last error object, whether [DONE] came."""
    usage = model = error = None
    done = first = False
    for line in stream[: stream.rfind(b"\n") + 1].split(b"\n"):
        if not line.startswith(b"data:"):
            continue
        if first and not any(n in line for n in (b'"usage"', b'"error"', b"[DONE]")):
            continue
        first = True
        payload = line[len(b"data:") :].strip()
        if payload == b"[DONE]":
            done = True
            continue
        try:
            obj = json.loads(payload)
        except (ValueError, RecursionError):
            continue
        if not isinstance(obj, dict):
            continue
        if isinstance(obj.get("model"), str):
            model = obj["model"]
        if isinstance(obj.get("error"), dict):
            error = obj["error"]
        usage = reference_usage(obj, model) or usage
    return usage, model, error, done


@settings(max_examples=600, derandomize=True, database=None, deadline=None)
@given(
    stream=streams(),
    read_every=st.sampled_from([1, 10, 100, metering.READ_EVERY_BYTES]),
    data=st.data(),
)
def test_streams_read_as_json_loads_reads_their_lines(
    stream: bytes, read_every: int, data: st.DataObject
) -> None:
    """Any stream in and near OpenRouter's shape, cut anywhere and read in batches of any
    size: the reader's usage, model, error and [DONE] are the reference reading's."""
    positions = data.draw(st.lists(st.integers(0, len(stream)), max_size=20))
    with unittest.mock.patch.object(metering, "READ_EVERY_BYTES", read_every):
        reader = read_stream(cut(stream, positions))
        assert (reader.usage(), reader.model, reader.error, reader.saw_done) == (
            reference_stream(stream)
        )


@pytest.mark.parametrize(
    "body",
    [
        b'{"model":"m","x":NaN,"usage":{"prompt_tokens":1,"completion_tokens":2,"cost":1e-6}}',
        b'{"model":"m","usage":{"prompt_tokens":1,"completion_tokens":2,"cost":Infinity}}',
        b'{"model":"m","usage":{"prompt_tokens":1,"completion_tokens":2,"cost":1e400}}',
        b'{"model":"m","usage":{"prompt_tokens":1e400,"completion_tokens":2,"cost":-1e400}}',
        b'{"model":"m","choices":[{"delta":{"content":"\\ud83d"}}],"usage":{"cost":1e-6}}',
        b'{"model":"\\ud83d","usage":{"prompt_tokens":1,"cost":1e-6}}',
        b'{"model":"\xed\xa0\xbd","usage":{"prompt_tokens":1,"cost":1e-6}}',
        b'{"model":"m","usage":{"prompt_tokens":100000000000000000000000,"cost":1e-6}}',
    ],
    ids=[
        "nan-elsewhere",
        "infinite-cost",
        "cost-past-a-float",
        "tokens-past-a-float",
        "lone-surrogate-escape",
        "lone-surrogate-model",
        "encoded-surrogate-model",
        "huge-tokens",
    ],
)
def test_what_json_loads_reads_is_read(body: bytes) -> None:
    """JSON msgspec refuses but Python's json reads (NaN, Infinity, numbers past a float,
    lone surrogates) gives the usage json.loads gives, in a response and a stream chunk."""
    expected = slow_usage(body)
    assert expected is not None
    assert read_json([body]) == expected
    assert read_stream([b"data: " + body + b"\n\n"]).usage() == expected
    assert requested_model(body) == json.loads(body)["model"]


def test_bytes_not_utf8_in_a_skipped_member_still_charge() -> None:
    """The one difference from json.loads: bytes that are not UTF-8 inside a member that is
    not read are not looked at, so the usage is still read (json.loads refuses the body)."""
    body = b'{"model":"m","choices":[{"message":{"content":"\xff\xc0"}}],"usage":{"cost":1e-6}}'
    assert slow_usage(body) is None
    assert read_json([body]) == Usage("m", None, None, 1)
    assert read_stream([b"data: " + body + b"\n\n"]).usage() == Usage("m", None, None, 1)


# --- USD to microdollars ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cost", "microdollars"),
    [
        (0.00042, 420),
        (0.1 + 0.2, 300_000),
        (1e-7, 0),
        (4e-7, 0),
        (5e-7, 1),
        (1.5e-6, 2),
        (2.5e-6, 3),
        (0.0000025, 3),
        (1, 1_000_000),
        (0, 0),
        ("0.00042", 420),
        ("0.0000005", 1),
        ("12345678.901234", 12_345_678_901_234),
        (Decimal("0.0000015"), 2),
        (1e12, 10**18),
        ("9223372036854.775807", 9_223_372_036_854_775_807),
    ],
)
def test_usd_to_microdollars_is_exact(cost: Any, microdollars: int) -> None:
    """USD becomes whole microdollars exactly, rounding half up (never banker's rounding)."""
    assert usd_to_microdollars(cost) == microdollars


def exact_microdollars(cost: float) -> int:
    """The reference: the float's shortest decimal form, times a million, rounded half up."""
    return int((Decimal(repr(cost)) * 1_000_000).to_integral_value(rounding=ROUND_HALF_UP))


@settings(max_examples=2000, derandomize=True, database=None, deadline=None)
@given(
    st.floats(min_value=0, max_value=2e4, allow_nan=False)
    | st.integers(0, 10**13).map(lambda n: n / 10**7)  # many exact halves of a microdollar
    | st.integers(0, 10**9).map(lambda n: (n + 0.5) / 10**6)
)
def test_float_costs_convert_as_the_exact_decimal_does(cost: float) -> None:
    """The float shortcut never differs from rounding the cost's exact decimal form."""
    assert usd_to_microdollars(cost) == (exact_microdollars(cost) if cost > 0 else 0)


@pytest.mark.parametrize(
    "cost",
    [
        -0.00042,
        -1,
        "-5",
        float("nan"),
        float("inf"),
        float("-inf"),
        "nan",
        None,
        "",
        "abc",
        True,
        [],
        {},
        object(),
    ],
    ids=lambda c: repr(c)[:20],
)
def test_junk_cost_counts_as_zero(cost: Any) -> None:
    """Negative, NaN, infinite, missing or non-numeric costs count as 0."""
    assert usd_to_microdollars(cost) == 0


@pytest.mark.parametrize("cost", [1e13, 1e300, "1e30"], ids=["1e13", "1e300", "str-1e30"])
def test_huge_cost_fits_the_ledger(cost: Any) -> None:
    """A cost too large for `bigint` microdollars never comes out larger than the ledger holds."""
    assert 0 <= usd_to_microdollars(cost) <= BIGINT_MAX


# --- The requested model ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "model"),
    [
        (b'{"model":"openai/gpt-4o","messages":[]}', "openai/gpt-4o"),
        (b'{ "model" : "a/b:free" , "stream": true}', "a/b:free"),
        (b'{"messages":[{"role":"user","content":"hi"}],"stream":true,"model":"x/y"}', "x/y"),
        (
            b'{"messages":[{"role":"user","content":"say \\"model\\": \\"evil:free\\""}],'
            b'"model":"paid/model"}',
            "paid/model",
        ),
        (b'{"model":"with \\"quote\\""}', 'with "quote"'),
        (b'{"messages":[]}', None),
        (b"", None),
        (b'{"model": 42}', None),
        (b'{"models":["a:free"],"model":"b"}', "b"),
    ],
    ids=[
        "first",
        "spaces",
        "after-messages",
        "escaped-quotes-in-content",
        "escaped-quote-in-model",
        "absent",
        "empty",
        "not-a-string",
        "models-list",
    ],
)
def test_requested_model(body: bytes, model: str | None) -> None:
    """The top-level `model` is found wherever it sits; quoted text in messages never matches."""
    assert requested_model(body) == model


@pytest.mark.parametrize(
    "body",
    [
        b'{"messages":[{"role":"user","content":"hi","model":"evil:free"}],"model":"paid/model"}',
        b'{"model":"evil:free","messages":[],"model":"paid/model"}',
    ],
    ids=["nested-key-first", "duplicate-key"],
)
def test_requested_model_is_the_one_the_upstream_uses(body: bytes) -> None:
    """The model found is the one the upstream's JSON parser sees, not a nested or earlier one."""
    assert requested_model(body) == json.loads(body)["model"] == "paid/model"


@settings(max_examples=800, derandomize=True, database=None, deadline=None)
@given(
    body=shuffled(
        [
            ("model", "paid/model"),
            ("messages", [{"role": "user", "content": 'say "model": "evil:free"'}]),
            ("stream", True),
        ]
    ),
    model=MODELS,
    style=styles(multiline=True),
)
def test_requested_model_reads_as_json_loads_reads_it(
    body: Members, model: Any, style: Style
) -> None:
    """Any request (models nested, repeated, of other types, any text and spacing): the
    model read is the top-level one `json.loads` sees, when it is a string."""
    body.insert(len(body) // 2, ("model", model))
    raw = style.encode(body)
    try:
        decoded = json.loads(raw)
    except (ValueError, RecursionError):
        decoded = None
    expected = decoded.get("model") if isinstance(decoded, dict) else None
    assert requested_model(raw) == (expected if isinstance(expected, str) else None)


# --- Meter --------------------------------------------------------------------------------


def charge_of(meter: Meter, *, status: int = 200, cancelled: bool = False) -> Charge:
    """The charge the proxy records for the request `meter` followed."""
    recorded: list[Charge] = []
    ledger: Any = types.SimpleNamespace(record=recorded.append)
    caller = Caller(user_id="user", organization_id="org", role="member")
    charge = Charger(ledger, RequestContext("req_1", "proxy"), caller, meter)
    charge(status, cancelled=cancelled)
    charge(status, cancelled=cancelled)  # once, however the request ends
    (only,) = recorded
    assert (only.request_id, only.organization_id, only.user_id) == ("req_1", "org", "user")
    return only


def test_meter_charges_a_stream(captured: Captured) -> None:
    """A metered stream's charge carries its model, tokens, cost, and streamed=True."""
    meter = Meter(json.dumps({"model": MODEL, "stream": True}).encode())
    feed = meter.start("text/event-stream")
    feed(captured.chat_stream)
    charge = charge_of(meter)
    assert (charge.model, charge.prompt_tokens, charge.completion_tokens) == (MODEL, 11, 7)
    assert charge.cost_microdollars == 420
    assert charge.streamed is True


def test_meter_charges_json(captured: Captured) -> None:
    """A metered JSON completion is charged its usage, streamed=False."""
    meter = Meter(json.dumps({"model": MODEL}).encode())
    feed = meter.start("application/json")
    feed(captured.chat_json)
    charge = charge_of(meter)
    assert charge.cost_microdollars == 420
    assert charge.streamed is False


def test_meter_charges_nothing_for_free_models(captured: Captured) -> None:
    """A `:free` model costs 0 even when the upstream reports a cost; tokens are kept."""
    meter = Meter(json.dumps({"model": FREE_MODEL, "stream": True}).encode())
    feed = meter.start("text/event-stream")
    feed(captured.free_stream)
    charge = charge_of(meter)
    assert charge.model == FREE_MODEL
    assert charge.cost_microdollars == 0
    assert charge.prompt_tokens == 11


def test_meter_without_usage_charges_zero_and_keeps_cancelled() -> None:
    """A response with no usage (abandoned early) is recorded at cost 0, cancelled as told."""
    meter = Meter(json.dumps({"model": MODEL, "stream": True}).encode())
    feed = meter.start("text/event-stream")
    feed(b": OPENROUTER PROCESSING\n\ndata: {")
    charge = charge_of(meter, status=200, cancelled=True)
    assert (charge.model, charge.cost_microdollars, charge.cancelled) == (MODEL, 0, True)
    assert charge.prompt_tokens is None


def test_meter_never_started_charges_zero() -> None:
    """A request whose response never began (upstream unreachable) is charged 0."""
    charge = charge_of(Meter(b'{"model":"m"}'), status=502)
    assert (charge.model, charge.cost_microdollars, charge.status) == ("m", 0, 502)


@pytest.mark.parametrize(
    ("reported", "requested", "usage"),
    [
        ({"model": "a/b"}, "x/y", Usage("a/b", 1, 2, 3)),
        ({}, "x/y", Usage("x/y", 1, 2, 3)),
        ({"model": ""}, "x/y", Usage("x/y", 1, 2, 3)),
        ({"model": 7}, "x/y", Usage("x/y", 1, 2, 3)),
        ({"model": "a/b:free"}, "x/y", Usage("a/b:free", 1, 2, 0)),
        ({}, "x/y:free", Usage("x/y:free", 1, 2, 0)),
        ({"model": "a/b"}, "x/y:free", Usage("a/b", 1, 2, 3)),
    ],
    ids=[
        "upstreams",
        "none-reported",
        "empty",
        "not-a-string",
        "free",
        "free-requested",
        "upstream-ran-paid",
    ],
)
@pytest.mark.parametrize("content_type", ["application/json", "text/event-stream"])
def test_meter_usage_is_charged_to_the_model_the_upstream_ran(
    reported: dict[str, Any], requested: str, usage: Usage, content_type: str
) -> None:
    """The usage is the upstream's model's (else the requested one's), free for `:free`."""
    body = json.dumps(
        {**reported, "usage": {"prompt_tokens": 1, "completion_tokens": 2, "cost": 3e-6}}
    ).encode()
    meter = Meter(json.dumps({"model": requested}).encode())
    feed = meter.start(content_type)
    feed(b"data: " + body + b"\n\n" if content_type == "text/event-stream" else body)
    assert meter.usage() == usage
