"""Changes in PostgreSQL reach a running gateway through NOTIFY within a second.

Every gateway here caches for an hour (`ENTITLEMENT_CACHE_TTL_SECONDS=3600`, and the same
for unknown tokens), so only a notification, or the cache clear that follows a lost
LISTEN connection, can explain a change taking effect.
"""

from __future__ import annotations

import asyncio
import dataclasses
import io
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import timedelta
from typing import Any

import aiohttp
import asyncpg
import pytest
from prometheus_client.parser import text_string_to_metric_families

from bench.fake_upstream import RunningUpstream
from gateway.access.auth import ORGANIZATION_HEADER, hash_token
from gateway.access.listener import APPLICATION_NAME, LISTENER
from tests.conftest import RunningGateway
from tests.factories import Seed

CHAT = {"model": "m"}
CACHE_FOR_AN_HOUR = {"ENTITLEMENT_CACHE_TTL_SECONDS": 3600, "NEGATIVE_CACHE_TTL_SECONDS": 3600}
# The contract: a change takes effect on every gateway process within one second.
NOTIFY_DEADLINE_SECONDS = 1.0
STARTUP_DEADLINE_SECONDS = 10.0
POLL_INTERVAL_SECONDS = 0.01
EXPIRED = timedelta(days=40)

# The gateway's LISTEN connection: it ran `LISTEN "gateway_changes"` and then only pings.
# Pooled connections end every use with asyncpg's reset script, so they never match.
LISTENER_PIDS_SQL = f"""
SELECT pid FROM pg_stat_activity
WHERE datname = current_database() AND application_name = '{APPLICATION_NAME}'
"""
FACTS_QUERIES_WAITING_SQL = """
SELECT count(*) FROM pg_stat_activity
WHERE datname = current_database() AND pid <> pg_backend_pid()
  AND wait_event_type = 'Lock' AND query LIKE '%FROM organization_seats_purchases%'
"""


@dataclasses.dataclass(frozen=True)
class Outcome:
    """What the gateway answered a chat completion: status and refusal reason."""

    status: int
    reason: str | None = None


OK = Outcome(200, None)


async def chat(
    client: aiohttp.ClientSession, gateway: RunningGateway, token: str, org: str | None
) -> Outcome:
    """POST a chat completion as the extension would; return the status and reason."""
    headers = {"Authorization": f"Bearer {token}"}
    if org is not None:
        headers[ORGANIZATION_HEADER] = org
    async with client.post(
        gateway.url / "api/openrouter/chat/completions", json=CHAT, headers=headers
    ) as response:
        body = await response.read()
    reason = None
    if response.status != 200:
        reason = json.loads(body)["error_type"]
    return Outcome(response.status, reason)


async def eventually(
    probe: Callable[[], Awaitable[Any]],
    expected: Any,
    within_seconds: float,
) -> float:
    """Poll `probe` until it returns `expected`; return how long that took, or fail."""
    started = time.monotonic()
    deadline = started + within_seconds
    while True:
        got = await probe()
        elapsed = time.monotonic() - started
        if got == expected:
            return elapsed
        assert elapsed < within_seconds, f"still {got!r}, not {expected!r}, after {elapsed:.3f}s"
        await asyncio.sleep(min(POLL_INTERVAL_SECONDS, max(0.0, deadline - time.monotonic())))


class Scenario:
    """A listening gateway, a client and a database connection, with the probes tests use."""

    def __init__(
        self, gateway: RunningGateway, client: aiohttp.ClientSession, db: asyncpg.Connection
    ) -> None:
        self.gateway = gateway
        self.client = client
        self.db = db

    async def chat(self, token: str, org: str | None) -> Outcome:
        return await chat(self.client, self.gateway, token, org)

    async def becomes(self, token: str, org: str | None, expected: Outcome) -> float:
        """Assert the gateway's answer turns into `expected` within the one-second contract."""
        return await eventually(
            lambda: self.chat(token, org), expected, within_seconds=NOTIFY_DEADLINE_SECONDS
        )

    async def listening(self) -> bool:
        """Whether /readyz says the change listener is connected."""
        async with self.client.get(self.gateway.url / "readyz") as response:
            body = await response.json()
        return response.status == 200 and body.get("change_notifications") is True

    async def listener_pids(self) -> list[int]:
        return [r["pid"] for r in await self.db.fetch(LISTENER_PIDS_SQL)]

    async def cache_misses(self) -> float:
        """The gateway's entitlement cache miss count, read from /metrics."""
        async with self.client.get(self.gateway.url / "metrics") as response:
            text = await response.text()
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if (
                    sample.name == "gateway_entitlement_cache_total"
                    and sample.labels.get("result") == "miss"
                ):
                    return sample.value
        return 0.0


@pytest.fixture
async def scenario(
    gateway_factory: Callable[..., Awaitable[RunningGateway]],
    client: aiohttp.ClientSession,
    db: asyncpg.Connection,
) -> Scenario:
    """A gateway caching for an hour whose change listener is connected."""
    gateway = await gateway_factory(**CACHE_FOR_AN_HOUR)
    ready = Scenario(gateway, client, db)
    await eventually(ready.listening, True, within_seconds=STARTUP_DEADLINE_SECONDS)
    return ready


async def expired_org_with_member(seed: Seed, **purchase: Any) -> tuple[str, str]:
    """An org past its trial with one owner; with `purchase` keywords, also a purchase."""
    org = await seed.org(age=EXPIRED)
    _user, token = await seed.member_with_key(org)
    if purchase:
        await seed.purchase(org, **purchase)
    return org, token


async def end_subscription_silently(db: asyncpg.Connection, org: str) -> None:
    """End the org's purchases with the NOTIFY trigger off, as a missed notification would."""
    async with db.transaction():
        await db.execute(
            "ALTER TABLE organization_seats_purchases"
            " DISABLE TRIGGER organization_seats_purchases_notify"
        )
        await db.execute(
            "UPDATE organization_seats_purchases SET subscription_status = 'ended'"
            " WHERE organization_id = $1::uuid",
            org,
        )
        await db.execute(
            "ALTER TABLE organization_seats_purchases"
            " ENABLE TRIGGER organization_seats_purchases_notify"
        )


# --- each kind of change --------------------------------------------------------------------


async def test_new_purchase_unblocks_an_expired_org(scenario: Scenario, seed: Seed) -> None:
    """An expired org refused with 402 is let through within 1 s of buying seats."""
    org, token = await expired_org_with_member(seed)
    assert await scenario.chat(token, org) == Outcome(402, "trial_expired")
    assert await scenario.chat(token, org) == Outcome(402, "trial_expired")  # cached

    await seed.purchase(org)

    await scenario.becomes(token, org, OK)


async def test_ended_subscription_blocks_within_a_second(scenario: Scenario, seed: Seed) -> None:
    """Ending an active purchase refuses the org with 402 subscription_inactive within 1 s."""
    org, token = await expired_org_with_member(seed, seat_count=5)
    assert await scenario.chat(token, org) == OK

    await scenario.db.execute(
        "UPDATE organization_seats_purchases SET subscription_status = 'ended'"
        " WHERE organization_id = $1::uuid",
        org,
    )

    await scenario.becomes(token, org, Outcome(402, "subscription_inactive"))


async def test_revoked_key_is_refused_within_a_second(scenario: Scenario, seed: Seed) -> None:
    """Revoking a key in use makes it 401 within 1 s."""
    org = await seed.org()
    _user, token = await seed.member_with_key(org)
    assert await scenario.chat(token, org) == OK

    await scenario.db.execute(
        "UPDATE api_keys SET revoked_at = now() WHERE key_hash = $1", hash_token(token)
    )

    await scenario.becomes(token, org, Outcome(401, "invalid_api_key"))


async def test_removed_member_is_refused_within_a_second(scenario: Scenario, seed: Seed) -> None:
    """Deleting a membership makes the former member's requests 403 within 1 s."""
    org = await seed.org()
    user, token = await seed.member_with_key(org)
    assert await scenario.chat(token, org) == OK

    await scenario.db.execute(
        "DELETE FROM organization_memberships WHERE organization_id = $1::uuid AND user_id = $2",
        org,
        user,
    )

    await scenario.becomes(token, org, Outcome(403, "not_a_member"))


async def test_member_turned_billing_manager_is_refused(scenario: Scenario, seed: Seed) -> None:
    """A member whose role becomes billing_manager is refused with 403 within 1 s."""
    org = await seed.org()
    user, token = await seed.member_with_key(org, role="member")
    assert await scenario.chat(token, org) == OK

    await scenario.db.execute(
        "UPDATE organization_memberships SET role = 'billing_manager'"
        " WHERE organization_id = $1::uuid AND user_id = $2",
        org,
        user,
    )

    await scenario.becomes(token, org, Outcome(403, "not_a_member"))


async def test_member_beyond_the_seat_count_blocks(scenario: Scenario, seed: Seed) -> None:
    """A second member on a one-seat purchase makes the org 402 seats_exceeded within 1 s."""
    org, token = await expired_org_with_member(seed, seat_count=1)
    assert await scenario.chat(token, org) == OK

    await seed.member(org, await seed.user())

    await scenario.becomes(token, org, Outcome(402, "seats_exceeded"))


async def test_extended_trial_unblocks_within_a_second(scenario: Scenario, seed: Seed) -> None:
    """Moving an expired org's free_trial_end_at 10 days ahead lets it through within 1 s."""
    org, token = await expired_org_with_member(seed)
    assert await scenario.chat(token, org) == Outcome(402, "trial_expired")

    await scenario.db.execute(
        "UPDATE organizations SET free_trial_end_at = now() + interval '10 days'"
        " WHERE id = $1::uuid",
        org,
    )

    await scenario.becomes(token, org, OK)


async def test_new_key_works_right_after_its_token_was_unknown(
    scenario: Scenario, seed: Seed
) -> None:
    """A token refused as unknown works within 1 s of its key being created."""
    # The unknown token is negatively cached (for an hour here); the api_keys
    # notification must clear that.
    org = await seed.org()
    user, _token = await seed.member_with_key(org)
    token = "kilo_brand_new_token_" + org
    assert await scenario.chat(token, org) == Outcome(401, "invalid_api_key")
    assert await scenario.chat(token, org) == Outcome(401, "invalid_api_key")  # cached

    await scenario.db.execute(
        "INSERT INTO api_keys (user_id, key_hash) VALUES ($1, $2)", user, hash_token(token)
    )

    await scenario.becomes(token, org, OK)


async def test_unrelated_change_keeps_other_orgs_cached(scenario: Scenario, seed: Seed) -> None:
    """A change to one org leaves another org's cached facts alone (the TTL still holds)."""
    org, token = await expired_org_with_member(seed, seat_count=5)
    other_org, other_token = await expired_org_with_member(seed, seat_count=5)
    assert await scenario.chat(token, org) == OK
    assert await scenario.chat(other_token, other_org) == OK
    # Ended without a notification: only a cache miss could reveal it.
    await end_subscription_silently(scenario.db, other_org)

    await scenario.db.execute(
        "UPDATE organization_seats_purchases SET subscription_status = 'ended'"
        " WHERE organization_id = $1::uuid",
        org,
    )

    await scenario.becomes(token, org, Outcome(402, "subscription_inactive"))
    assert await scenario.chat(other_token, other_org) == OK


# --- losing the LISTEN connection -----------------------------------------------------------


async def test_listener_reconnects_and_clears_the_caches(scenario: Scenario, seed: Seed) -> None:
    """A killed LISTEN connection comes back, re-reads what it cached, and applies changes."""
    # The purchase is ended without a notification first, so only the cache clear on
    # reconnect can make that change show; a change made while disconnected would race
    # the reconnect (its backoff starts at 0.1 s) and prove nothing reliably.
    org, token = await expired_org_with_member(seed, seat_count=5)
    assert await scenario.chat(token, org) == OK
    await end_subscription_silently(scenario.db, org)
    assert await scenario.chat(token, org) == OK, "the missed change must still be cached"

    [old_pid] = await scenario.listener_pids()
    assert await scenario.db.fetchval("SELECT pg_terminate_backend($1)", old_pid)

    async def reconnected() -> bool:
        pids = await scenario.listener_pids()
        return len(pids) == 1 and pids[0] != old_pid and await scenario.listening()

    await eventually(reconnected, True, within_seconds=STARTUP_DEADLINE_SECONDS)
    # Billing facts are re-read behind the first request after the reconnect.
    await scenario.becomes(token, org, Outcome(402, "subscription_inactive"))

    await seed.purchase(org, seat_count=5)

    await scenario.becomes(token, org, OK)


async def test_malformed_notification_clears_everything(scenario: Scenario, seed: Seed) -> None:
    """A payload the gateway cannot read clears all caches rather than being ignored."""
    org, token = await expired_org_with_member(seed, seat_count=5)
    assert await scenario.chat(token, org) == OK
    await end_subscription_silently(scenario.db, org)
    assert await scenario.chat(token, org) == OK

    await scenario.db.execute("SELECT pg_notify('gateway_changes', 'not json')")

    await scenario.becomes(token, org, Outcome(402, "subscription_inactive"))


# --- concurrent misses ----------------------------------------------------------------------


class LockedPurchases:
    """Holds organization_seats_purchases locked so every facts query waits on it."""

    def __init__(self, db: asyncpg.Connection) -> None:
        self.db = db
        self.transaction = db.transaction()

    async def __aenter__(self) -> LockedPurchases:
        await self.transaction.start()
        await self.db.execute("LOCK TABLE organization_seats_purchases IN ACCESS EXCLUSIVE MODE")
        return self

    async def __aexit__(self, *_exc: object) -> None:
        await self.transaction.rollback()


@pytest.fixture
async def locker(db_url: str) -> AsyncIterator[asyncpg.Connection]:
    """A second connection, to hold a lock while the first one inspects."""
    conn = await asyncpg.connect(db_url)
    yield conn
    await conn.close()


async def test_concurrent_misses_for_one_org_make_one_query(
    scenario: Scenario, seed: Seed, locker: asyncpg.Connection
) -> None:
    """20 concurrent first requests for one org run one facts query between them."""
    # The purchases table is locked so the facts query waits where pg_stat_activity shows
    # it (pg_stat_statements is not available on the embedded server).
    org = await seed.org()
    _user, token = await seed.member_with_key(org)
    misses_before = await scenario.cache_misses()

    requests: list[asyncio.Task[Outcome]] = []
    try:
        async with LockedPurchases(locker):
            requests = [asyncio.create_task(scenario.chat(token, org)) for _ in range(20)]
            await eventually(scenario.cache_misses, misses_before + 20, STARTUP_DEADLINE_SECONDS)
            assert await locked_facts_queries(scenario) == 1
    finally:
        # The lock is released by now, so every request can finish.
        outcomes = await asyncio.gather(*requests, return_exceptions=True)

    assert outcomes == [OK] * 20
    assert await scenario.cache_misses() == misses_before + 20


async def locked_facts_queries(scenario: Scenario) -> int:
    count: int = await scenario.db.fetchval(FACTS_QUERIES_WAITING_SQL)
    return count


async def test_client_disconnect_does_not_fail_requests_sharing_its_load(
    scenario: Scenario, seed: Seed, locker: asyncpg.Connection, log_stream: io.StringIO
) -> None:
    """A client hanging up during a shared facts load does not fail the requests sharing it."""
    # Request A starts the org's facts load, B and C join it, then A's client disconnects
    # (which cancels A's handler). B and C must still be answered 200.
    org = await seed.org()
    _user, token = await seed.member_with_key(org)
    misses_before = await scenario.cache_misses()

    first = asyncio.create_task(scenario.chat(token, org))
    others: list[asyncio.Task[Outcome]] = []
    try:
        async with LockedPurchases(locker):
            await eventually(lambda: locked_facts_queries(scenario), 1, STARTUP_DEADLINE_SECONDS)
            others = [asyncio.create_task(scenario.chat(token, org)) for _ in range(2)]
            await eventually(scenario.cache_misses, misses_before + 3, STARTUP_DEADLINE_SECONDS)
            first.cancel()
            # The gateway logs A's line once it has seen the disconnect and cancelled A.
            await eventually(
                lambda: chat_request_logged(log_stream), True, STARTUP_DEADLINE_SECONDS
            )
    finally:
        first.cancel()
        outcomes = await asyncio.gather(first, *others, return_exceptions=True)

    assert first.cancelled()
    assert outcomes[1:] == [OK, OK], outcomes[1:]


async def chat_request_logged(log_stream: io.StringIO) -> bool:
    """Whether the gateway has written the request line of any chat completion yet."""
    for line in log_stream.getvalue().splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if entry.get("event") == "request" and entry.get("route", "").endswith("/chat/completions"):
            return True
    return False


# --- the very next request ------------------------------------------------------------------


async def notified(gateways: list[RunningGateway], change: Awaitable[Any]) -> None:
    """Make `change`, then wait until every gateway's listener has applied a notification
    sent after it (and nothing more: the request that follows is not delayed)."""
    before = [g.app[LISTENER].received for g in gateways]
    await change
    deadline = time.monotonic() + NOTIFY_DEADLINE_SECONDS
    while any(g.app[LISTENER].received <= n for g, n in zip(gateways, before, strict=True)):
        assert time.monotonic() < deadline, "a gateway never received the notification"
        await asyncio.sleep(0)  # yield to the listeners; no fixed sleep


async def test_every_change_that_turns_a_verdict_judges_the_very_next_request(
    gateway_factory: Callable[..., Awaitable[RunningGateway]],
    client: aiohttp.ClientSession,
    db: asyncpg.Connection,
    seed: Seed,
    upstream: RunningUpstream,
) -> None:
    """In every process, the first request after a notification has arrived is judged on
    the changed row, never on the facts cached before it: a purchase admits it, a trial
    ended by an update refuses it, and so on, change after change."""
    # Free completions: no charge batch, so the only notifications are the test's own.
    upstream.settings.cost_usd = 0.0
    gateways = [await gateway_factory(**CACHE_FOR_AN_HOUR) for _ in range(2)]
    for gateway in gateways:
        probe = Scenario(gateway, client, db)
        await eventually(probe.listening, True, within_seconds=STARTUP_DEADLINE_SECONDS)
    org, token = await expired_org_with_member(seed)
    newcomer = await seed.user()

    def org_update(assignment: str) -> Awaitable[Any]:
        return db.execute(f"UPDATE organizations SET {assignment} WHERE id = $1::uuid", org)

    def purchases_update(assignment: str) -> Awaitable[Any]:
        return db.execute(
            f"UPDATE organization_seats_purchases SET {assignment}"
            " WHERE organization_id = $1::uuid",
            org,
        )

    steps: list[tuple[str, Callable[[], Awaitable[Any]], Outcome]] = [
        ("a purchase", lambda: seed.purchase(org, seat_count=1), OK),
        (
            "its end",
            lambda: purchases_update("subscription_status = 'ended'"),
            Outcome(402, "subscription_inactive"),
        ),
        ("exempt from seats", lambda: org_update("require_seats = false"), OK),
        (
            "no longer exempt",
            lambda: org_update("require_seats = true"),
            Outcome(402, "subscription_inactive"),
        ),
        (
            "a trial extended",
            lambda: org_update("free_trial_end_at = now() + interval '9 days'"),
            OK,
        ),
        (
            "the trial ended by an update",
            lambda: org_update("free_trial_end_at = now()"),
            Outcome(402, "subscription_inactive"),
        ),
        ("a purchase again", lambda: seed.purchase(org, seat_count=1), OK),
        (
            "a second member on one seat",
            lambda: seed.member(org, newcomer),
            Outcome(402, "seats_exceeded"),
        ),
        (
            "the member removed",
            lambda: db.execute("DELETE FROM organization_memberships WHERE user_id = $1", newcomer),
            OK,
        ),
        ("another plan", lambda: org_update("plan = 'enterprise'"), OK),
        (
            "the purchase expired",
            lambda: purchases_update("expires_at = now()"),
            Outcome(402, "subscription_inactive"),
        ),
    ]
    for gateway in gateways:
        assert await chat(client, gateway, token, org) == Outcome(402, "trial_expired")
    for name, change, expected in steps:
        await notified(gateways, change())
        for gateway in gateways:
            assert await chat(client, gateway, token, org) == expected, name
            # The answer is cached now: the next change must beat a warm cache.
            assert await chat(client, gateway, token, org) == expected, name
