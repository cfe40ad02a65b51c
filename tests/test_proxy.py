"""The proxy end to end: a real gateway on a real port, real PostgreSQL, the fake OpenRouter.

Grouped by behaviour: what passes through, what is refused and with which envelope, how
the organization is chosen, what the upstream sees, how upstream failures surface, and
the enforcement modes.
"""

from __future__ import annotations

import json
import socket
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import aiohttp
import asyncpg
import pytest
from aiohttp import web
from multidict import CIMultiDictProxy
from yarl import URL

from bench.fake_upstream import RunningUpstream
from gateway.access.auth import hash_token
from tests.conftest import UPSTREAM_TEST_KEY, RunningGateway
from tests.factories import DEFAULT_CREDITS_MICRODOLLARS, Seed, utcnow

pytestmark = pytest.mark.usefixtures("blockbuster")

CHAT_PATH = "/api/openrouter/chat/completions"
CHAT_BODY: dict[str, Any] = {
    "model": "openai/gpt-4o-mini",
    "messages": [{"role": "user", "content": "hello"}],
}
EXPIRED_AGE = timedelta(days=31)
APP_URL = "https://app.example.test"
PLAIN_ERROR_KEYS = {"code", "message", "metadata"}
PAYMENT_ERROR_KEYS = PLAIN_ERROR_KEYS | {"title", "balance", "buyCreditsUrl"}
PAYMENT_METADATA_KEYS = {
    "reason",
    "organization_id",
    "trial_ends_at",
    "seats_used",
    "seats_purchased",
}


@dataclass(frozen=True)
class Member:
    """A user with a token, a member of an organization."""

    org_id: str
    user_id: str
    token: str


@dataclass(frozen=True)
class Reply:
    """A response read to the end."""

    status: int
    headers: CIMultiDictProxy[str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


async def org_member(seed: Seed, *, role: str = "owner", **org: Any) -> Member:
    """A new organization (keywords as `Seed.org`) and a member of it with a token."""
    org_id = await seed.org(**org)
    user_id, token = await seed.member_with_key(org_id, role)
    return Member(org_id, user_id, token)


async def call(
    client: aiohttp.ClientSession,
    gateway: RunningGateway,
    path: str = CHAT_PATH,
    *,
    method: str = "POST",
    token: str | None = None,
    headers: dict[str, str] | None = None,
    body: Any = CHAT_BODY,
    encoded: bool = False,
) -> Reply:
    """Send one request to the gateway and read the whole response."""
    sent = dict(headers or {})
    if token is not None:
        sent["Authorization"] = f"Bearer {token}"
    url = URL(str(gateway.url) + path, encoded=encoded)
    payload = None if method in ("GET", "HEAD") else body
    data = payload if isinstance(payload, bytes) else None
    as_json = None if isinstance(payload, bytes) else payload
    async with client.request(method, url, headers=sent, json=as_json, data=data) as resp:
        return Reply(resp.status, resp.headers, await resp.read())


def assert_envelope(reply: Reply, status: int, reason: str) -> dict[str, Any]:
    """The reply is the gateway's error envelope for `status`/`reason`; returns `error`."""
    assert reply.status == status, reply.body
    assert reply.headers["X-Request-Id"]
    assert reply.headers["Content-Type"].startswith("application/json")
    envelope = reply.json()
    assert set(envelope) == {"error", "error_type"}
    assert envelope["error_type"] == reason
    error: dict[str, Any] = envelope["error"]
    assert error["code"] == status
    assert isinstance(error["message"], str) and error["message"]
    assert error["metadata"]["reason"] == reason
    if status == 402:
        assert set(error) == PAYMENT_ERROR_KEYS
        assert set(error["metadata"]) == PAYMENT_METADATA_KEYS
    else:
        assert set(error) == PLAIN_ERROR_KEYS
        assert error["metadata"] == {"reason": reason}
    return error


async def assert_refused(
    client: aiohttp.ClientSession,
    gateway: RunningGateway,
    upstream: RunningUpstream,
    status: int,
    reason: str,
    **request: Any,
) -> dict[str, Any]:
    """The request gets the envelope for `status`/`reason` and never reaches the upstream."""
    received_before = upstream.recorder.received
    error = assert_envelope(await call(client, gateway, **request), status, reason)
    assert upstream.recorder.received == received_before
    return error


async def direct(client: aiohttp.ClientSession, upstream: RunningUpstream, path: str) -> Reply:
    """POST the chat body straight to the fake upstream, bypassing the gateway."""
    async with client.post(upstream.url + path, json=CHAT_BODY) as resp:
        return Reply(resp.status, resp.headers, await resp.read())


def closed_port() -> int:
    """A loopback port nothing listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


# --- Allowed requests pass through -------------------------------------------------------


async def test_trialing_org_gets_upstream_json_byte_for_byte(
    gateway: RunningGateway, upstream: RunningUpstream, client: aiohttp.ClientSession, seed: Seed
) -> None:
    """A trialing org's non-streaming chat request gets the upstream's exact bytes."""
    member = await org_member(seed, age=timedelta(days=1))
    reply = await call(client, gateway, token=member.token)
    expected = await direct(client, upstream, "/chat/completions")
    assert reply.status == 200
    assert reply.headers["Content-Type"].startswith("application/json")
    assert reply.body == expected.body


async def test_v1_prefix_is_dropped(
    gateway: RunningGateway, upstream: RunningUpstream, client: aiohttp.ClientSession, seed: Seed
) -> None:
    """`/api/openrouter/v1/chat/completions` reaches the upstream's `/chat/completions`."""
    member = await org_member(seed)
    reply = await call(client, gateway, "/api/openrouter/v1/chat/completions", token=member.token)
    assert reply.status == 200
    assert reply.json()["object"] == "chat.completion"
    assert upstream.recorder.last.path == "/api/v1/chat/completions"


@pytest.mark.parametrize("query", ["a=1&b=%20", "q=kilo+code&c=%2B%26"], ids=["pct20", "plus"])
async def test_query_string_is_forwarded_unchanged(
    gateway: RunningGateway,
    upstream: RunningUpstream,
    client: aiohttp.ClientSession,
    seed: Seed,
    query: str,
) -> None:
    """The query string reaches the upstream exactly as the client encoded it."""
    member = await org_member(seed)
    path = f"/api/openrouter/generation?{query}"
    reply = await call(client, gateway, path, method="GET", token=member.token)
    assert reply.status == 200, reply.body
    assert upstream.recorder.last.path == "/api/v1/generation"
    assert upstream.recorder.last.query_string == query


@pytest.mark.parametrize(
    "path", ["credits", "key", "auth/key", "keys", "activity", "some/thing", "keys/abc"]
)
async def test_account_wide_endpoints_are_not_proxied(
    gateway: RunningGateway,
    upstream: RunningUpstream,
    client: aiohttp.ClientSession,
    seed: Seed,
    path: str,
) -> None:
    """Paths outside the allow-list (our own OpenRouter account's) get 404, never upstream."""
    member = await org_member(seed)
    received_before = upstream.recorder.received
    for method in ("GET", "POST", "DELETE"):
        reply = await call(
            client, gateway, f"/api/openrouter/{path}", method=method, token=member.token
        )
        assert_envelope(reply, 404, "endpoint_not_proxied")
    assert upstream.recorder.received == received_before


# --- 401 invalid_api_key ------------------------------------------------------------------


@pytest.mark.parametrize(
    "authorization",
    [None, "Basic x", "Bearer kilo_not-a-key-anyone-issued", "Bearer "],
    ids=["missing", "basic", "unknown", "empty"],
)
async def test_bad_credentials_are_401(
    gateway: RunningGateway,
    upstream: RunningUpstream,
    client: aiohttp.ClientSession,
    authorization: str | None,
) -> None:
    """A missing, non-Bearer, empty or unknown credential is 401 invalid_api_key."""
    headers = {} if authorization is None else {"Authorization": authorization}
    await assert_refused(client, gateway, upstream, 401, "invalid_api_key", headers=headers)


async def test_revoked_key_is_401(
    gateway: RunningGateway,
    upstream: RunningUpstream,
    client: aiohttp.ClientSession,
    seed: Seed,
    db: asyncpg.Connection,
) -> None:
    """A key with revoked_at set is 401 invalid_api_key."""
    member = await org_member(seed)
    await db.execute("UPDATE api_keys SET revoked_at = now() WHERE user_id = $1", member.user_id)
    await assert_refused(client, gateway, upstream, 401, "invalid_api_key", token=member.token)


# --- 400 organization_required / invalid_organization_id ------------------------------------


async def test_user_in_two_orgs_without_header_is_400(
    gateway: RunningGateway, upstream: RunningUpstream, client: aiohttp.ClientSession, seed: Seed
) -> None:
    """A user in two orgs, with an unbound key and no header, is 400 organization_required,
    told how to choose in the clients they use (they cannot set a header themselves)."""
    member = await org_member(seed)
    await seed.member(await seed.org(), member.user_id)
    error = await assert_refused(
        client, gateway, upstream, 400, "organization_required", token=member.token
    )
    assert "several organizations" in error["message"]
    assert "KILO_ORG_ID" in error["message"]
    assert "organization picker" in error["message"]


async def test_user_in_no_org_is_400(
    gateway: RunningGateway, upstream: RunningUpstream, client: aiohttp.ClientSession, seed: Seed
) -> None:
    """A user who belongs to no organization is 400 organization_required."""
    token = await seed.key(await seed.user())
    error = await assert_refused(
        client, gateway, upstream, 400, "organization_required", token=token
    )
    assert "no organization" in error["message"]


async def test_malformed_organization_header_is_400(
    gateway: RunningGateway,
    upstream: RunningUpstream,
    client: aiohttp.ClientSession,
    seed: Seed,
    db: asyncpg.Connection,
) -> None:
    """An organization header that is not a UUID is 400 invalid_organization_id."""
    member = await org_member(seed)
    headers = {"X-KiloCode-OrganizationId": "'; DROP TABLE users;--"}
    await assert_refused(
        client,
        gateway,
        upstream,
        400,
        "invalid_organization_id",
        token=member.token,
        headers=headers,
    )
    assert await db.fetchval("SELECT count(*) FROM users") == 1


# --- 403 not_a_member ---------------------------------------------------------------------


async def test_header_naming_another_org_is_403(
    gateway: RunningGateway, upstream: RunningUpstream, client: aiohttp.ClientSession, seed: Seed
) -> None:
    """A header naming an organization the user is not in is 403 not_a_member."""
    member = await org_member(seed)
    other = await seed.org(name="Other")
    await assert_refused(
        client,
        gateway,
        upstream,
        403,
        "not_a_member",
        token=member.token,
        headers={"X-KiloCode-OrganizationId": other},
    )


async def test_billing_manager_is_403(
    gateway: RunningGateway, upstream: RunningUpstream, client: aiohttp.ClientSession, seed: Seed
) -> None:
    """A billing_manager of the organization is 403 not_a_member."""
    member = await org_member(seed, role="billing_manager")
    await assert_refused(client, gateway, upstream, 403, "not_a_member", token=member.token)


async def test_key_bound_to_another_org_is_403(
    gateway: RunningGateway, upstream: RunningUpstream, client: aiohttp.ClientSession, seed: Seed
) -> None:
    """A key bound to org A used with a header naming org B is 403, even for a member of B."""
    org_a, org_b = await seed.org(name="A"), await seed.org(name="B")
    user_id = await seed.user()
    await seed.member(org_a, user_id)
    await seed.member(org_b, user_id)
    token = await seed.key(user_id, org_a)
    await assert_refused(
        client,
        gateway,
        upstream,
        403,
        "not_a_member",
        token=token,
        headers={"X-KiloCode-OrganizationId": org_b},
    )


# --- 402 and the entitlement rule -----------------------------------------------------------


async def assert_payment_required(
    reply: Reply,
    db: asyncpg.Connection,
    *,
    reason: str,
    org_id: str,
    seats_used: int,
    seats_purchased: int,
    balance: float,
) -> None:
    """The reply is the 402 the extension's payment dialog reads, with these values."""
    error = assert_envelope(reply, 402, reason)
    assert isinstance(error["title"], str) and error["title"]
    assert error["balance"] == balance
    assert error["buyCreditsUrl"] == f"{APP_URL}/organizations/{org_id}/billing"
    metadata = error["metadata"]
    assert metadata["organization_id"] == org_id
    assert (metadata["seats_used"], metadata["seats_purchased"]) == (seats_used, seats_purchased)
    created_at = await db.fetchval("SELECT created_at FROM organizations WHERE id = $1", org_id)
    trial_ends_at = datetime.fromisoformat(metadata["trial_ends_at"])
    assert abs(trial_ends_at - (created_at + timedelta(days=30))) < timedelta(milliseconds=1)


async def test_trial_expired_is_402(
    gateway: RunningGateway,
    upstream: RunningUpstream,
    client: aiohttp.ClientSession,
    seed: Seed,
    db: asyncpg.Connection,
) -> None:
    """An org 31 days old that never bought seats is 402 trial_expired with dialog fields."""
    member = await org_member(
        seed,
        age=EXPIRED_AGE,
        credits_acquired_microdollars=15_000_000,
        credits_used_microdollars=2_500_000,
    )
    received_before = upstream.recorder.received
    reply = await call(client, gateway, token=member.token)
    await assert_payment_required(
        reply,
        db,
        reason="trial_expired",
        org_id=member.org_id,
        seats_used=1,
        seats_purchased=0,
        balance=12.5,
    )
    assert upstream.recorder.received == received_before


@pytest.mark.parametrize(
    "purchase",
    [
        {"expires_at": utcnow() - timedelta(days=1), "starts_at": utcnow() - timedelta(days=31)},
        {"status": "ended"},
    ],
    ids=["expired-purchase", "status-ended"],
)
async def test_inactive_subscription_is_402(
    gateway: RunningGateway,
    upstream: RunningUpstream,
    client: aiohttp.ClientSession,
    seed: Seed,
    db: asyncpg.Connection,
    purchase: dict[str, Any],
) -> None:
    """After the trial, an expired or ended purchase is 402 subscription_inactive; it pays
    for no seat any more (as the status page says too)."""
    member = await org_member(seed, age=timedelta(days=60))
    await seed.purchase(member.org_id, seat_count=5, **purchase)
    received_before = upstream.recorder.received
    reply = await call(client, gateway, token=member.token)
    await assert_payment_required(
        reply,
        db,
        reason="subscription_inactive",
        org_id=member.org_id,
        seats_used=1,
        seats_purchased=0,
        balance=DEFAULT_CREDITS_MICRODOLLARS / 1_000_000,
    )
    assert upstream.recorder.received == received_before


async def test_more_members_than_seats_is_402(
    gateway: RunningGateway,
    upstream: RunningUpstream,
    client: aiohttp.ClientSession,
    seed: Seed,
    db: asyncpg.Connection,
) -> None:
    """Two members (billing managers not counted) on one seat is 402 seats_exceeded."""
    member = await org_member(seed, age=timedelta(days=60))
    await seed.member_with_key(member.org_id, "member")
    await seed.member_with_key(member.org_id, "billing_manager")
    await seed.purchase(member.org_id, seat_count=1)
    received_before = upstream.recorder.received
    reply = await call(client, gateway, token=member.token)
    await assert_payment_required(
        reply,
        db,
        reason="seats_exceeded",
        org_id=member.org_id,
        seats_used=2,
        seats_purchased=1,
        balance=DEFAULT_CREDITS_MICRODOLLARS / 1_000_000,
    )
    assert upstream.recorder.received == received_before


async def test_billing_managers_take_no_seat(
    gateway: RunningGateway, client: aiohttp.ClientSession, seed: Seed
) -> None:
    """Two members and a billing manager fit in two purchased seats."""
    member = await org_member(seed, age=timedelta(days=60))
    await seed.member_with_key(member.org_id, "member")
    await seed.member_with_key(member.org_id, "billing_manager")
    await seed.purchase(member.org_id, seat_count=2)
    assert (await call(client, gateway, token=member.token)).status == 200


@pytest.mark.parametrize("billing_cycle", ["monthly", "yearly"])
async def test_active_purchase_after_trial_is_allowed(
    gateway: RunningGateway,
    upstream: RunningUpstream,
    client: aiohttp.ClientSession,
    seed: Seed,
    billing_cycle: str,
) -> None:
    """After the trial, an active monthly or yearly purchase covering the members is allowed."""
    member = await org_member(seed, age=timedelta(days=60))
    await seed.purchase(member.org_id, seat_count=1, billing_cycle=billing_cycle)
    received_before = upstream.recorder.received
    assert (await call(client, gateway, token=member.token)).status == 200
    assert upstream.recorder.received == received_before + 1


async def test_org_not_requiring_seats_is_allowed_after_trial(
    gateway: RunningGateway, client: aiohttp.ClientSession, seed: Seed
) -> None:
    """An org with require_seats=false is allowed after its trial without a purchase."""
    member = await org_member(seed, age=timedelta(days=60), require_seats=False)
    assert (await call(client, gateway, token=member.token)).status == 200


async def test_extended_trial_end_overrides_age(
    gateway: RunningGateway, client: aiohttp.ClientSession, seed: Seed
) -> None:
    """An old org whose free_trial_end_at is in the future is allowed."""
    member = await org_member(
        seed, age=timedelta(days=90), free_trial_end_at=utcnow() + timedelta(days=5)
    )
    assert (await call(client, gateway, token=member.token)).status == 200


# --- Which organization a request is for ------------------------------------------------


async def test_organization_header_name_is_case_insensitive(
    gateway: RunningGateway, client: aiohttp.ClientSession, seed: Seed
) -> None:
    """A lowercase `x-kilocode-organizationid` header picks the org among the user's two."""
    member = await org_member(seed, age=EXPIRED_AGE)
    second = await seed.org(name="Second", age=EXPIRED_AGE)
    await seed.member(second, member.user_id)
    reply = await call(
        client, gateway, token=member.token, headers={"x-kilocode-organizationid": second}
    )
    assert assert_envelope(reply, 402, "trial_expired")["metadata"]["organization_id"] == second


async def test_bound_key_selects_its_org(
    gateway: RunningGateway, client: aiohttp.ClientSession, seed: Seed
) -> None:
    """Without a header, a key bound to an org is used for that org among the user's two."""
    member = await org_member(seed, age=EXPIRED_AGE)
    second = await seed.org(name="Second", age=EXPIRED_AGE)
    await seed.member(second, member.user_id)
    token = await seed.key(member.user_id, second)
    reply = await call(client, gateway, token=token)
    assert assert_envelope(reply, 402, "trial_expired")["metadata"]["organization_id"] == second


async def test_only_org_is_used_by_default(
    gateway: RunningGateway, client: aiohttp.ClientSession, seed: Seed
) -> None:
    """Without a header or a bound key, the user's only organization is used."""
    member = await org_member(seed, age=EXPIRED_AGE)
    reply = await call(client, gateway, token=member.token)
    error = assert_envelope(reply, 402, "trial_expired")
    assert error["metadata"]["organization_id"] == member.org_id


# --- GET /models needs a key only ---------------------------------------------------------


async def test_models_allowed_for_expired_org_member(
    gateway: RunningGateway, upstream: RunningUpstream, client: aiohttp.ClientSession, seed: Seed
) -> None:
    """GET /models works for a member of an org whose trial has expired."""
    member = await org_member(seed, age=EXPIRED_AGE)
    reply = await call(client, gateway, "/api/openrouter/models", method="GET", token=member.token)
    assert reply.status == 200
    assert reply.json()["data"]
    assert upstream.recorder.last.path == "/api/v1/models"


async def test_models_allowed_for_user_without_org(
    gateway: RunningGateway, client: aiohttp.ClientSession, seed: Seed
) -> None:
    """GET /models works for a valid key whose user belongs to no organization."""
    token = await seed.key(await seed.user())
    reply = await call(client, gateway, "/api/openrouter/models", method="GET", token=token)
    assert reply.status == 200
    assert reply.json()["data"]


async def test_models_without_key_is_401(
    gateway: RunningGateway, upstream: RunningUpstream, client: aiohttp.ClientSession
) -> None:
    """GET /models without a key is 401 invalid_api_key."""
    await assert_refused(
        client,
        gateway,
        upstream,
        401,
        "invalid_api_key",
        path="/api/openrouter/models",
        method="GET",
    )


# --- Upstream failures ----------------------------------------------------------------------


async def test_upstream_402_becomes_503(
    gateway: RunningGateway, upstream: RunningUpstream, client: aiohttp.ClientSession, seed: Seed
) -> None:
    """An upstream 402 (our account) becomes our 503 upstream_payment_required."""
    member = await org_member(seed)
    upstream.settings.fail_status = 402
    reply = await call(client, gateway, token=member.token)
    assert_envelope(reply, 503, "upstream_payment_required")


@pytest.mark.parametrize("status", [500, 429])
async def test_upstream_errors_pass_through(
    gateway: RunningGateway,
    upstream: RunningUpstream,
    client: aiohttp.ClientSession,
    seed: Seed,
    status: int,
) -> None:
    """Upstream 500 and 429 reach the client with the upstream's own status and body."""
    member = await org_member(seed)
    upstream.settings.fail_status = status
    reply = await call(client, gateway, token=member.token)
    expected = await direct(client, upstream, "/chat/completions")
    assert (reply.status, reply.body) == (status, expected.body)
    assert reply.headers["X-Request-Id"]


async def test_unreachable_upstream_is_502(
    gateway_factory: Callable[..., Any], client: aiohttp.ClientSession, seed: Seed
) -> None:
    """An upstream nobody listens on is 502 upstream_unreachable."""
    gateway = await gateway_factory(OPENROUTER_BASE_URL=f"http://127.0.0.1:{closed_port()}/api/v1")
    member = await org_member(seed)
    assert_envelope(await call(client, gateway, token=member.token), 502, "upstream_unreachable")


async def test_slow_upstream_is_504(
    gateway_factory: Callable[..., Any],
    upstream: RunningUpstream,
    client: aiohttp.ClientSession,
    seed: Seed,
) -> None:
    """An upstream slower than UPSTREAM_TIMEOUT_SECONDS to answer is 504 upstream_timeout."""
    gateway = await gateway_factory(UPSTREAM_TIMEOUT_SECONDS=0.3)
    member = await org_member(seed)
    upstream.settings.delay_seconds = 2
    assert_envelope(await call(client, gateway, token=member.token), 504, "upstream_timeout")


async def test_body_over_limit_is_413(
    gateway_factory: Callable[..., Any],
    upstream: RunningUpstream,
    client: aiohttp.ClientSession,
    seed: Seed,
) -> None:
    """A body larger than MAX_BODY_BYTES is 413 payload_too_large and never goes upstream."""
    gateway = await gateway_factory(MAX_BODY_BYTES=2048)
    member = await org_member(seed)
    body = json.dumps({**CHAT_BODY, "padding": "x" * 10_240}).encode()
    await assert_refused(
        client,
        gateway,
        upstream,
        413,
        "payload_too_large",
        token=member.token,
        body=body,
        headers={"Content-Type": "application/json"},
    )


async def test_unknown_route_is_404(gateway: RunningGateway, client: aiohttp.ClientSession) -> None:
    """A path outside the gateway's routes is 404 not_found in the envelope."""
    assert_envelope(await call(client, gateway, "/nope", method="GET"), 404, "not_found")


# --- Path tricks --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path",
    [
        "/api/openrouter/a/../../x",
        "/api/openrouter/../../x",
        "/api/openrouter/chat%2f..%2f..%2fadmin",
        "/api/openrouter/chat/%2E%2E/%2e%2e/x",
    ],
    ids=["dot-dot", "leading-dot-dot", "encoded-slash", "encoded-dots"],
)
async def test_path_escapes_are_400(
    gateway: RunningGateway,
    upstream: RunningUpstream,
    client: aiohttp.ClientSession,
    seed: Seed,
    path: str,
) -> None:
    """A path that could climb out of the upstream base is 400 invalid_path, never forwarded."""
    member = await org_member(seed)
    await assert_refused(
        client,
        gateway,
        upstream,
        400,
        "invalid_path",
        path=path,
        token=member.token,
        encoded=True,
    )


# --- What the upstream sees ----------------------------------------------------------------


async def test_upstream_gets_gateway_key_not_client_credentials(
    gateway: RunningGateway, upstream: RunningUpstream, client: aiohttp.ClientSession, seed: Seed
) -> None:
    """The upstream gets the gateway's own key, and the client's token appears nowhere."""
    member = await org_member(seed)
    assert (await call(client, gateway, token=member.token)).status == 200
    recorded = upstream.recorder.last
    assert recorded.headers.getall("Authorization") == [f"Bearer {UPSTREAM_TEST_KEY}"]
    seen = "\n".join(f"{k}: {v}" for k, v in recorded.headers.items()) + recorded.body.decode()
    assert member.token not in seen
    assert hash_token(member.token) not in seen


async def test_forwarded_request_headers(
    gateway: RunningGateway, upstream: RunningUpstream, client: aiohttp.ClientSession, seed: Seed
) -> None:
    """Cookies, X-KiloCode-* and Connection-named headers stay; attribution headers pass."""
    member = await org_member(seed)
    headers = {
        "Cookie": "session=secret-cookie",
        "X-KiloCode-OrganizationId": member.org_id,
        "X-KiloCode-Version": "4.2.0",
        "Connection": "keep-alive, X-Hop-Only",
        "X-Hop-Only": "hop-value",
        "HTTP-Referer": "https://kilocode.ai",
        "X-Title": "Kilo Code",
        "User-Agent": "Kilo-Code/4.2.0",
        "X-Custom-Passes": "yes",
    }
    assert (await call(client, gateway, token=member.token, headers=headers)).status == 200
    recorded = upstream.recorder.last.headers
    for name in ("Cookie", "X-KiloCode-OrganizationId", "X-KiloCode-Version", "X-Hop-Only"):
        assert name not in recorded, name
    assert "secret-cookie" not in "".join(recorded.values())
    for name in ("HTTP-Referer", "X-Title", "User-Agent", "X-Custom-Passes"):
        assert recorded.getall(name) == [headers[name]], name


async def test_response_headers(
    gateway: RunningGateway, client: aiohttp.ClientSession, seed: Seed
) -> None:
    """Responses carry X-Accel-Buffering: no and an X-Request-Id unique to each request."""
    member = await org_member(seed)
    first = await call(client, gateway, token=member.token)
    second = await call(client, gateway, token=member.token)
    for reply in (first, second):
        assert reply.status == 200
        assert reply.headers["X-Accel-Buffering"] == "no"
        assert reply.headers.getall("X-Request-Id")[0]
        assert len(reply.headers.getall("X-Request-Id")) == 1
    assert first.headers["X-Request-Id"] != second.headers["X-Request-Id"]


@pytest.fixture
async def cookie_upstream() -> AsyncIterator[str]:
    """A real upstream whose every answer sets a cookie; yields its OpenRouter-style base URL."""

    async def answer(_request: web.Request) -> web.Response:
        response = web.json_response({"ok": True})
        response.set_cookie("or_session", "upstream-cookie-value")
        return response

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", answer)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    yield f"http://127.0.0.1:{runner.addresses[0][1]}/api/v1"
    await runner.cleanup()


async def test_upstream_set_cookie_not_relayed(
    gateway_factory: Callable[..., Any],
    cookie_upstream: str,
    client: aiohttp.ClientSession,
    seed: Seed,
) -> None:
    """A Set-Cookie from the upstream never reaches the client."""
    gateway = await gateway_factory(OPENROUTER_BASE_URL=cookie_upstream)
    member = await org_member(seed)
    reply = await call(client, gateway, token=member.token)
    assert reply.status == 200
    assert reply.json() == {"ok": True}
    assert "Set-Cookie" not in reply.headers


# --- Enforcement modes ----------------------------------------------------------------------


async def test_shadow_mode_flags_but_forwards_blocked_org(
    gateway_factory: Callable[..., Any],
    upstream: RunningUpstream,
    client: aiohttp.ClientSession,
    seed: Seed,
) -> None:
    """In shadow mode an expired org gets 200 with X-Gateway-Would-Block and reaches upstream."""
    gateway = await gateway_factory(ENFORCEMENT_MODE="shadow")
    member = await org_member(seed, age=EXPIRED_AGE)
    received_before = upstream.recorder.received
    reply = await call(client, gateway, token=member.token)
    assert reply.status == 200
    assert reply.headers["X-Gateway-Would-Block"] == "trial_expired"
    assert upstream.recorder.received == received_before + 1


async def test_shadow_mode_leaves_allowed_org_unflagged(
    gateway_factory: Callable[..., Any], client: aiohttp.ClientSession, seed: Seed
) -> None:
    """In shadow mode an allowed org gets no X-Gateway-Would-Block header."""
    gateway = await gateway_factory(ENFORCEMENT_MODE="shadow")
    member = await org_member(seed)
    reply = await call(client, gateway, token=member.token)
    assert reply.status == 200
    assert "X-Gateway-Would-Block" not in reply.headers


async def test_off_mode_skips_entitlement_only(
    gateway_factory: Callable[..., Any],
    upstream: RunningUpstream,
    client: aiohttp.ClientSession,
    seed: Seed,
) -> None:
    """With enforcement off an expired org passes unflagged; bad keys and non-members do not."""
    gateway = await gateway_factory(ENFORCEMENT_MODE="off")
    member = await org_member(seed, age=EXPIRED_AGE)
    reply = await call(client, gateway, token=member.token)
    assert reply.status == 200
    assert "X-Gateway-Would-Block" not in reply.headers
    await assert_refused(client, gateway, upstream, 401, "invalid_api_key", token="kilo_bogus")
    other = await seed.org(name="Other")
    await assert_refused(
        client,
        gateway,
        upstream,
        403,
        "not_a_member",
        token=member.token,
        headers={"X-KiloCode-OrganizationId": other},
    )


# --- the method allow-list --------------------------------------------------------------------

UNFORWARDED_METHODS = [
    "TRACE",
    "PROPFIND",
    "PURGE",
    "MKCOL",
    "LOCK",
    "SEARCH",
    "REPORT",
    "LINK",
    "QUERY",
    "PUT",
    "PATCH",
    "DELETE",
]


@pytest.mark.parametrize("method", UNFORWARDED_METHODS)
@pytest.mark.parametrize(
    ("path", "allow"),
    [
        ("/api/openrouter/chat/completions", "OPTIONS, POST"),
        ("/api/openrouter/embeddings", "OPTIONS, POST"),
        ("/api/openrouter/models", "GET, HEAD, OPTIONS"),
        ("/api/openrouter/generation", "GET, HEAD, OPTIONS"),
    ],
)
async def test_methods_a_path_does_not_take_are_405_and_never_forwarded(
    gateway: RunningGateway,
    upstream: RunningUpstream,
    client: aiohttp.ClientSession,
    seed: Seed,
    method: str,
    path: str,
    allow: str,
) -> None:
    """TRACE and friends would reach the upstream with the gateway's own key (a hop that
    echoes TRACE hands it to the caller): each is 405 with `Allow`, and nothing is sent."""
    member = await org_member(seed)
    error = await assert_refused(
        client,
        gateway,
        upstream,
        405,
        "method_not_allowed",
        path=path,
        method=method,
        token=member.token,
    )
    assert method in error["message"]
    reply = await call(client, gateway, path, method=method, token=member.token)
    assert reply.headers["Allow"] == allow


@pytest.mark.parametrize(
    "path", ["/api/openrouter/chat/completions", "/api/openrouter/completions"]
)
async def test_reads_never_reach_a_metered_path(
    gateway: RunningGateway,
    upstream: RunningUpstream,
    client: aiohttp.ClientSession,
    seed: Seed,
    path: str,
) -> None:
    """GET and HEAD skip the entitlement rule and metering, so they may not reach
    completions at all: 405, even for a blocked organization's member."""
    member = await org_member(seed, age=timedelta(days=40))
    for method in ("GET", "HEAD"):
        received = upstream.recorder.received
        reply = await call(client, gateway, path, method=method, token=member.token)
        assert reply.status == 405
        assert reply.headers["Allow"] == "OPTIONS, POST"
        assert upstream.recorder.received == received


@pytest.mark.parametrize(
    ("path", "allow"),
    [
        ("/api/openrouter/chat/completions", "OPTIONS, POST"),
        ("/api/openrouter/models", "GET, HEAD, OPTIONS"),
    ],
)
async def test_options_is_answered_by_the_gateway(
    gateway: RunningGateway,
    upstream: RunningUpstream,
    client: aiohttp.ClientSession,
    path: str,
    allow: str,
) -> None:
    """OPTIONS needs no key and goes nowhere: 204 with the path's methods."""
    received = upstream.recorder.received
    reply = await call(client, gateway, path, method="OPTIONS", body=None)
    assert reply.status == 204
    assert reply.headers["Allow"] == allow
    assert reply.headers["X-Request-Id"]
    assert upstream.recorder.received == received
