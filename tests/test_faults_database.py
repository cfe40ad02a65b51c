"""PostgreSQL failing under a running gateway: stopped outright, or too slow to answer.

The database is a server of this module's own (`tests/processes.py`) that tests crash with
`pg_ctl stop -m immediate` and start again, or slow down by holding a table lock; the
gateway is a `python -m gateway serve` subprocess; the fake OpenRouter runs in the test's
event loop. Each test gets a freshly migrated database on that server.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest

from bench.fake_upstream import RunningUpstream
from gateway.access.auth import ORGANIZATION_HEADER, hash_token
from gateway.ledger.spool import PENDING_GLOB
from gateway.ledger.writer import read_spool
from tests.factories import Seed
from tests.pages import Browser
from tests.processes import (
    GatewayProcess,
    PostgresCluster,
    migrated_database,
    poll_until,
    read_readiness,
)

pytestmark = pytest.mark.timeout(120)

CHAT_PATH = "api/openrouter/chat/completions"
COST = 420  # the fake upstream's cost_usd, 0.00042, in microdollars
EXPIRED = timedelta(days=40)
TTL_SECONDS = 1.0
# Cached facts outlive their TTL by this much when the database does not answer.
SHORT_TTL = {
    "ENTITLEMENT_CACHE_TTL_SECONDS": TTL_SECONDS,
    "NEGATIVE_CACHE_TTL_SECONDS": TTL_SECONDS,
    "STALE_IF_ERROR_SECONDS": 300,
}
# The listener's reconnect backoff tops out at 5 s; then it needs a moment to connect.
RECOVERY_DEADLINE_SECONDS = 10.0
NOTIFY_DEADLINE_SECONDS = 1.0
EXIT_DEADLINE_SECONDS = 15.0
POLL_SECONDS = 0.02


@dataclass(frozen=True)
class Reply:
    """How the gateway answered one chat completion."""

    status: int
    reason: str | None
    retry_after: str | None


@dataclass
class Site:
    """The test's database on the crashable server, the fake upstream, and gateways on both."""

    cluster: PostgresCluster
    url: str
    upstream: RunningUpstream
    client: aiohttp.ClientSession
    tmp_path: Path
    gateways: list[GatewayProcess] = field(default_factory=list)

    @contextlib.asynccontextmanager
    async def seed(self) -> AsyncIterator[Seed]:
        """Seed helpers on a connection of their own, closed on exit."""
        conn = await asyncpg.connect(self.url)
        try:
            yield Seed(conn)
        finally:
            await conn.close()

    async def execute(self, sql: str, *args: Any) -> None:
        """Run one statement on a connection of its own."""
        async with self.seed() as seed:
            await seed.conn.execute(sql, *args)

    async def fetchval(self, sql: str, *args: Any) -> Any:
        """One value from the database, on a connection of its own."""
        async with self.seed() as seed:
            return await seed.conn.fetchval(sql, *args)

    async def gateway(self, **settings: Any) -> GatewayProcess:
        """Start a gateway on this database and wait until it is ready."""
        values: dict[str, Any] = {
            "USAGE_SPOOL_DIR": self.tmp_path / "spool",
            "USAGE_FLUSH_INTERVAL_SECONDS": 0.1,
            **settings,
        }
        process = await GatewayProcess.start(
            database_url=self.url,
            upstream_url=self.upstream.url,
            log_dir=self.tmp_path,
            **values,
        )
        self.gateways.append(process)
        await process.wait_ready(self.client)
        return process

    async def chat(
        self, gateway: GatewayProcess, token: str, *, organization_id: str | None = None
    ) -> Reply:
        """One plain chat completion through `gateway`, read to the end."""
        headers = {"Authorization": f"Bearer {token}"}
        if organization_id is not None:
            headers[ORGANIZATION_HEADER] = organization_id
        body = {"model": "openai/gpt-4o-mini", "messages": []}
        async with self.client.post(gateway.url / CHAT_PATH, json=body, headers=headers) as resp:
            payload = await resp.json(content_type=None)
            reason = payload.get("error_type") if resp.status != 200 else None
            return Reply(resp.status, reason, resp.headers.get("Retry-After"))

    async def listening(self, gateway: GatewayProcess) -> bool:
        """Ready, with the change listener connected."""
        status, body = await read_readiness(self.client, gateway.url)
        return status == 200 and body.get("change_notifications") is True


@pytest.fixture(scope="module")
def cluster() -> Iterator[PostgresCluster]:
    """A PostgreSQL server for this module alone, on a loopback TCP port."""
    server = PostgresCluster.create()
    try:
        server.start_blocking()
        yield server
    finally:
        server.destroy()


@pytest.fixture
async def site(
    cluster: PostgresCluster, upstream: RunningUpstream, tmp_path: Path
) -> AsyncIterator[Site]:
    """A new migrated database on the crashable server; gateways are killed afterwards."""
    async with migrated_database(cluster, "gw_faults") as url, aiohttp.ClientSession() as client:
        site = Site(cluster, url, upstream, client, tmp_path)
        try:
            yield site
        finally:
            for gateway in site.gateways:
                await gateway.stop()


async def member_token(seed: Seed, **org: Any) -> tuple[str, str]:
    """A new organization (keywords as `Seed.org`) and a token of its owner."""
    org_id = await seed.org(**org)
    _user_id, token = await seed.member_with_key(org_id)
    return org_id, token


async def test_the_pages_say_the_database_is_away_in_words_and_lose_no_form(
    site: Site,
) -> None:
    """A page viewed or a form posted while PostgreSQL is down: a 503 page in words, no
    traceback; once it is back, the same form goes through."""
    async with site.seed() as seed:
        org_id, token = await member_token(seed)
    gateway = await site.gateway()
    browser = Browser(gateway)
    try:
        page = await browser.sign_in(token)
        assert page.url.path == f"/organizations/{org_id}"
        await site.cluster.crash()
        for answer in (
            await browser.get(f"/organizations/{org_id}"),
            await browser.submit(
                page, f"/organizations/{org_id}/invitations", {"email": "a@b.test"}
            ),
        ):
            assert answer.status == 503, answer.text
            assert answer.headers["Content-Type"].startswith("text/html")
            assert 'data-reason="database_unavailable"' in answer.text
            assert "Traceback" not in answer.text
        await site.cluster.start()
        await poll_until(
            lambda: read_readiness(site.client, gateway.url),
            lambda r: r[0] == 200,
            within_seconds=15,
        )
        invited = await browser.submit(
            page, f"/organizations/{org_id}/invitations", {"email": "a@b.test"}
        )
        assert invited.has("Invitation sent to a@b.test."), invited.text
    finally:
        await browser.close()


SLOW_QUERIES = {**SHORT_TTL, "DATABASE_QUERY_TIMEOUT_SECONDS": 0.5}
# Gateway queries waiting behind the lock the test holds.
WAITING_ON_LOCK_SQL = """
SELECT count(*) FROM pg_stat_activity
WHERE datname = current_database() AND pid <> pg_backend_pid() AND wait_event_type = 'Lock'
"""


@contextlib.asynccontextmanager
async def purchases_locked(url: str) -> AsyncIterator[None]:
    """Hold an ACCESS EXCLUSIVE lock on the purchases table: every facts query blocks."""
    conn = await asyncpg.connect(url)
    try:
        transaction = conn.transaction()
        await transaction.start()
        await conn.execute("LOCK TABLE organization_seats_purchases IN ACCESS EXCLUSIVE MODE")
        try:
            yield
        finally:
            await transaction.rollback()
    finally:
        await conn.close()


# --- PostgreSQL stops ---------------------------------------------------------------------


async def test_cached_orgs_keep_their_verdicts_and_trial_clock_while_the_database_is_down(
    site: Site,
) -> None:
    """With PostgreSQL down past the TTL, cached orgs keep 200/402 and trials still end on time."""
    async with site.seed() as seed:
        _allowed_org, allowed = await member_token(seed)
        _blocked_org, blocked = await member_token(seed, age=EXPIRED)
        ending_org, ending = await member_token(seed)
    # No charge batch (whose notification could race the first reads, see
    # test_org_first_served_while_another_org_changed_...) until the test is over.
    gateway = await site.gateway(**SHORT_TTL, USAGE_FLUSH_INTERVAL_SECONDS=60)
    # Far enough ahead to cover the crash and a wait past the TTL, near enough to wait for.
    trial_ends_at: float = (
        await site.fetchval(
            "UPDATE organizations SET free_trial_end_at = now() + interval '5 seconds'"
            " WHERE id = $1::uuid RETURNING free_trial_end_at",
            ending_org,
        )
    ).timestamp()
    # Twice: the first reads may overlap the notification of the update above.
    for _ in range(2):
        assert await site.chat(gateway, allowed) == Reply(200, None, None)
        assert await site.chat(gateway, blocked) == Reply(402, "trial_expired", None)
        assert await site.chat(gateway, ending) == Reply(200, None, None)

    await site.cluster.crash()
    await poll_until(
        lambda: read_readiness(site.client, gateway.url), lambda r: r[0] == 503, within_seconds=5
    )
    past_ttl = time.monotonic() + 2 * TTL_SECONDS
    while time.monotonic() < past_ttl:
        assert await site.chat(gateway, allowed) == Reply(200, None, None)
        assert await site.chat(gateway, blocked) == Reply(402, "trial_expired", None)
        await asyncio.sleep(POLL_SECONDS)
    assert time.time() < trial_ends_at, "the setup took too long to see the trial end"
    assert await site.chat(gateway, ending) == Reply(200, None, None)

    refused = await poll_until(
        lambda: site.chat(gateway, ending), lambda r: r.status != 200, within_seconds=6
    )
    flipped_at = time.time()
    assert refused == Reply(402, "trial_expired", None)
    assert trial_ends_at <= flipped_at < trial_ends_at + 0.5
    assert await site.chat(gateway, allowed) == Reply(200, None, None)


async def test_uncached_callers_get_503_never_401_or_402_while_the_database_is_down(
    site: Site,
) -> None:
    """Unknown keys and uncached orgs get 503 database_unavailable with Retry-After; readyz 503."""
    async with site.seed() as seed:
        _org, cached = await member_token(seed)
        _other_org, never_presented = await member_token(seed)
        stranger_org = await seed.org()
    gateway = await site.gateway(**SHORT_TTL)
    assert await site.chat(gateway, cached) == Reply(200, None, None)
    assert (await site.chat(gateway, "kilo_unknown_before_the_outage")).status == 401

    await site.cluster.crash()
    _status, body = await poll_until(
        lambda: read_readiness(site.client, gateway.url), lambda r: r[0] == 503, within_seconds=5
    )
    assert body["status"] == "unavailable"
    replies = [
        *[await site.chat(gateway, "kilo_unknown_before_the_outage") for _ in range(3)],
        *[await site.chat(gateway, f"kilo_never_seen_{i}") for i in range(3)],
        await site.chat(gateway, never_presented),
        # A cached key asking for an organization whose membership was never read.
        await site.chat(gateway, cached, organization_id=stranger_org),
        await site.chat(gateway, cached, organization_id=str(uuid.uuid4())),
    ]
    for reply in replies:
        assert reply.status == 503, replies
        assert reply.reason == "database_unavailable", replies
        assert reply.retry_after is not None and int(reply.retry_after) > 0, replies
    assert await site.chat(gateway, cached) == Reply(200, None, None)
    assert (await read_readiness(site.client, gateway.url))[0] == 503


async def test_org_first_served_while_another_org_changed_is_still_served_in_an_outage(
    site: Site,
) -> None:
    """Facts read while another org's facts changed are still cached when the database stops."""
    async with site.seed() as seed:
        _org, token = await member_token(seed)
        other_org, other = await member_token(seed)
        _bystander_org, bystander = await member_token(seed)
    gateway = await site.gateway(**SHORT_TTL)
    assert await site.chat(gateway, bystander) == Reply(200, None, None)
    async with purchases_locked(site.url):
        # The org's first request waits in its facts query...
        first = asyncio.create_task(site.chat(gateway, token))
        await poll_until(
            lambda: site.fetchval(WAITING_ON_LOCK_SQL), lambda n: n == 1, within_seconds=3
        )
        # ...while another org changes (as every charge batch changes its org), and a key
        # is revoked in the same transaction: its 401 shows both notifications were applied.
        async with site.seed() as seed, seed.conn.transaction():
            await seed.conn.execute(
                "UPDATE organizations SET name = 'Renamed' WHERE id = $1::uuid", other_org
            )
            await seed.conn.execute(
                "UPDATE api_keys SET revoked_at = now() WHERE key_hash = $1", hash_token(bystander)
            )
        await poll_until(
            lambda: site.chat(gateway, bystander), lambda r: r.status == 401, within_seconds=3
        )
    assert await first == Reply(200, None, None)
    assert await site.chat(gateway, other) == Reply(200, None, None)

    await site.cluster.crash()
    await poll_until(
        lambda: read_readiness(site.client, gateway.url), lambda r: r[0] == 503, within_seconds=5
    )
    assert await site.chat(gateway, other) == Reply(200, None, None)
    assert await site.chat(gateway, token) == Reply(200, None, None)


async def test_gateway_recovers_by_itself_after_an_outage_and_charges_every_request_once(
    site: Site,
) -> None:
    """After PostgreSQL restarts: ready and listening again, purchases seen in 1 s, charged once."""
    async with site.seed() as seed:
        _allowed_org, allowed = await member_token(seed)
        blocked_org, blocked = await member_token(seed, age=EXPIRED)
    gateway = await site.gateway(**SHORT_TTL)
    replies = [await site.chat(gateway, allowed) for _ in range(3)]
    assert await site.chat(gateway, blocked) == Reply(402, "trial_expired", None)

    await site.cluster.crash()
    try:
        past_ttl = time.monotonic() + 2 * TTL_SECONDS
        while time.monotonic() < past_ttl:
            replies.append(await site.chat(gateway, allowed))
            await asyncio.sleep(POLL_SECONDS)
        assert (await read_readiness(site.client, gateway.url))[0] == 503
    finally:
        await site.cluster.start()
    await poll_until(
        lambda: site.listening(gateway), bool, within_seconds=RECOVERY_DEADLINE_SECONDS
    )

    async with site.seed() as seed:
        await seed.purchase(blocked_org, seat_count=5)
    bought = time.monotonic()
    replies.append(
        await poll_until(
            lambda: site.chat(gateway, blocked),
            lambda r: r.status == 200,
            within_seconds=NOTIFY_DEADLINE_SECONDS,
        )
    )
    assert time.monotonic() - bought < NOTIFY_DEADLINE_SECONDS
    replies += [await site.chat(gateway, token) for token in (allowed, blocked) * 3]

    statuses = [r.status for r in replies]
    assert set(statuses) == {200}, replies
    served = len(replies)

    async def ledger() -> tuple[int, int, int]:
        row = await site.fetchval(
            "SELECT (count(*), count(*) FILTER (WHERE status = 200),"
            " coalesce(sum(cost_microdollars), 0)) FROM llm_usage"
        )
        return int(row[0]), int(row[1]), int(row[2])

    await poll_until(ledger, lambda got: got == (served, served, served * COST), within_seconds=10)
    gateway.send(signal.SIGTERM)
    assert await gateway.wait(EXIT_DEADLINE_SECONDS) == 0, gateway.log()[-3000:]
    assert await ledger() == (served, served, served * COST)
    used = await site.fetchval("SELECT sum(credits_used_microdollars) FROM organizations")
    assert used == served * COST


async def test_stale_facts_are_served_for_stale_if_error_seconds_and_no_longer(
    site: Site,
) -> None:
    """Cached facts serve STALE_IF_ERROR_SECONDS past the TTL of an outage; then 503."""
    stale_seconds = 1.5
    async with site.seed() as seed:
        _org, token = await member_token(seed)
    gateway = await site.gateway(**{**SHORT_TTL, "STALE_IF_ERROR_SECONDS": stale_seconds})
    # Everything is cached during this request: no sooner than its start, no later than its end.
    loading_started = time.monotonic()
    assert await site.chat(gateway, token) == Reply(200, None, None)
    loaded = time.monotonic()
    await site.cluster.crash()
    seen: list[tuple[float, float, int]] = []  # (sent, answered) after loading_started, status
    until = loaded + TTL_SECONDS + stale_seconds + 1.5
    while time.monotonic() < until:
        sent = time.monotonic()
        reply = await site.chat(gateway, token)
        seen.append((sent - loading_started, time.monotonic() - loading_started, reply.status))
        await asyncio.sleep(POLL_SECONDS)
    loading = loaded - loading_started
    # Past the TTL, inside the stale window: the cached verdict.
    stale = [
        status
        for sent, answered, status in seen
        if sent > loading + TTL_SECONDS + 0.1 and answered < TTL_SECONDS + stale_seconds - 0.1
    ]
    assert stale and set(stale) == {200}, seen
    # Past both: nothing cached is trusted any more.
    expired = [s for sent, _, s in seen if sent > loading + TTL_SECONDS + stale_seconds + 0.1]
    assert expired and set(expired) == {503}, seen


async def test_sigterm_during_an_outage_exits_0_and_the_next_start_writes_its_charges_once(
    site: Site,
) -> None:
    """SIGTERM while PostgreSQL is down: exit 0 in the drain time; the next start charges all."""
    async with site.seed() as seed:
        _org, token = await member_token(seed)
    gateway = await site.gateway(**SHORT_TTL, SHUTDOWN_TIMEOUT_SECONDS=2)
    before = [await site.chat(gateway, token) for _ in range(3)]

    async def charged() -> tuple[int, int]:
        row = await site.fetchval(
            "SELECT (count(*), coalesce(sum(cost_microdollars), 0)) FROM llm_usage"
        )
        return int(row[0]), int(row[1])

    await poll_until(charged, lambda got: got == (3, 3 * COST), within_seconds=5)
    await site.cluster.crash()
    try:
        during = [await site.chat(gateway, token) for _ in range(5)]
        gateway.send(signal.SIGTERM)
        signalled = time.monotonic()
        assert await gateway.wait(EXIT_DEADLINE_SECONDS) == 0, gateway.log()[-3000:]
        assert time.monotonic() - signalled < 2 + 3, "shutdown waited on the dead database"
        spooled = [
            c.request_id
            for path in (site.tmp_path / "spool").glob(PENDING_GLOB)
            for c in read_spool(path)
        ]
        assert len(spooled) == 5, spooled
    finally:
        await site.cluster.start()
    assert {r.status for r in before + during} == {200}
    await site.gateway(**SHORT_TTL)
    await poll_until(charged, lambda got: got == (8, 8 * COST), within_seconds=10)
    used = await site.fetchval("SELECT sum(credits_used_microdollars) FROM organizations")
    assert used == 8 * COST


# --- PostgreSQL slow ----------------------------------------------------------------------


async def test_slow_database_answers_cold_requests_503_within_the_query_timeout(
    site: Site,
) -> None:
    """Facts queries blocked in PostgreSQL time out: a cold request gets 503 in ~1 s, not a hang."""
    async with site.seed() as seed:
        _org, token = await member_token(seed)
    gateway = await site.gateway(**SLOW_QUERIES)
    async with purchases_locked(site.url):
        started = time.monotonic()
        async with asyncio.timeout(5):
            reply = await site.chat(gateway, token)
        took = time.monotonic() - started
        assert reply.status == 503 and reply.reason == "database_unavailable", reply
        assert reply.retry_after is not None
        assert 0.4 < took < 1.2, took
        # The timed-out query was cancelled in PostgreSQL too, not left waiting there.
        await poll_until(
            lambda: site.fetchval(WAITING_ON_LOCK_SQL), lambda n: n == 0, within_seconds=1
        )
    reply = await poll_until(
        lambda: site.chat(gateway, token), lambda r: r.status == 200, within_seconds=3
    )
    assert reply == Reply(200, None, None)


async def test_slow_database_sheds_requests_past_the_pending_query_cap_at_once(
    site: Site,
) -> None:
    """With 2 queries allowed to wait, 40 cold orgs at once: 38+ get 503 at once, none hang."""
    cap, orgs = 2, 40
    async with site.seed() as seed:
        tokens = [(await member_token(seed))[1] for _ in range(orgs)]
    gateway = await site.gateway(**SLOW_QUERIES, DATABASE_MAX_PENDING_QUERIES=cap)
    async with purchases_locked(site.url):
        waiting_seen: list[int] = []
        burst_over = asyncio.Event()

        async def watch_waiting() -> None:
            while not burst_over.is_set():
                waiting_seen.append(int(await site.fetchval(WAITING_ON_LOCK_SQL)))
                await asyncio.sleep(0.01)

        async def timed(token: str) -> tuple[float, Reply]:
            started = time.monotonic()
            reply = await site.chat(gateway, token)
            return time.monotonic() - started, reply

        watcher = asyncio.create_task(watch_waiting())
        try:
            async with asyncio.timeout(3):
                results = await asyncio.gather(*(timed(token) for token in tokens))
        finally:
            burst_over.set()
            await watcher
    for _took, reply in results:
        assert reply.status == 503 and reply.reason == "database_unavailable", reply
        assert reply.retry_after is not None
    durations = sorted(took for took, _reply in results)
    at_once = sum(took < 0.25 for took in durations)
    assert at_once >= orgs - cap, durations
    assert durations[-1] < 1.2, durations
    assert max(waiting_seen) <= cap, waiting_seen
