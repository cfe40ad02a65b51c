"""Three gateway processes on one database: every change reaches all of them, outage or not.

The replicas are `python -m gateway serve` subprocesses caching for an hour, so only a
notification (or the revalidation that follows a lost LISTEN connection) can make a
change show. The database is a server of this module's own that a test crashes with
`pg_ctl stop -m immediate` and starts again.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest

from bench.fake_upstream import RunningUpstream
from gateway.access.auth import ORGANIZATION_HEADER, hash_token
from tests.factories import Seed
from tests.processes import (
    GatewayProcess,
    PostgresCluster,
    migrated_database,
    poll_until,
    read_readiness,
)

pytestmark = pytest.mark.timeout(120)

REPLICAS = 3
CHAT_PATH = "api/openrouter/chat/completions"
CACHE_FOR_AN_HOUR = {"ENTITLEMENT_CACHE_TTL_SECONDS": 3600, "NEGATIVE_CACHE_TTL_SECONDS": 3600}
EXPIRED = timedelta(days=40)
# The contract: a change takes effect on every replica within one second.
NOTIFY_DEADLINE_SECONDS = 1.0
# After a restart the listener's backoff (at most 5 s) decides when a replica hears again.
RECOVERY_DEADLINE_SECONDS = 10.0
# The listeners retry 0.1, 0.3, 0.7, 1.5, 3.1, 6.3 and 11.3 s after the crash (backoff
# doubling up to 5 s): a restart at ~7.5 s leaves them deaf for ~4 s after it, so the
# changes made right after the restart are certainly made while they do not listen.
OUTAGE_SECONDS = 7.5
POLL_SECONDS = 0.02

OK = (200, None)
PAYMENT_REQUIRED = (402, "trial_expired")
INVALID_KEY = (401, "invalid_api_key")
NOT_A_MEMBER = (403, "not_a_member")


@dataclass(frozen=True)
class Member:
    """A token of a member of an organization."""

    organization_id: str
    user_id: str
    token: str


@dataclass
class Replicas:
    """Three gateways on the test's database, and a client for them."""

    cluster: PostgresCluster
    url: str
    client: aiohttp.ClientSession
    gateways: list[GatewayProcess]

    @contextlib.asynccontextmanager
    async def seed(self) -> AsyncIterator[Seed]:
        """Seed helpers on a connection of their own, closed on exit."""
        conn = await asyncpg.connect(self.url)
        try:
            yield Seed(conn)
        finally:
            await conn.close()

    async def member(self, **org: Any) -> Member:
        """A new organization (keywords as `Seed.org`) and its owner's token."""
        async with self.seed() as seed:
            org_id = await seed.org(**org)
            user_id, token = await seed.member_with_key(org_id)
        return Member(org_id, user_id, token)

    async def chat(self, gateway: GatewayProcess, member: Member) -> tuple[int, str | None]:
        """A chat completion for the member's organization: status and error_type."""
        headers = {
            "Authorization": f"Bearer {member.token}",
            ORGANIZATION_HEADER: member.organization_id,
        }
        body = {"model": "openai/gpt-4o-mini", "messages": []}
        async with self.client.post(gateway.url / CHAT_PATH, json=body, headers=headers) as resp:
            payload = await resp.json(content_type=None)
        return resp.status, payload.get("error_type") if resp.status != 200 else None

    async def everywhere(self, member: Member) -> list[tuple[int, str | None]]:
        """What each replica answers the member now."""
        return [await self.chat(gateway, member) for gateway in self.gateways]

    async def become(
        self, expected: dict[Member, tuple[int, str | None]], *, within_seconds: float
    ) -> float:
        """Wait until every replica answers every member as expected; return the seconds taken."""
        started = time.monotonic()

        async def one(gateway: GatewayProcess, member: Member, answer: Any) -> None:
            await poll_until(
                lambda: self.chat(gateway, member),
                lambda got: got == answer,
                within_seconds=within_seconds,
                interval_seconds=POLL_SECONDS,
            )

        await asyncio.gather(
            *(
                one(gateway, member, answer)
                for gateway in self.gateways
                for member, answer in expected.items()
            )
        )
        return time.monotonic() - started

    async def listening(self) -> list[bool]:
        """Which replicas have their change listener connected."""
        answers = [await read_readiness(self.client, g.url) for g in self.gateways]
        return [
            status == 200 and body.get("change_notifications") is True for status, body in answers
        ]

    async def execute(self, *statements: tuple[str, Any]) -> None:
        """Run statements (sql, its one argument or None) in one transaction."""
        async with self.seed() as seed, seed.conn.transaction():
            for sql, argument in statements:
                await seed.conn.execute(sql, *(() if argument is None else (argument,)))


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
async def replicas(
    cluster: PostgresCluster, upstream: RunningUpstream, tmp_path: Path
) -> AsyncIterator[Replicas]:
    """Three ready gateways, listening, on a new database; killed afterwards."""
    async with migrated_database(cluster, "gw_replicas") as url, aiohttp.ClientSession() as client:
        gateways = [
            await GatewayProcess.start(
                database_url=url,
                upstream_url=upstream.url,
                log_dir=tmp_path,
                USAGE_SPOOL_DIR=tmp_path / f"spool-{index}",
                # Charges are not what these tests check, and a charge batch notifies
                # every replica: that could race first reads (see test_faults_database's
                # test_org_first_served_while_another_org_changed_...).
                USAGE_FLUSH_INTERVAL_SECONDS=60,
                **CACHE_FOR_AN_HOUR,
            )
            for index in range(REPLICAS)
        ]
        try:
            await asyncio.gather(*(gateway.wait_ready(client) for gateway in gateways))
            group = Replicas(cluster, url, client, gateways)
            await poll_until(group.listening, all, within_seconds=RECOVERY_DEADLINE_SECONDS)
            yield group
        finally:
            for gateway in gateways:
                await gateway.stop()


REVOKE_KEY_SQL = "UPDATE api_keys SET revoked_at = now() WHERE key_hash = $1"
REMOVE_MEMBER_SQL = "DELETE FROM organization_memberships WHERE user_id = $1"
PURCHASE_SQL = """
INSERT INTO organization_seats_purchases (organization_id, subscription_stripe_id, seat_count,
    subscription_status, billing_cycle, starts_at, expires_at)
VALUES ($1::uuid, 'sub_replicas', 5, 'active', 'yearly', now() - interval '1 day',
    now() + interval '1 year')
"""


async def test_purchase_revoked_key_and_removed_member_reach_every_replica_within_a_second(
    replicas: Replicas,
) -> None:
    """A purchase, a revoked key and a removed member each show on all three within 1 s."""
    buyer = await replicas.member(age=EXPIRED)
    revoked = await replicas.member()
    removed = await replicas.member()
    await replicas.become(
        {buyer: PAYMENT_REQUIRED, revoked: OK, removed: OK}, within_seconds=NOTIFY_DEADLINE_SECONDS
    )

    await replicas.execute((PURCHASE_SQL, buyer.organization_id))
    took = await replicas.become({buyer: OK}, within_seconds=NOTIFY_DEADLINE_SECONDS)
    assert took < NOTIFY_DEADLINE_SECONDS

    await replicas.execute((REVOKE_KEY_SQL, hash_token(revoked.token)))
    took = await replicas.become({revoked: INVALID_KEY}, within_seconds=NOTIFY_DEADLINE_SECONDS)
    assert took < NOTIFY_DEADLINE_SECONDS

    await replicas.execute((REMOVE_MEMBER_SQL, removed.user_id))
    took = await replicas.become({removed: NOT_A_MEMBER}, within_seconds=NOTIFY_DEADLINE_SECONDS)
    assert took < NOTIFY_DEADLINE_SECONDS


@pytest.mark.timeout(180)
async def test_no_replica_keeps_a_stale_cache_after_postgresql_restarts(
    replicas: Replicas,
) -> None:
    """Changes missed before a crash, or made after the restart before LISTEN, reach all three."""
    buyer = await replicas.member(age=EXPIRED)
    revoked = await replicas.member()
    removed = await replicas.member()
    silently_revoked = await replicas.member()
    later = await replicas.member()
    before = {buyer: PAYMENT_REQUIRED, revoked: OK, removed: OK, silently_revoked: OK, later: OK}
    await replicas.become(before, within_seconds=NOTIFY_DEADLINE_SECONDS)
    # A change no replica hears of (as one made while the listeners were away would be).
    await replicas.execute(
        ("ALTER TABLE api_keys DISABLE TRIGGER api_keys_notify", None),
        (REVOKE_KEY_SQL, hash_token(silently_revoked.token)),
        ("ALTER TABLE api_keys ENABLE TRIGGER api_keys_notify", None),
    )
    assert await replicas.everywhere(silently_revoked) == [OK] * REPLICAS

    await replicas.cluster.crash()
    try:
        # Every replica keeps serving what it cached, for the whole outage.
        until = time.monotonic() + OUTAGE_SECONDS
        while time.monotonic() < until:
            for member, answer in before.items():
                assert await replicas.everywhere(member) == [answer] * REPLICAS
            await asyncio.sleep(0.1)
    finally:
        await replicas.cluster.start()

    # Each replica reads the database again (a member it never saw proves it) and so
    # re-caches the old state, which the changes below then make stale.
    newcomer = await replicas.member()
    await replicas.become({newcomer: OK}, within_seconds=RECOVERY_DEADLINE_SECONDS)
    await replicas.become(
        {**before, silently_revoked: INVALID_KEY}, within_seconds=NOTIFY_DEADLINE_SECONDS
    )
    await replicas.execute(
        (PURCHASE_SQL, buyer.organization_id),
        (REVOKE_KEY_SQL, hash_token(revoked.token)),
        (REMOVE_MEMBER_SQL, removed.user_id),
    )
    listening_at_change = await replicas.listening()
    assert not all(listening_at_change), "every replica was listening: nothing was missed"

    after = {buyer: OK, revoked: INVALID_KEY, removed: NOT_A_MEMBER, later: OK}
    await replicas.become(after, within_seconds=RECOVERY_DEADLINE_SECONDS)
    await poll_until(replicas.listening, all, within_seconds=RECOVERY_DEADLINE_SECONDS)

    # Listening again: the next change is back to taking effect within a second.
    await replicas.execute((REVOKE_KEY_SQL, hash_token(later.token)))
    took = await replicas.become({later: INVALID_KEY}, within_seconds=NOTIFY_DEADLINE_SECONDS)
    assert took < NOTIFY_DEADLINE_SECONDS
