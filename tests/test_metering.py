"""Reading usage from the upstream's own bytes, with no sockets: `gateway/metering.py`.

The streams are the fake OpenRouter's real bytes, fetched once per module, then fed to
the readers cut every way the network could cut them.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import json
from decimal import ROUND_HALF_UP, Decimal
from typing import Any

import aiohttp
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bench.fake_upstream import MID_STREAM_ERROR_MODEL, UpstreamSettings, start_upstream
from gateway.metering import (
    MAX_LINE_BYTES,
    JsonUsageReader,
    Meter,
    SseUsageReader,
    Usage,
    openrouter_usage,
    requested_model,
    usage_at_the_end,
    usage_from_object,
    usd_to_microdollars,
)

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


def test_usage_from_object_ignores_non_integer_tokens() -> None:
    """Token counts that are not integers (floats, strings, booleans) are recorded as None."""
    usage = usage_from_object(
        {"model": "m", "usage": {"prompt_tokens": 1.5, "completion_tokens": True, "cost": "1"}}
    )
    assert usage == Usage("m", None, None, 1_000_000)


def slow_usage(body: bytes) -> Usage | None:
    """The reference: decode the whole body, then read its usage."""
    try:
        return usage_from_object(json.loads(body))
    except ValueError:
        return None


USAGE = {"prompt_tokens": 12, "completion_tokens": 34, "total_tokens": 46, "cost": 0.00042}


@pytest.mark.parametrize(
    "body",
    [
        # OpenRouter's order and spacing, and others.
        {"id": "gen-1", "model": MODEL, "choices": [], "usage": USAGE},
        {"model": MODEL, "usage": USAGE},
        {"usage": USAGE},
        {"id": "x", "usage": USAGE, "model": MODEL},  # usage not last: decoded whole
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
def test_usage_read_from_the_end_agrees_with_decoding_the_whole(body: Any, indent: Any) -> None:
    """Reading the trailing usage gives what decoding the whole body gives, or defers to it."""
    raw = json.dumps(body, indent=indent).encode()
    reader = JsonUsageReader()
    reader.feed(raw)
    assert reader.usage() == slow_usage(raw)
    fast = usage_at_the_end(raw)
    assert fast is None or fast == slow_usage(raw)


def test_usage_read_from_the_end_of_openrouters_response(captured: Captured) -> None:
    """The fake OpenRouter's JSON response is read from its end, without decoding it whole."""
    assert usage_at_the_end(captured.chat_json) == EXPECTED


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: (
        st.lists(children, max_size=3)
        | st.dictionaries(st.sampled_from(["usage", "model", "cost", "x", 'a"usage']), children)
    ),
    max_leaves=12,
)


@settings(max_examples=400, derandomize=True, database=None)
@given(
    st.dictionaries(st.sampled_from(["id", "model", "choices", "x", "usage"]), JSON_VALUES),
    st.one_of(
        st.none(), st.fixed_dictionaries({"cost": st.floats(0, 10), "prompt_tokens": st.integers()})
    ),
)
def test_any_body_reads_the_same_usage_from_its_end(head: dict[str, Any], usage: Any) -> None:
    """For any JSON object, the trailing-usage reader agrees with a full decode or defers."""
    body = dict(head)
    if usage is not None:
        body.pop("usage", None)
        body["usage"] = usage
    raw = json.dumps(body).encode()
    fast = usage_at_the_end(raw)
    assert fast is None or fast == slow_usage(raw)
    reader = JsonUsageReader()
    reader.feed(raw)
    assert reader.usage() == slow_usage(raw)


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


def test_openrouters_own_shape_is_read_without_decoding(captured: Captured) -> None:
    """The fast path takes OpenRouter's real response and the fake's, and agrees with a decode."""
    assert openrouter_usage(OPENROUTER_BODY) == slow_usage(OPENROUTER_BODY)
    assert openrouter_usage(OPENROUTER_BODY) == Usage(MODEL, 12, 34, 420)
    assert openrouter_usage(captured.chat_json) == EXPECTED
    assert openrouter_usage(OPENROUTER_BODY + b"\n") == Usage(MODEL, 12, 34, 420)


PLAIN_TEXT = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=8)
# Keys near the ones the fast path reads or refuses, so duplicates and look-alikes occur.
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


@settings(max_examples=600, derandomize=True, database=None)
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
    with braces and quotes, junk after the usage): the fast path agrees with a full
    decode whenever it answers, and so does the reader as a whole."""
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
    fast = openrouter_usage(raw)
    assert fast is None or fast == slow_usage(raw)
    assert usage_at_the_end(raw) in (None, slow_usage(raw))


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


@settings(max_examples=2000, derandomize=True, database=None)
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


# --- Meter --------------------------------------------------------------------------------


def charge_of(meter: Meter, **overrides: Any) -> Any:
    fields: dict[str, Any] = {
        "request_id": "req_1",
        "organization_id": "org",
        "user_id": "user",
        "status": 200,
        "cancelled": False,
    }
    fields.update(overrides)
    return meter.charge(**fields)


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
