"""Hostile input: every malformed, oversized, garbled or slow request gets a clear 4xx in
the one error envelope, never a 500, a traceback or SQL text, and the gateway keeps serving.

A real gateway on a real port, real PostgreSQL, the fake OpenRouter and the fake Stripe.
Where the HTTP client would refuse (or tidy) what we mean to send, requests are written
byte for byte on a raw socket. Grouped by what is hostile: bodies, headers, paths, slow
clients, floods of bad keys, and strings PostgreSQL cannot store.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gzip
import json
import math
import posixpath
import secrets
import time
import zlib
from collections.abc import AsyncIterator, Callable, Iterable
from datetime import timedelta
from typing import Any

import aiohttp
import asyncpg
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from yarl import URL

from bench.fake_upstream import RunningUpstream, start_upstream
from gateway.plans import load_catalog
from tests.conftest import UPSTREAM_TEST_KEY, RunningGateway, start_gateway
from tests.factories import Seed
from tests.fake_stripe import (
    RunningFakeStripe,
    add_catalog_prices,
    start_fake_stripe,
    stripe_env,
)

CHAT_PATH = "/api/openrouter/chat/completions"
CHAT_BODY = json.dumps(
    {"model": "openai/gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
).encode()
# Small, so that "over the limit" is cheap to send; the configuration allows 1024 upwards.
MAX_BODY_BYTES = 8192
ORG_HEADER = "X-KiloCode-OrganizationId"
UPSTREAM_PREFIX = "/api/v1/"
# What must never appear in a response: internals, SQL, our OpenRouter key.
LEAK_MARKERS = (
    b"Traceback",
    b'File "',
    b"asyncpg",
    b"SELECT ",
    b"INSERT INTO",
    b"psycopg",
    UPSTREAM_TEST_KEY.encode(),
)
# Normal requests must stay this fast while hostile clients hold connections open.
PROMPT_SECONDS = 0.2
PROPERTY = settings(
    database=None,
    derandomize=True,
    deadline=None,
    max_examples=200,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
# Tables a refused request must leave alone.
WRITTEN_TABLES = (
    "organizations",
    "organization_memberships",
    "organization_invitations",
    "sales_contact_requests",
    "email_outbox",
    "credit_transactions",
    "stripe_events",
)


# --- Talking to the gateway ------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Reply:
    """A response read to the end: status, headers (names lowercased), body."""

    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def http_request(
    method: str,
    target: bytes | str,
    headers: Iterable[bytes | str] = (),
    body: bytes = b"",
    *,
    content_length: bool = True,
) -> bytes:
    """A complete HTTP/1.1 request, byte for byte, asking the server to close afterwards."""
    target = target.encode() if isinstance(target, str) else target
    lines = [method.encode() + b" " + target + b" HTTP/1.1", b"Host: gateway.test"]
    lines += [h.encode() if isinstance(h, str) else h for h in headers]
    if content_length:
        lines.append(b"Content-Length: %d" % len(body))
    lines.append(b"Connection: close")
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


def parse_reply(raw: bytes) -> Reply:
    """Split a raw HTTP response into status, headers and (de-chunked) body."""
    head, separator, rest = raw.partition(b"\r\n\r\n")
    assert separator, f"no complete response: {raw[:300]!r}"
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    body = _dechunk(rest) if headers.get("transfer-encoding") == "chunked" else rest
    return Reply(int(status_line.split()[1]), headers, body)


def _dechunk(data: bytes) -> bytes:
    out = b""
    while data:
        size_line, _, data = data.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            break
        out, data = out + data[:size], data[size + 2 :]
    return out


async def exchange(gateway: RunningGateway, request: bytes, timeout_seconds: float = 5) -> Reply:
    """Write `request` on a fresh connection and read the response until the server closes."""
    reader, writer = await asyncio.open_connection(gateway.url.host, gateway.url.port)
    try:
        writer.write(request)
        with contextlib.suppress(ConnectionError):
            await writer.drain()
        async with asyncio.timeout(timeout_seconds):
            raw = await reader.read()
    finally:
        await close_writer(writer)
    return parse_reply(raw)


async def close_writer(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(ConnectionError):
        await writer.wait_closed()


async def send(
    client: aiohttp.ClientSession,
    gateway: RunningGateway,
    method: str,
    path: str,
    *,
    token: str | None = None,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> Reply:
    """One request through aiohttp's client, with a raw body."""
    sent = dict(headers or {})
    if token is not None:
        sent["Authorization"] = f"Bearer {token}"
    url = URL(str(gateway.url) + path, encoded=True)
    async with client.request(method, url, data=body, headers=sent) as response:
        content = await response.read()
    headers_out = {k.lower(): v for k, v in response.headers.items()}
    return Reply(response.status, headers_out, content)


def assert_envelope(reply: Reply, status: int | None = None, reason: str | None = None) -> str:
    """The reply is the gateway's own error envelope (of `status`/`reason`); its reason."""
    assert_no_leak(reply)
    if status is not None:
        assert reply.status == status, (reply.status, reply.body[:400])
    assert 400 <= reply.status < 500, (reply.status, reply.body[:400])
    assert reply.headers.get("content-type", "").startswith("application/json"), reply.headers
    envelope = reply.json()
    assert set(envelope) == {"error", "error_type"}, envelope
    error = envelope["error"]
    assert {"code", "message", "metadata"} <= set(error), envelope
    assert error["code"] == reply.status
    assert isinstance(error["message"], str) and error["message"]
    assert error["metadata"]["reason"] == envelope["error_type"]
    if reason is not None:
        assert envelope["error_type"] == reason, envelope
    found: str = envelope["error_type"]
    return found


def assert_no_leak(reply: Reply) -> None:
    """No stack trace, SQL or upstream key in the body or headers."""
    everything = reply.body + json.dumps(reply.headers).encode()
    for marker in LEAK_MARKERS:
        assert marker not in everything, (marker, reply.body[:400])


async def assert_still_serving(
    client: aiohttp.ClientSession, gateway: RunningGateway, token: str, org_id: str
) -> None:
    """A normal chat completion still succeeds, promptly."""
    started = time.perf_counter()
    reply = await send(
        client,
        gateway,
        "POST",
        CHAT_PATH,
        token=token,
        body=CHAT_BODY,
        headers={ORG_HEADER: org_id, "Content-Type": "application/json"},
    )
    assert reply.status == 200, reply.body[:400]
    assert time.perf_counter() - started < 1.0


async def row_counts(db: asyncpg.Connection) -> dict[str, int]:
    return {t: await db.fetchval(f"SELECT count(*) FROM {t}") for t in WRITTEN_TABLES}


async def usage_row(db: asyncpg.Connection, request_id: str) -> asyncpg.Record:
    """The request's row in llm_usage, once the ledger has written it (3 s at most)."""
    deadline = time.monotonic() + 3
    while (
        row := await db.fetchrow("SELECT * FROM llm_usage WHERE request_id = $1", request_id)
    ) is None:
        assert time.monotonic() < deadline, f"no usage row for {request_id}"
        await asyncio.sleep(0.02)
    return row


# --- Fixtures ----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Site:
    """A gateway with Stripe configured and a small body limit, and an enterprise org's owner."""

    gateway: RunningGateway
    stripe: RunningFakeStripe
    org_id: str
    user_id: str
    token: str

    def api_posts(self) -> dict[str, str]:
        """Every JSON POST endpoint under /api/ that an owner may call."""
        org = f"/api/organizations/{self.org_id}"
        return {
            "create organization": "/api/organizations",
            "invite": f"{org}/invitations",
            "subscription checkout": f"{org}/subscription/checkout",
            "credits checkout": f"{org}/credits/checkout",
            "contact sales": f"{org}/sso/contact-sales",
        }


@pytest.fixture
async def stripe_server() -> AsyncIterator[RunningFakeStripe]:
    running = await start_fake_stripe()
    add_catalog_prices(running.state, load_catalog())
    yield running
    await running.close()


@pytest.fixture
async def site(
    gateway_factory: Callable[..., Any], stripe_server: RunningFakeStripe, seed: Seed
) -> Site:
    gateway = await gateway_factory(**stripe_env(stripe_server), MAX_BODY_BYTES=MAX_BODY_BYTES)
    org_id = await seed.org(plan="enterprise")
    user_id, token = await seed.member_with_key(org_id, "owner")
    return Site(gateway, stripe_server, org_id, user_id, token)


@pytest.fixture
async def member(seed: Seed) -> tuple[str, str]:
    """An organization and its owner's token (made once per test, shared by its examples)."""
    org_id = await seed.org()
    _user, token = await seed.member_with_key(org_id, "owner")
    return org_id, token


API_ENDPOINTS = (
    "create organization",
    "invite",
    "subscription checkout",
    "credits checkout",
    "contact sales",
)


# --- Bodies ------------------------------------------------------------------------------------

MALFORMED_JSON = (
    b"{",
    b'{"name": ',
    b"{not json}",
    b"{'name': 'single quotes'}",
    b'{"name": "x",}',
    b'{"name": "x"} trailing',
    b"\x00",
    b"<xml/>",
)
NOT_AN_OBJECT = (b'"a string"', b"[1, 2]", b"42", b"null", b"true", b"[]")
INVALID_UTF8 = (b"\xff\xfe\xfd", b'{"name": "\xff"}', b'{"name": "\xc0\xaf"}')  # overlong "/"


@pytest.mark.parametrize("endpoint", API_ENDPOINTS)
async def test_malformed_json_is_400_invalid_json_and_writes_nothing(
    site: Site, client: aiohttp.ClientSession, db: asyncpg.Connection, endpoint: str
) -> None:
    """Bodies that are not JSON, not UTF-8 or not an object: 400 invalid_json, nothing written."""
    path = site.api_posts()[endpoint]
    before = await row_counts(db)
    for body in MALFORMED_JSON + NOT_AN_OBJECT + INVALID_UTF8:
        reply = await send(client, site.gateway, "POST", path, token=site.token, body=body)
        assert reply.status == 400, (body, reply.body)
        assert assert_envelope(reply) == "invalid_json", body
    assert await row_counts(db) == before
    assert site.stripe.state.requests_to("POST", "/v1/checkout/sessions") == []
    await assert_still_serving(client, site.gateway, site.token, site.org_id)


NOT_STRICT_UTF8 = {
    "utf-16": json.dumps({"name": "Sixteen", "email": "six@example.test"}).encode("utf-16"),
    "utf-16-le": json.dumps({"name": "Sixteen", "email": "six@example.test"}).encode("utf-16-le"),
    "utf-32": json.dumps({"name": "Sixteen", "email": "six@example.test"}).encode("utf-32"),
    # A surrogate encoded as if it were a character (CESU-8): not UTF-8 either.
    "encoded-surrogate": b'{"name": "Half \xed\xa0\x80", "email": "half\xed\xa0\x80@example.test"}',
}


@pytest.mark.parametrize("endpoint", ["create organization", "invite"])
@pytest.mark.parametrize("encoding", NOT_STRICT_UTF8)
async def test_json_that_is_not_strict_utf8_is_400_invalid_json(
    site: Site, client: aiohttp.ClientSession, db: asyncpg.Connection, endpoint: str, encoding: str
) -> None:
    """JSON between systems is UTF-8 (RFC 8259): UTF-16, UTF-32 and encoded surrogates are
    not read as JSON (json.loads(bytes) guesses encodings and passes surrogates through)."""
    before = await row_counts(db)
    reply = await send(
        client,
        site.gateway,
        "POST",
        site.api_posts()[endpoint],
        token=site.token,
        body=NOT_STRICT_UTF8[encoding],
    )
    assert_envelope(reply, 400, "invalid_json")
    assert await row_counts(db) == before


@pytest.mark.parametrize("endpoint", API_ENDPOINTS)
async def test_deeply_nested_json_is_400_not_500(
    site: Site, client: aiohttp.ClientSession, endpoint: str
) -> None:
    """JSON nested deeper than the parser recurses is refused as invalid, not a crash."""
    for body in (b"[" * 100_000, b'{"a":' * 50_000):
        reply = await send(
            client,
            site.gateway,
            "POST",
            site.api_posts()[endpoint],
            token=site.token,
            body=body[: MAX_BODY_BYTES - 1],
        )
        assert_envelope(reply, 400, "invalid_json")
    await assert_still_serving(client, site.gateway, site.token, site.org_id)


def _is_utf8_json_object(body: bytes) -> bool:
    try:
        return isinstance(json.loads(body.decode("utf-8")), dict)
    except (ValueError, RecursionError):
        return False


def _python_reads_as_object(body: bytes) -> bool:
    """json.loads(bytes) also guesses UTF-16 and UTF-32; those cases have their own test."""
    try:
        return isinstance(json.loads(body), dict)
    except (ValueError, RecursionError):
        return False


@PROPERTY
@given(
    endpoint=st.sampled_from(API_ENDPOINTS),
    body=st.one_of(
        st.binary(max_size=200),
        st.from_regex(rb"\A[\[\]{}\":,0-9a-z \\\x80-\xff]{0,60}\Z"),
    ),
)
@example(endpoint="create organization", body=b"{")
async def test_arbitrary_bodies_get_a_4xx_envelope_never_a_500(
    site: Site, client: aiohttp.ClientSession, endpoint: str, body: bytes
) -> None:
    """Whatever the bytes, the answer is no 5xx; anything but a UTF-8 object is invalid_json."""
    reply = await send(
        client, site.gateway, "POST", site.api_posts()[endpoint], token=site.token, body=body
    )
    assert reply.status < 500, (body, reply.body)
    assert_no_leak(reply)
    if body and not _is_utf8_json_object(body) and not _python_reads_as_object(body):
        assert_envelope(reply, 400, "invalid_json")
    elif reply.status >= 400:
        assert_envelope(reply)


async def test_bodies_over_the_limit_are_413_everywhere(
    site: Site,
    upstream: RunningUpstream,
    client: aiohttp.ClientSession,
    db: asyncpg.Connection,
) -> None:
    """Over MAX_BODY_BYTES, with a length, chunked or gzip-inflated: 413, nothing sent on."""
    padding = b" " * MAX_BODY_BYTES
    oversized = b'{"name": "x", "seats": 1, "email": "a@b.test"' + padding + b"}"
    paths = {**site.api_posts(), "proxy": CHAT_PATH, "webhook": "/api/stripe/webhook"}
    before = await row_counts(db)
    for name, path in paths.items():
        auth = [f"Authorization: Bearer {site.token}", f"{ORG_HEADER}: {site.org_id}"]
        with_length = http_request("POST", path, auth, oversized)
        chunked = http_request(
            "POST",
            path,
            [*auth, "Transfer-Encoding: chunked"],
            b"%x\r\n%s\r\n0\r\n\r\n" % (len(oversized), oversized),
            content_length=False,
        )
        bomb = gzip.compress(b'{"name": "' + b"x" * (MAX_BODY_BYTES * 200) + b'"}')
        inflating = http_request("POST", path, [*auth, "Content-Encoding: gzip"], bomb)
        for request in (with_length, chunked, inflating):
            assert_envelope(await exchange(site.gateway, request), 413, "payload_too_large"), name
    assert upstream.recorder.received == 0
    assert await row_counts(db) == before
    await assert_still_serving(client, site.gateway, site.token, site.org_id)


@pytest.mark.parametrize("encoding", ["gzip", "deflate"])
async def test_a_body_that_does_not_decompress_is_400(
    site: Site, upstream: RunningUpstream, client: aiohttp.ClientSession, encoding: str
) -> None:
    """A Content-Encoding the body does not match is the client's error: 400, not 500."""
    paths = {**site.api_posts(), "proxy": CHAT_PATH}
    for name, path in paths.items():
        reply = await send(
            client,
            site.gateway,
            "POST",
            path,
            token=site.token,
            body=b"this is not " + b"z" * 40,
            headers={"Content-Encoding": encoding, ORG_HEADER: site.org_id},
        )
        assert reply.status == 400, (name, reply.status, reply.body)
        assert_envelope(reply)
    assert upstream.recorder.received == 0
    await assert_still_serving(client, site.gateway, site.token, site.org_id)


@pytest.mark.parametrize(
    ("encoding", "compress"), [("gzip", gzip.compress), ("deflate", zlib.compress)]
)
async def test_a_compressed_request_reaches_the_upstream_as_one_consistent_body(
    site: Site,
    upstream: RunningUpstream,
    client: aiohttp.ClientSession,
    encoding: str,
    compress: Callable[[bytes], bytes],
) -> None:
    """The gateway reads compressed bodies decompressed, so either it refuses them (a 4xx
    envelope, nothing sent on) or the upstream gets headers that describe the bytes it is
    sent, never `Content-Encoding: gzip` over plain JSON."""
    reply = await send(
        client,
        site.gateway,
        "POST",
        CHAT_PATH,
        token=site.token,
        body=compress(CHAT_BODY),
        headers={
            "Content-Encoding": encoding,
            "Content-Type": "application/json",
            ORG_HEADER: site.org_id,
        },
    )
    if 400 <= reply.status < 500 and upstream.recorder.received == 0:
        assert_envelope(reply)
        return
    assert upstream.recorder.received == 1, reply.body[:300]
    forwarded = upstream.recorder.last
    sent_encoding = forwarded.headers.get("Content-Encoding")
    decoded = forwarded.body if sent_encoding is None else zlib.decompress(forwarded.body, 47)
    assert json.loads(decoded) == json.loads(CHAT_BODY)
    assert reply.status == 200, reply.body[:300]


@pytest.mark.parametrize("body", [b"{not json", b"\xff\xfe", b"[1, 2]", b'"text"', b""], ids=repr)
async def test_non_json_bodies_on_the_proxy_path_get_a_4xx_and_cost_nothing(
    site: Site,
    upstream: RunningUpstream,
    client: aiohttp.ClientSession,
    db: asyncpg.Connection,
    body: bytes,
) -> None:
    """The proxy relays bodies unparsed; OpenRouter's own 400 comes back, nothing is charged."""
    reply = await send(
        client,
        site.gateway,
        "POST",
        CHAT_PATH,
        token=site.token,
        body=body,
        headers={ORG_HEADER: site.org_id},
    )
    assert 400 <= reply.status < 500, reply.body
    assert_no_leak(reply)
    assert reply.json()["error"]["code"] == reply.status
    assert (await usage_row(db, reply.headers["x-request-id"]))["cost_microdollars"] == 0
    await assert_still_serving(client, site.gateway, site.token, site.org_id)


async def test_deeply_nested_json_on_the_proxy_path_is_no_500(
    gateway: RunningGateway,
    upstream: RunningUpstream,
    client: aiohttp.ClientSession,
    seed: Seed,
    db: asyncpg.Connection,
    log_stream: Any,
) -> None:
    """A body too deep to parse must not crash admission (no credits: the model is read)
    nor the charge (the upstream reports no usage: the model is read), and the request's
    usage row is still written."""
    deep = b"[" * 100_000
    broke = await seed.org(credits_acquired_microdollars=0)
    _, broke_token = await seed.member_with_key(broke)
    reply = await send(client, gateway, "POST", CHAT_PATH, token=broke_token, body=deep)
    assert_envelope(reply)  # 402 (no credit for an unknown model) or 400, never 500

    org = await seed.org()
    _, token = await seed.member_with_key(org)
    upstream.settings.fail_status = 400  # answers without reading the body: no usage
    reply = await send(client, gateway, "POST", CHAT_PATH, token=token, body=deep)
    assert reply.status == 400
    assert (await usage_row(db, reply.headers["x-request-id"]))["status"] == 400
    assert '"unhandled_error"' not in log_stream.getvalue()


# --- Headers -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "request_bytes",
    [
        http_request("GET", "/healthz", [b"X-Big: " + b"a" * 9000]),
        http_request("GET", "/healthz", [b"X-" + b"n" * 9000 + b": v"]),
        http_request("POST", CHAT_PATH, [b"Authorization: Bearer " + b"k" * 9000]),
        http_request("GET", "/api/openrouter/" + "p" * 9000),
        http_request("GET", "/healthz", [b"X-H%d: v" % i for i in range(200)]),
        http_request("GET", "/healthz", [b"X-Same: v"] * 200),
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 64,
        b"GET /healthz HTTP/9.9\r\nHost: x\r\n\r\n",
        b"POST " + CHAT_PATH.encode() + b" HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n"
        b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n0\r\n\r\n",
        b"POST " + CHAT_PATH.encode() + b" HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
        b"Connection: close\r\n\r\nzz\r\nabc\r\n0\r\n\r\n",
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nBad Header Name: v\r\n\r\n",
        b"GET /healthz HTTP/1.1\r\nHost: x\r\n folded: continuation\r\n\r\n",
    ],
    ids=[
        "header-value-9000",
        "header-name-9000",
        "authorization-9000",
        "request-line-9000",
        "200-headers",
        "200-same-header",
        "tls-handshake",
        "http-9.9",
        "content-length-and-chunked",
        "bad-chunk-size",
        "space-in-header-name",
        "obsolete-line-folding",
    ],
)
async def test_requests_that_are_not_http_get_a_400_envelope(
    gateway: RunningGateway,
    upstream: RunningUpstream,
    client: aiohttp.ClientSession,
    seed: Seed,
    request_bytes: bytes,
) -> None:
    """aiohttp's own parse errors come back as 400 malformed_request in the envelope."""
    assert_envelope(await exchange(gateway, request_bytes), 400, "malformed_request")
    assert upstream.recorder.received == 0
    org = await seed.org()
    _, token = await seed.member_with_key(org)
    await assert_still_serving(client, gateway, token, org)


async def test_many_large_headers_under_the_limits_are_served_normally(
    gateway: RunningGateway, client: aiohttp.ClientSession, seed: Seed
) -> None:
    """100 headers of 8,000 bytes each fit aiohttp's per-line and count limits: 401 as usual."""
    headers = [b"X-Pad-%d: " % i + b"p" * 8000 for i in range(100)]
    reply = await exchange(gateway, http_request("POST", CHAT_PATH, headers, CHAT_BODY))
    assert_envelope(reply, 401, "invalid_api_key")


@pytest.mark.parametrize(
    "authorization",
    [
        "",
        "Bearer",
        "Bearer ",
        "Bearer    ",
        "Basic dXNlcjpwYXNz",
        "Token kilo_abc",
        "Digest username=x",
        "kilo_abc",
        "Bearer: kilo_abc",
        "BearerKilo",
        "Bearer\tkilo_abc",
        "Bearer kilo_abc, Bearer kilo_def",
        "Negotiate YII=",
    ],
)
async def test_authorization_that_is_not_a_known_bearer_token_is_401(
    gateway: RunningGateway,
    upstream: RunningUpstream,
    client: aiohttp.ClientSession,
    authorization: str,
) -> None:
    """Other schemes, no scheme, no token: 401 invalid_api_key, and nothing goes upstream."""
    reply = await send(
        client, gateway, "POST", CHAT_PATH, body=CHAT_BODY, headers={"Authorization": authorization}
    )
    assert_envelope(reply, 401, "invalid_api_key")
    assert upstream.recorder.received == 0


# Printable characters the HTTP client lets through, ASCII and not, tokens of every length.
HEADER_TEXT = st.text(
    alphabet=st.characters(blacklist_categories=("Cc", "Cs", "Zl", "Zp")), min_size=0
)


@PROPERTY
@given(
    token=st.one_of(
        st.integers(0, 2000).map(lambda n: secrets.token_urlsafe(n)[:n]),
        HEADER_TEXT.filter(lambda t: len(t) <= 2000),
        st.text(alphabet="abc", min_size=500, max_size=2000),
    ),
    scheme=st.sampled_from(["Bearer", "bearer", "BEARER"]),
)
@example(token="", scheme="Bearer")
@example(token="k" * 512, scheme="Bearer")
@example(token="k" * 513, scheme="Bearer")
async def test_tokens_of_every_length_are_401(
    gateway: RunningGateway,
    upstream: RunningUpstream,
    client: aiohttp.ClientSession,
    token: str,
    scheme: str,
) -> None:
    """No token we did not issue gets in, whatever its length or characters."""
    reply = await send(
        client,
        gateway,
        "POST",
        CHAT_PATH,
        body=CHAT_BODY,
        headers={"Authorization": f"{scheme} {token}"},
    )
    assert_envelope(reply, 401, "invalid_api_key")
    assert upstream.recorder.received == 0


@PROPERTY
@given(
    token=st.binary(min_size=1, max_size=300).filter(lambda b: b"\r" not in b and b"\n" not in b)
)
@example(token=b"\xff")
@example(token=b"kilo_\xc3\x28")
@example(token=b"\xed\xa0\x80")
async def test_raw_token_bytes_are_401_or_unreadable(
    gateway: RunningGateway, upstream: RunningUpstream, token: bytes
) -> None:
    """Any bytes after `Bearer `, UTF-8 or not: 401 invalid_api_key, or 400 when aiohttp
    cannot read the header at all; never a 500."""
    request = http_request("POST", CHAT_PATH, [b"Authorization: Bearer " + token], CHAT_BODY)
    reason = assert_envelope(await exchange(gateway, request))
    assert reason in ("invalid_api_key", "malformed_request"), (token, reason)
    assert upstream.recorder.received == 0


SQL_FRAGMENTS = (
    "' OR '1'='1",
    "1; DROP TABLE organizations; --",
    "00000000-0000-0000-0000-000000000000' OR 1=1 --",
    "00000000-0000-0000-0000-000000000000; DELETE FROM api_keys",
    "' UNION SELECT key_hash FROM api_keys --",
    "$1",
    "{00000000-0000-0000-0000-000000000000}",
    "urn:uuid:00000000-0000-0000-0000-000000000000",
    "00000000000000000000000000000000",
    "00000000-0000-0000-0000-00000000000g",
    "00000000-0000-0000-0000-000000000000\x00",
    "00000000-0000-0000-0000-0000000000001",
    "\uff10" * 8 + "-0000-0000-0000-000000000000",  # fullwidth digits
)


@PROPERTY
@given(
    value=st.one_of(
        st.sampled_from(SQL_FRAGMENTS),
        st.builds(lambda a, b: a + b, st.sampled_from(SQL_FRAGMENTS), HEADER_TEXT),
        HEADER_TEXT,
    ).filter(lambda v: v.strip() != "" and "\x00" not in v)
)
async def test_sql_in_the_organization_header_is_400_invalid_organization_id(
    gateway: RunningGateway,
    upstream: RunningUpstream,
    client: aiohttp.ClientSession,
    member: tuple[str, str],
    db: asyncpg.Connection,
    value: str,
) -> None:
    """Only a canonical UUID is an organization id; nothing else reaches a query.
    (NUL is refused by the HTTP client; the raw-socket properties cover such bytes.)"""
    _org, token = member
    reply = await send(
        client, gateway, "POST", CHAT_PATH, token=token, body=CHAT_BODY, headers={ORG_HEADER: value}
    )
    assert_envelope(reply, 400, "invalid_organization_id")
    assert upstream.recorder.received == 0
    assert await db.fetchval("SELECT count(*) FROM organizations") == 1


@pytest.mark.parametrize("fragment", SQL_FRAGMENTS[:6])
async def test_sql_in_paths_and_query_strings_is_400(
    gateway: RunningGateway, client: aiohttp.ClientSession, seed: Seed, fragment: str
) -> None:
    """Organization ids in paths are checked like the header; periods must be dates."""
    org = await seed.org()
    _, token = await seed.member_with_key(org, "owner")
    quoted = URL.build(path="/" + fragment).raw_path[1:].replace("/", "%2F")
    for path in (
        f"/api/organizations/{quoted}",
        f"/api/organizations/{quoted}/members",
        f"/api/organizations/{quoted}/usage",
    ):
        reply = await send(client, gateway, "GET", path, token=token)
        assert reply.status in (400, 404), (path, reply.body)
        assert_envelope(reply)
    reply = await send(
        client, gateway, "GET", f"/api/organizations/{org}/usage?from={quoted}", token=token
    )
    assert_envelope(reply, 400, "invalid_period")


async def test_duplicated_organization_headers_act_for_one_org_or_are_refused(
    gateway: RunningGateway,
    upstream: RunningUpstream,
    client: aiohttp.ClientSession,
    seed: Seed,
    db: asyncpg.Connection,
) -> None:
    """Two X-KiloCode-OrganizationId headers are either refused (400, nothing upstream)
    or resolved to exactly one organization, the same one for membership, entitlement
    and the charge, so a second header cannot smuggle in another. (Today the first wins.)"""
    expired = await seed.org(age=timedelta(days=40))
    paying = await seed.org()
    user = await seed.user()
    for org in (expired, paying):
        await seed.member(org, user, "owner")
    token = await seed.key(user)
    auth = f"Authorization: Bearer {token}"

    def twice(first: str, second: str) -> bytes:
        headers = [auth, f"{ORG_HEADER}: {first}", f"{ORG_HEADER}: {second}"]
        return http_request("POST", CHAT_PATH, headers, CHAT_BODY)

    outcomes: list[tuple[str, str | None]] = []
    for first, second in ((expired, paying), (paying, expired)):
        reply = await exchange(gateway, twice(first, second))
        if reply.status == 400:
            assert_envelope(reply)
            outcomes.append(("refused", None))
        elif reply.status == 402:
            assert_envelope(reply, 402, "trial_expired")
            outcomes.append(("blocked", reply.json()["error"]["metadata"]["organization_id"]))
        else:
            assert reply.status == 200, reply.body
            names = [h.lower() for h in upstream.recorder.last.headers]
            assert not [n for n in names if n.startswith("x-kilocode")], names
            charged = await usage_row(db, reply.headers["x-request-id"])
            outcomes.append(("charged", str(charged["organization_id"])))
    refused = [("refused", None)] * 2
    first_wins = [("blocked", expired), ("charged", paying)]
    last_wins = [("charged", paying), ("blocked", expired)]
    assert outcomes in (refused, first_wins, last_wins), outcomes
    assert upstream.recorder.received == outcomes.count(("charged", paying))

    stranger = "00000000-0000-4000-8000-000000000000"
    for first, second in ((stranger, paying), (paying + ", " + stranger, paying)):
        reply = await exchange(gateway, twice(first, second))
        if reply.status != 200:  # first-wins or a refusal; last-wins may let this one by
            assert reply.status in (400, 403), reply.body
            assert_envelope(reply)


async def test_duplicated_authorization_headers_use_one_key_and_go_no_further(
    gateway: RunningGateway, upstream: RunningUpstream, seed: Seed
) -> None:
    """Two Authorization headers: refused, or one key decides consistently (today the
    first); the upstream gets exactly one Authorization, ours."""
    org = await seed.org()
    _, token = await seed.member_with_key(org)
    valid, invalid = f"Authorization: Bearer {token}", "Authorization: Bearer kilo_not-ours"
    statuses = []
    for headers in ([invalid, valid], [valid, invalid]):
        reply = await exchange(gateway, http_request("POST", CHAT_PATH, headers, CHAT_BODY))
        if reply.status != 200:
            assert reply.status in (400, 401), reply.body
            assert_envelope(reply)
        statuses.append(reply.status)
    assert statuses.count(200) <= 1, statuses  # never both: one of them named a bad key
    for request in upstream.recorder.requests:
        assert request.headers.getall("Authorization") == [f"Bearer {UPSTREAM_TEST_KEY}"]


async def test_an_unreadable_idempotency_key_is_no_500(
    site: Site, client: aiohttp.ClientSession
) -> None:
    """A checkout's Idempotency-Key is the client's opaque string; bytes that are not
    UTF-8 must not crash the checkout."""
    for path in (site.api_posts()["credits checkout"], site.api_posts()["subscription checkout"]):
        request = http_request(
            "POST",
            path,
            [f"Authorization: Bearer {site.token}", b"Idempotency-Key: \xff\xfe-key"],
            b'{"amount_usd": 10, "seats": 5}',
        )
        reply = await exchange(site.gateway, request)
        assert reply.status < 500, reply.body
        assert_no_leak(reply)
        if reply.status >= 400:
            assert_envelope(reply)


# --- Paths -------------------------------------------------------------------------------------


@pytest.fixture
async def elsewhere() -> AsyncIterator[RunningUpstream]:
    """Another server on loopback: a host the gateway must never be tricked into calling."""
    running = await start_upstream()
    yield running
    await running.close()


def path_stays_in_the_upstream_base(path: str) -> bool:
    """The upstream's decoded path is under /api/v1/, even after resolving dot segments."""
    return path.startswith(UPSTREAM_PREFIX) and (posixpath.normpath(path) + "/").startswith(
        UPSTREAM_PREFIX
    )


async def assert_path_handled_safely(
    gateway: RunningGateway,
    upstream: RunningUpstream,
    elsewhere: RunningUpstream,
    target: bytes,
    headers: list[str],
) -> None:
    """Refused in the envelope, or forwarded to the fake upstream under /api/v1/ only."""
    received = upstream.recorder.received
    reply = await exchange(gateway, http_request("POST", target, headers, CHAT_BODY))
    assert elsewhere.recorder.received == 0, target
    forwarded = upstream.recorder.requests[received:]
    if not forwarded:
        assert reply.status < 500, (target, reply.body)
        if reply.status >= 400:
            assert_envelope(reply)
    for request in forwarded:
        assert path_stays_in_the_upstream_base(request.path), (target, request.path)


PATH_TRICKS = (
    "../../x",
    "a/../../x",
    "chat/../../../../healthz",
    "v1/../../x",
    "%2e%2e/x",
    "%2E%2E/%2e%2E/x",
    ".%2e/x",
    "%2e./x",
    "./chat/completions",
    "chat/./completions",
    "chat%2f..%2f..%2fx",
    "chat%2F..%2F..",
    "chat%5c..%5c..%5cx",
    "chat\\..\\..\\x",
    "/x",
    "//{evil}/x",
    "@{evil}/chat/completions",
    ":password@{evil}/chat/completions",
    "http://{evil}/chat/completions",
    "http:%2f%2f{evil}/x",
    "chat/completions%00",
    "chat/completions%3f/../../x",
    "chat/completions?x=/../../../",
    "chat/completions#/../../x",
    ";/../x",
    "%252e%252e/x",
    "..;/x",
    "%c0%ae%c0%ae/x",
)


@pytest.mark.parametrize("trick", PATH_TRICKS)
async def test_path_tricks_never_leave_the_upstream_base(
    gateway: RunningGateway,
    upstream: RunningUpstream,
    elsewhere: RunningUpstream,
    seed: Seed,
    trick: str,
) -> None:
    """Dot segments, encoded slashes, double slashes, userinfo and absolute URLs in the
    proxied path: 400 invalid_path, or forwarded to the configured upstream's /api/v1/."""
    org = await seed.org()
    _, token = await seed.member_with_key(org)
    evil = f"{elsewhere.host}:{elsewhere.port}"
    target = ("/api/openrouter/" + trick.format(evil=evil)).encode()
    headers = [f"Authorization: Bearer {token}", f"Host: {evil}"]
    await assert_path_handled_safely(gateway, upstream, elsewhere, target, headers)


@pytest.mark.parametrize(
    "target",
    [
        "http://{evil}/api/openrouter/chat/completions",
        "http://{evil}/api/openrouter/../../x",
        "https://{evil}/api/openrouter/chat/completions",
        "//{evil}/api/openrouter/chat/completions",
        "{evil}/api/openrouter/chat/completions",
        "*",
    ],
)
async def test_absolute_form_request_targets_go_nowhere_else(
    gateway: RunningGateway,
    upstream: RunningUpstream,
    elsewhere: RunningUpstream,
    seed: Seed,
    target: str,
) -> None:
    """`POST http://evil.example/api/openrouter/... HTTP/1.1` still only reaches the fake
    upstream, at /api/v1/ (the gateway is not a forward proxy)."""
    org = await seed.org()
    _, token = await seed.member_with_key(org)
    evil = f"{elsewhere.host}:{elsewhere.port}"
    await assert_path_handled_safely(
        gateway,
        upstream,
        elsewhere,
        target.format(evil=evil).encode(),
        [f"Authorization: Bearer {token}"],
    )


@PROPERTY
@given(tail=st.text(alphabet="./%2eEfF5cC@:\\av1;?#x", max_size=24))
async def test_any_proxied_path_stays_under_the_upstream_base(
    gateway: RunningGateway,
    upstream: RunningUpstream,
    elsewhere: RunningUpstream,
    member: tuple[str, str],
    tail: str,
) -> None:
    """Whatever the path after /api/openrouter/, the upstream sees only /api/v1/..."""
    _org, token = member
    await assert_path_handled_safely(
        gateway,
        upstream,
        elsewhere,
        ("/api/openrouter/" + tail).encode(),
        [f"Authorization: Bearer {token}"],
    )


# --- Slow clients ------------------------------------------------------------------------------


async def open_tricklers(gateway: RunningGateway, count: int) -> list[asyncio.StreamWriter]:
    """`count` connections that have sent a request line and half a header, no more."""
    writers = []
    for _ in range(count):
        _reader, writer = await asyncio.open_connection(gateway.url.host, gateway.url.port)
        writer.write(f"POST {CHAT_PATH} HTTP/1.1\r\nHost: gateway.test\r\nX-Slow: ".encode())
        writers.append(writer)
    return writers


async def trickle(writers: list[asyncio.StreamWriter], seconds: float) -> None:
    """One more byte on every connection each half second."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        for writer in writers:
            if not writer.is_closing():
                writer.write(b"a")
        await asyncio.sleep(0.5)


async def test_clients_trickling_headers_do_not_slow_anyone_else(
    gateway: RunningGateway, client: aiohttp.ClientSession, seed: Seed
) -> None:
    """50 connections sending a header a byte every 0.5 s: normal requests stay prompt."""
    org = await seed.org()
    _, token = await seed.member_with_key(org)
    writers = await open_tricklers(gateway, 50)
    trickling = asyncio.create_task(trickle(writers, 3.0))
    latencies = []
    try:
        while not trickling.done():
            started = time.perf_counter()
            await assert_still_serving(client, gateway, token, org)
            latencies.append(time.perf_counter() - started)
            await asyncio.sleep(0.1)
    finally:
        await trickling
        for writer in writers:
            await close_writer(writer)
    assert len(latencies) >= 10
    assert max(latencies) < PROMPT_SECONDS, latencies
    print(f"50 tricklers: {len(latencies)} requests, max {max(latencies) * 1000:.1f} ms")


async def test_a_client_that_never_finishes_its_headers_is_cut_off(
    gateway_factory: Callable[..., Any],
) -> None:
    """A connection that keeps trickling header bytes is answered (408) or closed once
    HEADER_TIMEOUT_SECONDS have passed since its request began, not kept open for ever
    (aiohttp alone keeps it until keepalive_timeout, 3630 s by default)."""
    gateway = await gateway_factory(HEADER_TIMEOUT_SECONDS=1)
    reader, writer = await asyncio.open_connection(gateway.url.host, gateway.url.port)
    writer.write(f"POST {CHAT_PATH} HTTP/1.1\r\nHost: gateway.test\r\nX-Slow: ".encode())
    trickling = asyncio.create_task(trickle([writer], 4.0))
    try:
        async with asyncio.timeout(4.0):
            answer = await reader.read()
    except TimeoutError:
        pytest.fail("still open 4 s after its request began, with HEADER_TIMEOUT_SECONDS=1")
    except ConnectionResetError:
        # The gateway closed while our trickle was still arriving, so its kernel answered
        # the next bytes with a reset, which may overtake the 408: cut off all the same.
        answer = b""
    finally:
        trickling.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await trickling
        await close_writer(writer)
    if answer:
        assert_envelope(parse_reply(answer), 408)


# --- Floods of invalid keys ------------------------------------------------------------------


async def key_lookups(db: asyncpg.Connection) -> int:
    """Scans of api_keys PostgreSQL has counted: one per key lookup (nothing else reads it)."""
    await db.execute("SELECT pg_stat_clear_snapshot()")
    scans: int = await db.fetchval(
        "SELECT coalesce(idx_scan, 0) + coalesce(seq_scan, 0) FROM pg_stat_user_tables"
        " WHERE relname = 'api_keys'"
    )
    return scans


async def settled_key_lookups(db: asyncpg.Connection, gateway: RunningGateway) -> int:
    """Stop the gateway (its connections report their statistics as they exit) and count."""
    await gateway.close()
    deadline = time.monotonic() + 5
    while await db.fetchval(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
        " AND pid <> pg_backend_pid()"
    ):
        assert time.monotonic() < deadline, "the gateway's connections did not close"
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.2)
    return await key_lookups(db)


async def flood(
    gateway: RunningGateway, tokens: list[str], concurrency: int
) -> tuple[dict[int, int], float]:
    """Send one chat request per token, `concurrency` at a time; statuses and seconds."""
    statuses: dict[int, int] = {}
    queue = list(reversed(tokens))
    connector = aiohttp.TCPConnector(limit=concurrency)
    started = time.perf_counter()
    async with aiohttp.ClientSession(connector=connector) as session:

        async def worker() -> None:
            while queue:
                token = queue.pop()
                headers = {"Authorization": f"Bearer {token}"}
                async with session.post(
                    str(gateway.url) + CHAT_PATH, data=CHAT_BODY, headers=headers
                ) as response:
                    body = await response.read()
                statuses[response.status] = statuses.get(response.status, 0) + 1
                if response.status != 401:
                    raise AssertionError(body[:300])

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return statuses, time.perf_counter() - started


async def busiest_moment(db_url: str, stop: asyncio.Event) -> int:
    """The most gateway queries on api_keys running at once, sampled until `stop`."""
    conn = await asyncpg.connect(db_url)
    most = 0
    try:
        while not stop.is_set():
            running = await conn.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                " AND state = 'active' AND query ILIKE '%api_keys%' AND pid <> pg_backend_pid()"
            )
            most = max(most, running)
            await asyncio.sleep(0.005)
    finally:
        await conn.close()
    return most


async def test_a_flood_of_distinct_invalid_keys_costs_at_most_one_query_each(
    make_config: Callable[..., Any], db: asyncpg.Connection, db_url: str, log_stream: Any
) -> None:
    """2,000 distinct unknown tokens, 50 at a time: all 401, at most one key lookup per
    token, no more queries at once than the pool holds, and none when they come again."""
    gateway = await start_gateway(make_config(NEGATIVE_CACHE_TTL_SECONDS=600))
    try:
        tokens = [f"kilo_{secrets.token_urlsafe(24)}" for _ in range(2000)]
        before = await key_lookups(db)
        stop = asyncio.Event()
        sampler = asyncio.create_task(busiest_moment(db_url, stop))
        statuses, seconds = await flood(gateway, tokens, concurrency=50)
        again, _ = await flood(gateway, tokens, concurrency=50)
        stop.set()
        most_at_once = await sampler
    finally:
        lookups = await settled_key_lookups(db, gateway) - before
    assert statuses == {401: 2000} and again == {401: 2000}
    pool_size = make_config().database_pool_max_size
    assert most_at_once <= pool_size
    # Every distinct token is looked up once; the second round is answered from the cache.
    assert 0 < lookups <= len(tokens), lookups
    print(f"flood: {len(tokens)} keys in {seconds:.2f}s, {lookups} lookups, {most_at_once} at once")


async def test_the_same_invalid_key_costs_one_query_per_negative_ttl(
    make_config: Callable[..., Any], db: asyncpg.Connection, log_stream: Any
) -> None:
    """One unknown token sent over and over, 50 at a time for 2 s: one lookup per
    NEGATIVE_CACHE_TTL_SECONDS at most (plus the first)."""
    ttl_seconds, duration_seconds = 0.5, 2.0
    gateway = await start_gateway(make_config(NEGATIVE_CACHE_TTL_SECONDS=ttl_seconds))
    try:
        before = await key_lookups(db)
        token = f"kilo_{secrets.token_urlsafe(24)}"
        sent = 0
        started = time.monotonic()
        while time.monotonic() - started < duration_seconds:
            statuses, _ = await flood(gateway, [token] * 200, concurrency=50)
            assert statuses == {401: 200}
            sent += 200
        elapsed = time.monotonic() - started
    finally:
        lookups = await settled_key_lookups(db, gateway) - before
    assert 0 < lookups <= math.ceil(elapsed / ttl_seconds) + 1, (lookups, sent, elapsed)
    print(f"same key: {sent} requests in {elapsed:.2f}s, {lookups} lookups")


# --- Strings PostgreSQL cannot store -----------------------------------------------------------


@pytest.mark.parametrize(
    ("endpoint", "body"),
    [
        ("invite", b'{"email": "nul\\u0000@example.test"}'),
        ("invite", b'{"email": "half\\ud800@example.test"}'),
        ("contact sales", b'{"message": "hello \\u0000 sales"}'),
        ("contact sales", b'{"message": "hello \\udfff sales"}'),
        ("create organization", b'{"name": "half \\ud800"}'),
        ("create organization", b'{"name": "nul \\u0000"}'),
    ],
)
async def test_strings_postgres_cannot_store_are_400(
    site: Site, client: aiohttp.ClientSession, db: asyncpg.Connection, endpoint: str, body: bytes
) -> None:
    """NUL and lone surrogates are valid JSON escapes but not PostgreSQL text: 400."""
    before = await row_counts(db)
    reply = await send(
        client, site.gateway, "POST", site.api_posts()[endpoint], token=site.token, body=body
    )
    assert reply.status == 400, reply.body
    assert_envelope(reply)
    assert await row_counts(db) == before


@pytest.mark.parametrize("user_id", ["%00", "a%00b", "%FF%00"])
async def test_removing_an_unstorable_user_id_is_not_found(
    site: Site, client: aiohttp.ClientSession, user_id: str
) -> None:
    """A user id in the path that no user can have: 404 member_not_found, not 500."""
    reply = await send(
        client,
        site.gateway,
        "DELETE",
        f"/api/organizations/{site.org_id}/members/{user_id}",
        token=site.token,
    )
    assert reply.status in (400, 404), reply.body
    assert_envelope(reply)


@pytest.mark.parametrize(
    "query",
    [
        "from=0001-01-01T00:00:00%2B14:00",
        "to=9999-12-31T23:59:59-14:00",
        "from=0001-01-01&to=0001-01-01T00:00:01%2B14:00",
        "to=0001-01-01T00:00:00%2B00:00",
    ],
)
async def test_periods_at_the_edges_of_time_are_400(
    gateway: RunningGateway, client: aiohttp.ClientSession, seed: Seed, query: str
) -> None:
    """Dates that exist in Python but not in UTC (year 0, year 10000): 400 invalid_period."""
    org = await seed.org()
    _, token = await seed.member_with_key(org, "owner")
    reply = await send(
        client, gateway, "GET", f"/api/organizations/{org}/usage?{query}", token=token
    )
    assert_envelope(reply, 400, "invalid_period")
