"""Secrets and isolation: a member of one organization can never spend, read or learn
anything of another; our upstream key and the Stripe secrets never leave the gateway;
the client's credentials never reach the upstream; responses name no internals.

A real gateway on a real port, real PostgreSQL, the fake OpenRouter and the fake Stripe.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import io
import json
import socket
import time
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import timedelta
from typing import Any

import aiohttp
import asyncpg
import pytest
from yarl import URL

from bench.fake_upstream import RunningUpstream
from gateway.access.auth import hash_token
from gateway.plans import load_catalog
from tests.conftest import UPSTREAM_TEST_KEY, RunningGateway
from tests.factories import Seed
from tests.fake_stripe import (
    SECRET_KEY,
    WEBHOOK_SECRET,
    RunningFakeStripe,
    add_catalog_prices,
    start_fake_stripe,
    stripe_env,
)

CHAT_PATH = "/api/openrouter/chat/completions"
CHAT_BODY = {"model": "openai/gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
ORG_HEADER = "X-KiloCode-OrganizationId"
MAX_BODY_BYTES = 65536
# Text that would mean a response shows internals.
INTERNALS = ("Traceback", 'File "', "asyncpg", "SELECT ", "INSERT INTO", "UPDATE ", "psycopg")
# Secrets of the gateway's own: none may ever appear in a response or a log line.
GATEWAY_SECRETS = (UPSTREAM_TEST_KEY, SECRET_KEY, WEBHOOK_SECRET)
# Tables a refused request must leave alone.
WRITTEN_TABLES = (
    "organization_memberships",
    "organization_invitations",
    "sales_contact_requests",
    "email_outbox",
    "credit_transactions",
    "llm_usage",
)


@dataclasses.dataclass(frozen=True)
class Reply:
    """A response read to the end."""

    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    def text(self) -> str:
        """Everything the client sees: headers and body."""
        headers = "\n".join(f"{k}: {v}" for k, v in self.headers.items())
        return headers + "\n\n" + self.body.decode("utf-8", "replace")


async def send(
    client: aiohttp.ClientSession,
    gateway: RunningGateway,
    method: str,
    path: str,
    *,
    token: str | None = None,
    body: Any = None,
    headers: dict[str, str] | None = None,
) -> Reply:
    """One request; `body` is sent as JSON unless it is bytes."""
    sent = dict(headers or {})
    if token is not None:
        sent["Authorization"] = f"Bearer {token}"
    data, as_json = (body, None) if isinstance(body, bytes) else (None, body)
    url = URL(str(gateway.url) + path, encoded=True)
    content = b""
    async with client.request(method, url, json=as_json, data=data, headers=sent) as response:
        # A stream the upstream broke off is cut short on purpose: keep what arrived.
        with contextlib.suppress(aiohttp.ClientPayloadError):
            async for chunk in response.content.iter_any():
                content += chunk
    return Reply(response.status, {k.lower(): v for k, v in response.headers.items()}, content)


async def send_raw(gateway: RunningGateway, request: bytes) -> Reply:
    """Write a request byte for byte; read the response until the server closes."""
    reader, writer = await asyncio.open_connection(gateway.url.host, gateway.url.port)
    try:
        writer.write(request)
        async with asyncio.timeout(5):
            raw = await reader.read()
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
    head, _, body = raw.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
    return Reply(int(status_line.split()[1]), headers, body)


def assert_refusal(reply: Reply, status: int, reason: str) -> dict[str, Any]:
    """The gateway's plain error envelope for `status`/`reason`; returns `error`."""
    assert reply.status == status, (reply.status, reply.body[:400])
    envelope = reply.json()
    assert set(envelope) == {"error", "error_type"}
    assert envelope["error_type"] == reason, envelope
    error: dict[str, Any] = envelope["error"]
    assert set(error) == {"code", "message", "metadata"}, error
    assert error["metadata"] == {"reason": reason}
    return error


def assert_no_internals(reply: Reply) -> None:
    """No stack trace, SQL text or secret of ours in what the client sees."""
    seen = reply.text()
    for marker in INTERNALS + GATEWAY_SECRETS:
        assert marker not in seen, (marker, seen[:500])


def comparable(reply: Reply) -> tuple[int, str | None, bytes]:
    """What must not differ between asking about one organization or another."""
    return reply.status, reply.headers.get("content-type"), reply.body


async def row_counts(db: asyncpg.Connection) -> dict[str, int]:
    return {t: await db.fetchval(f"SELECT count(*) FROM {t}") for t in WRITTEN_TABLES}


async def charged_to(db: asyncpg.Connection, request_id: str) -> str:
    """The organization the request was charged to, once the ledger wrote it (3 s at most)."""
    deadline = time.monotonic() + 3
    query = "SELECT organization_id::text FROM llm_usage WHERE request_id = $1"
    while (organization_id := await db.fetchval(query, request_id)) is None:
        assert time.monotonic() < deadline, f"no usage row for {request_id}"
        await asyncio.sleep(0.02)
    return str(organization_id)


# --- The organizations ---------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class World:
    """Org A and its owner; org B (expired, with credits, enterprise) and its owner; a user
    who owns both, with a key bound to A and an unbound key; a UUID that names nothing."""

    gateway: RunningGateway
    stripe: RunningFakeStripe
    a: str
    a_user: str
    a_token: str
    b: str
    b_user: str
    b_token: str
    both_user: str
    bound_to_a: str
    unbound: str
    nobody: str


@pytest.fixture
async def stripe_server() -> AsyncIterator[RunningFakeStripe]:
    running = await start_fake_stripe()
    add_catalog_prices(running.state, load_catalog())
    yield running
    await running.close()


@pytest.fixture
async def world(
    gateway_factory: Callable[..., Any], stripe_server: RunningFakeStripe, seed: Seed
) -> World:
    gateway = await gateway_factory(**stripe_env(stripe_server), MAX_BODY_BYTES=MAX_BODY_BYTES)
    a = await seed.org(name="Alpha")
    a_user, a_token = await seed.member_with_key(a, "owner")
    # B's trial is over and it has credits: any 402 for it would carry dates and a balance.
    b = await seed.org(name="Bravo", plan="enterprise", age=timedelta(days=45))
    b_user, b_token = await seed.member_with_key(b, "owner")
    both_user = await seed.user()
    await seed.member(a, both_user, "owner")
    await seed.member(b, both_user, "owner")
    bound_to_a = await seed.key(both_user, a)
    unbound = await seed.key(both_user)
    return World(
        gateway,
        stripe_server,
        a,
        a_user,
        a_token,
        b,
        b_user,
        b_token,
        both_user,
        bound_to_a,
        unbound,
        str(uuid.uuid4()),
    )


async def allowed_request(client: aiohttp.ClientSession, world: World) -> str:
    """A chat completion A's owner may make; its request id."""
    reply = await send(
        client,
        world.gateway,
        "POST",
        CHAT_PATH,
        token=world.a_token,
        body=CHAT_BODY,
        headers={ORG_HEADER: world.a},
    )
    assert reply.status == 200, reply.body
    return reply.headers["x-request-id"]


def org_endpoints(org_id: str, target_user: str) -> list[tuple[str, str, Any]]:
    """Every endpoint about one organization: method, path, JSON body."""
    base = f"/api/organizations/{org_id}"
    return [
        ("GET", base, None),
        ("GET", f"{base}/usage", None),
        ("GET", f"{base}/usage?from=2020-01-01", None),
        ("GET", f"{base}/members", None),
        ("POST", f"{base}/invitations", {"email": "spy@example.test", "role": "owner"}),
        ("GET", f"{base}/invitations", None),
        ("DELETE", f"{base}/invitations/00000000-0000-4000-8000-000000000000", None),
        ("POST", f"{base}/subscription/checkout", {"seats": 5}),
        ("POST", f"{base}/credits/checkout", {"amount_usd": 10}),
        ("POST", f"{base}/sso/contact-sales", {"message": "let me in"}),
        ("DELETE", f"{base}/members/{target_user}", None),
    ]


# --- Spending another organization's credits -------------------------------------------------


@pytest.mark.parametrize(
    "path", [CHAT_PATH, "/api/openrouter/completions", "/api/openrouter/v1/chat/completions"]
)
async def test_proxy_for_another_org_is_403_and_says_nothing_about_it(
    world: World,
    upstream: RunningUpstream,
    client: aiohttp.ClientSession,
    db: asyncpg.Connection,
    path: str,
) -> None:
    """A's owner naming B gets 403 not_a_member, byte for byte what a UUID of no
    organization gets: no balance, no trial dates, not even whether B exists."""
    before = await row_counts(db)
    replies = {}
    for name, org_id in (("b", world.b), ("nobody", world.nobody), ("B", world.b.upper())):
        replies[name] = await send(
            client,
            world.gateway,
            "POST",
            path,
            token=world.a_token,
            body=CHAT_BODY,
            headers={ORG_HEADER: org_id},
        )
        assert_refusal(replies[name], 403, "not_a_member")
        assert_no_internals(replies[name])
        for telltale in (world.b, "Bravo", "balance", "trial", "seats", "enterprise"):
            assert telltale not in replies[name].body.decode()
    assert comparable(replies["b"]) == comparable(replies["nobody"]) == comparable(replies["B"])
    assert upstream.recorder.received == 0
    # A request of A's own, charged after the refusals: once its row is in, theirs would be.
    await charged_to(db, await allowed_request(client, world))
    assert await row_counts(db) == {**before, "llm_usage": before["llm_usage"] + 1}


async def test_a_member_of_both_spends_only_the_named_org(
    world: World, upstream: RunningUpstream, client: aiohttp.ClientSession, db: asyncpg.Connection
) -> None:
    """Sanity for the refusals above: the same request from a member of B is B's (402 here,
    B's trial is over), and an allowed request is charged to the organization it named."""
    reply = await send(
        client,
        world.gateway,
        "POST",
        CHAT_PATH,
        token=world.unbound,
        body=CHAT_BODY,
        headers={ORG_HEADER: world.b},
    )
    assert reply.status == 402 and reply.json()["error"]["metadata"]["organization_id"] == world.b
    reply = await send(
        client,
        world.gateway,
        "POST",
        CHAT_PATH,
        token=world.unbound,
        body=CHAT_BODY,
        headers={ORG_HEADER: world.a},
    )
    assert reply.status == 200
    request_id = reply.headers["x-request-id"]
    charged = None
    for _ in range(100):
        charged = await db.fetchval(
            "SELECT organization_id::text FROM llm_usage WHERE request_id = $1", request_id
        )
        if charged is not None:
            break
        await asyncio.sleep(0.03)
    assert charged == world.a


# --- Reading another organization ------------------------------------------------------------


async def test_every_org_endpoint_refuses_outsiders_identically(
    world: World, client: aiohttp.ClientSession, db: asyncpg.Connection
) -> None:
    """Status, members, usage, invitations, checkouts, sales, removal: for an outsider
    the answer about B is the answer about an organization that does not exist."""
    before = await row_counts(db)
    for (method, path_b, body), (_, path_nobody, _) in zip(
        org_endpoints(world.b, world.b_user), org_endpoints(world.nobody, world.b_user), strict=True
    ):
        about_b = await send(client, world.gateway, method, path_b, token=world.a_token, body=body)
        about_nobody = await send(
            client, world.gateway, method, path_nobody, token=world.a_token, body=body
        )
        assert_refusal(about_b, 403, "not_a_member")
        assert comparable(about_b) == comparable(about_nobody), (method, path_b)
        assert world.b_user not in about_b.body.decode()
        assert_no_internals(about_b)
    assert world.stripe.state.requests == []
    assert await row_counts(db) == before


async def test_a_key_bound_to_one_org_cannot_act_for_another_even_for_a_member(
    world: World, upstream: RunningUpstream, client: aiohttp.ClientSession, db: asyncpg.Connection
) -> None:
    """The user owns A and B; their key bound to A is refused everything about B, exactly
    as for an organization that does not exist, while their unbound key may act for B."""
    before = await row_counts(db)
    for org_id in (world.b, world.nobody):
        reply = await send(
            client,
            world.gateway,
            "POST",
            CHAT_PATH,
            token=world.bound_to_a,
            body=CHAT_BODY,
            headers={ORG_HEADER: org_id},
        )
        assert_refusal(reply, 403, "not_a_member")
    for (method, path_b, body), (_, path_nobody, _) in zip(
        org_endpoints(world.b, world.b_user), org_endpoints(world.nobody, world.b_user), strict=True
    ):
        about_b = await send(
            client, world.gateway, method, path_b, token=world.bound_to_a, body=body
        )
        about_nobody = await send(
            client, world.gateway, method, path_nobody, token=world.bound_to_a, body=body
        )
        assert_refusal(about_b, 403, "not_a_member")
        assert comparable(about_b) == comparable(about_nobody), (method, path_b)
    assert upstream.recorder.received == 0
    assert world.stripe.state.requests == []
    assert await row_counts(db) == before
    # The refusals are the binding's doing: the unbound key of the same user reads B.
    assert (
        await send(
            client, world.gateway, "GET", f"/api/organizations/{world.b}", token=world.unbound
        )
    ).status == 200
    # And without a header the bound key acts for A.
    reply = await send(
        client, world.gateway, "POST", CHAT_PATH, token=world.bound_to_a, body=CHAT_BODY
    )
    assert reply.status == 200


async def test_billing_managers_and_members_of_b_still_cannot_reach_a(
    world: World, seed: Seed, client: aiohttp.ClientSession
) -> None:
    """Roles are per organization: B's billing manager is nobody in A."""
    _, manager_token = await seed.member_with_key(world.b, "billing_manager")
    for method, path, body in org_endpoints(world.a, world.a_user):
        reply = await send(client, world.gateway, method, path, token=manager_token, body=body)
        assert_refusal(reply, 403, "not_a_member")
    reply = await send(
        client,
        world.gateway,
        "POST",
        CHAT_PATH,
        token=world.b_token,
        body=CHAT_BODY,
        headers={ORG_HEADER: world.a},
    )
    assert_refusal(reply, 403, "not_a_member")


# --- Secrets ---------------------------------------------------------------------------------


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


async def test_no_secret_of_ours_appears_in_any_response_or_log_line(
    world: World,
    gateway_factory: Callable[..., Any],
    upstream: RunningUpstream,
    client: aiohttp.ClientSession,
    db: asyncpg.Connection,
    log_stream: io.StringIO,
) -> None:
    """Allowed, streamed, blocked, refused, malformed, upstream errors, unreachable and
    slow upstreams, Stripe errors: the upstream key and Stripe secrets appear nowhere a
    client or a log reader could see them, nor do client tokens or their hashes in logs."""
    gw = world.gateway
    chat = {ORG_HEADER: world.a}
    replies = [
        await send(
            client, gw, "POST", CHAT_PATH, token=world.a_token, body=CHAT_BODY, headers=chat
        ),
        await send(
            client,
            gw,
            "POST",
            CHAT_PATH,
            token=world.a_token,
            body={**CHAT_BODY, "stream": True},
            headers=chat,
        ),
        await send(
            client,
            gw,
            "POST",
            "/api/openrouter/completions",
            token=world.a_token,
            body={"model": "m", "prompt": "p"},
            headers=chat,
        ),
        await send(client, gw, "GET", "/api/openrouter/models", token=world.a_token),
        await send(client, gw, "POST", CHAT_PATH, token=world.b_token, body=CHAT_BODY),  # 402
        await send(client, gw, "POST", CHAT_PATH, token="kilo_unknown", body=CHAT_BODY),  # 401
        await send(client, gw, "POST", CHAT_PATH, body=CHAT_BODY),  # 401, no key
        await send(
            client,
            gw,
            "POST",
            CHAT_PATH,
            token=world.a_token,
            body=CHAT_BODY,
            headers={ORG_HEADER: world.b},
        ),
        await send(
            client,
            gw,
            "POST",
            CHAT_PATH,
            token=world.a_token,
            body=CHAT_BODY,
            headers={ORG_HEADER: "' OR 1=1 --"},
        ),
        await send(client, gw, "POST", "/api/openrouter/a/../../x", token=world.a_token),
        await send(client, gw, "GET", "/nope"),
        await send(client, gw, "PATCH", "/api/organizations"),
        await send(
            client,
            gw,
            "POST",
            CHAT_PATH,
            token=world.a_token,
            body=b"x" * (MAX_BODY_BYTES + 1),
            headers=chat,
        ),
        await send(client, gw, "POST", "/api/organizations", token=world.a_token, body=b"{"),
        await send(
            client,
            gw,
            "POST",
            "/api/stripe/webhook",
            body=b"{}",
            headers={"Stripe-Signature": "t=1,v1=00"},
        ),
        await send(client, gw, "GET", "/metrics"),
        await send(client, gw, "GET", "/readyz"),
        await send_raw(gw, b"GET /healthz HTTP/1.1\r\nX-Big: " + b"a" * 9000 + b"\r\n\r\n"),
        await send_raw(
            gw,
            b"POST " + CHAT_PATH.encode() + b" HTTP/1.1\r\nHost: x\r\n"
            b"Authorization: Bearer \xff\xfe\r\nContent-Length: 0\r\n"
            b"Connection: close\r\n\r\n",
        ),
    ]
    upstream.settings.die_after_chunks = 1
    replies.append(
        await send(
            client,
            gw,
            "POST",
            CHAT_PATH,
            token=world.a_token,
            body={**CHAT_BODY, "stream": True},
            headers=chat,
        )
    )
    upstream.settings.die_after_chunks = None
    for status in (400, 401, 402, 429, 500, 503):
        upstream.settings.fail_status = status
        replies.append(
            await send(
                client, gw, "POST", CHAT_PATH, token=world.a_token, body=CHAT_BODY, headers=chat
            )
        )
    upstream.settings.fail_status = None
    world.stripe.state.fail_next(402, "card_error", f"Your key {SECRET_KEY} was declined")
    replies.append(
        await send(
            client,
            gw,
            "POST",
            f"/api/organizations/{world.a}/credits/checkout",
            token=world.a_token,
            body={"amount_usd": 10},
        )
    )
    unreachable = await gateway_factory(OPENROUTER_BASE_URL=f"http://127.0.0.1:{closed_port()}/v1")
    replies.append(
        await send(
            client,
            unreachable,
            "POST",
            CHAT_PATH,
            token=world.a_token,
            body=CHAT_BODY,
            headers=chat,
        )
    )
    slow = await gateway_factory(UPSTREAM_TIMEOUT_SECONDS=0.2)
    upstream.settings.delay_seconds = 1
    replies.append(
        await send(
            client, slow, "POST", CHAT_PATH, token=world.a_token, body=CHAT_BODY, headers=chat
        )
    )
    upstream.settings.delay_seconds = 0

    statuses = [r.status for r in replies]
    for expected in (200, 400, 401, 402, 403, 404, 405, 413, 500, 502, 503, 504):
        assert expected in statuses, (expected, statuses)
    for reply in replies:
        assert_no_internals(reply)
    # Every request the middleware saw has its line (the two unreadable ones have none).
    deadline = time.monotonic() + 3
    while (logged := log_stream.getvalue()).count('"event": "request"') < len(replies) - 2:
        assert time.monotonic() < deadline, logged[-2000:]
        await asyncio.sleep(0.02)
    for secret in (*GATEWAY_SECRETS, world.a_token, world.b_token, world.unbound):
        assert secret not in logged
        assert hash_token(secret) not in logged


async def test_the_clients_credentials_never_reach_the_upstream(
    world: World, upstream: RunningUpstream, client: aiohttp.ClientSession
) -> None:
    """Whatever credentials the client sends, in however many headers, the upstream gets
    one Authorization (ours) and none of the client's token, cookies or Kilo headers."""
    token = world.a_token
    variants: list[list[bytes]] = [
        [b"Authorization: Bearer " + token.encode()],
        [
            b"authorization: bearer " + token.encode(),
            b"Proxy-Authorization: Bearer " + token.encode(),
        ],
        [b"Authorization: Bearer " + token.encode(), b"Cookie: session=" + token.encode()],
        [
            b"Authorization: Bearer " + token.encode(),
            b"X-KiloCode-Token: " + token.encode(),
            b"X-KiloCode-Version: 4.0",
        ],
        [
            b"Authorization: Bearer " + token.encode(),
            b"Connection: keep-alive, X-Secret",
            b"X-Secret: " + token.encode(),
        ],
    ]
    body = json.dumps(CHAT_BODY).encode()
    for headers in variants:
        lines = [
            b"POST " + CHAT_PATH.encode() + b" HTTP/1.1",
            b"Host: gateway.test",
            b"X-KiloCode-OrganizationId: " + world.a.encode(),
            *headers,
            b"Content-Length: %d" % len(body),
            b"Connection: close",
        ]
        reply = await send_raw(world.gateway, b"\r\n".join(lines) + b"\r\n\r\n" + body)
        assert reply.status == 200, (headers, reply.body[:300])
    # Two Authorization headers are refused outright: nothing reaches the upstream.
    doubled = [b"Authorization: Bearer " + token.encode()] * 2
    lines = [b"POST " + CHAT_PATH.encode() + b" HTTP/1.1", b"Host: gateway.test", *doubled]
    lines += [b"Content-Length: %d" % len(body), b"Connection: close"]
    reply = await send_raw(world.gateway, b"\r\n".join(lines) + b"\r\n\r\n" + body)
    assert reply.status == 401, reply.body[:300]
    assert upstream.recorder.received == len(variants)
    for request in upstream.recorder.requests:
        assert request.headers.getall("Authorization") == [f"Bearer {UPSTREAM_TEST_KEY}"]
        seen = "\n".join(f"{k}: {v}" for k, v in request.headers.items())
        seen += request.body.decode()
        assert token not in seen and hash_token(token) not in seen, seen
        names = {name.lower() for name in request.headers}
        assert not names & {"cookie", "proxy-authorization", "x-secret"}, names
        assert not [n for n in names if n.startswith("x-kilocode")], names


async def test_responses_carry_no_stack_traces_or_sql(world: World) -> None:
    """Requests that make the gateway fail or refuse, in every way we know: the body is the
    envelope, never a trace, a file path or SQL."""
    gw, token, org = world.gateway, world.a_token, world.a
    bodies: list[tuple[str, str, bytes, dict[str, str]]] = [
        ("POST", "/api/organizations", b"[" * 50_000, {}),
        ("POST", "/api/organizations", b'{"name": "\\u0000"}', {}),
        ("POST", f"/api/organizations/{org}/invitations", b'{"email": "a\\u0000@b.test"}', {}),
        ("POST", f"/api/organizations/{org}/invitations", b'{"email": "a\\ud800@b.test"}', {}),
        ("POST", f"/api/organizations/{org}/sso/contact-sales", b'{"message": "\\u0000"}', {}),
        ("DELETE", f"/api/organizations/{org}/members/%00", b"", {}),
        ("GET", f"/api/organizations/{org}/usage?from=0001-01-01T00:00:00%2B14:00", b"", {}),
        ("GET", f"/api/organizations/{org}/usage?to=9999-12-31T23:59:59-14:00", b"", {}),
        ("GET", f"/api/organizations/{org}/usage?from=%27;%20SELECT%201%20--", b"", {}),
        ("POST", "/api/organizations", b"\xff\xfe", {"Content-Encoding": "gzip"}),
        ("POST", CHAT_PATH, b"\xff\xfe", {"Content-Encoding": "deflate", ORG_HEADER: org}),
        ("POST", f"/api/organizations/{org}/credits/checkout", b'{"amount_usd": 1e999}', {}),
        ("POST", f"/api/organizations/{org}/subscription/checkout", b'{"seats": "1; DROP"}', {}),
    ]
    for method, path, body, headers in bodies:
        lines = [
            f"{method} {path} HTTP/1.1",
            "Host: gateway.test",
            f"Authorization: Bearer {token}",
            *(f"{k}: {v}" for k, v in headers.items()),
            f"Content-Length: {len(body)}",
            "Connection: close",
        ]
        reply = await send_raw(gw, "\r\n".join(lines).encode() + b"\r\n\r\n" + body)
        assert reply.status >= 400, (path, reply.status)
        assert_no_internals(reply)
        envelope = reply.json()
        assert set(envelope) == {"error", "error_type"}, (path, envelope)
