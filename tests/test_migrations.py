"""Migrations: the pre-annual-billing schema, the backfills, idempotence, the advisory lock,
the CHECK constraints, and the NOTIFY triggers."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest

from gateway.access.auth import hash_token
from gateway.access.listener import CHANNEL
from gateway.platform.migrations import applied_versions, discover, migrate
from tests.factories import Seed

ALL_VERSIONS = [m.version for m in discover()]
NOTIFY_DEADLINE_SECONDS = 2.0


@pytest.fixture
async def empty_db(empty_database_url: str) -> AsyncIterator[asyncpg.Connection]:
    """A connection to a database with no tables."""
    conn = await asyncpg.connect(empty_database_url)
    yield conn
    await conn.close()


async def columns(conn: asyncpg.Connection, table: str) -> set[str]:
    rows = await conn.fetch(
        "SELECT column_name FROM information_schema.columns WHERE table_name = $1", table
    )
    return {r["column_name"] for r in rows}


async def insert_legacy_rows(conn: asyncpg.Connection, name: str) -> dict[str, str]:
    """An org, a user, a membership and a purchase, written in the pre-annual-billing schema."""
    now = datetime.now(UTC)
    org_id: str = await conn.fetchval(
        "INSERT INTO organizations (name) VALUES ($1) RETURNING id::text", name
    )
    user_id = f"user_{name}"
    await conn.execute(
        "INSERT INTO users (id, email) VALUES ($1, $2)", user_id, f"{name}@example.test"
    )
    await conn.execute(
        "INSERT INTO organization_memberships (organization_id, user_id, role)"
        " VALUES ($1::uuid, $2, 'owner')",
        org_id,
        user_id,
    )
    purchase_id: str = await conn.fetchval(
        """INSERT INTO organization_seats_purchases
               (organization_id, subscription_stripe_id, seat_count, starts_at, expires_at)
           VALUES ($1::uuid, $2, 3, $3, $4) RETURNING id::text""",
        org_id,
        f"sub_{name}",
        now - timedelta(days=1),
        now + timedelta(days=30),
    )
    return {"org": org_id, "user": user_id, "purchase": purchase_id}


# --- the story the migrations tell ----------------------------------------------------------


async def test_migrations_are_numbered_without_gaps() -> None:
    """The sql/ directory holds migrations 1, 2, 3, ... in order, the story's first five."""
    assert list(range(1, len(ALL_VERSIONS) + 1)) == ALL_VERSIONS
    assert ALL_VERSIONS[:5] == [1, 2, 3, 4, 5]


async def test_target_one_is_the_schema_before_annual_billing(empty_db: asyncpg.Connection) -> None:
    """Migrating to 1 creates the tables without billing_cycle or plan, and no triggers."""
    assert await migrate(empty_db, target=1) == [1]

    assert await applied_versions(empty_db) == [1]
    assert "billing_cycle" not in await columns(empty_db, "organization_seats_purchases")
    assert "plan" not in await columns(empty_db, "organizations")
    assert {"users", "organization_memberships", "api_keys"} <= {
        r["tablename"]
        for r in await empty_db.fetch("SELECT tablename FROM pg_tables WHERE schemaname='public'")
    }
    assert await empty_db.fetchval("SELECT count(*) FROM pg_trigger WHERE NOT tgisinternal") == 0


async def test_backfill_makes_old_purchases_monthly_and_old_orgs_teams(
    empty_db: asyncpg.Connection,
) -> None:
    """Rows written before annual billing become monthly purchases of teams organizations."""
    await migrate(empty_db, target=1)
    old = await insert_legacy_rows(empty_db, "legacy")

    assert await migrate(empty_db) == ALL_VERSIONS[1:]

    cycle = await empty_db.fetchval(
        "SELECT billing_cycle FROM organization_seats_purchases WHERE id = $1::uuid",
        old["purchase"],
    )
    plan = await empty_db.fetchval("SELECT plan FROM organizations WHERE id = $1::uuid", old["org"])
    assert (cycle, plan) == ("monthly", "teams")


async def test_target_two_adds_billing_cycle_but_not_plan(empty_db: asyncpg.Connection) -> None:
    """Migration 2 alone adds billing_cycle (backfilled) and leaves plan for migration 3."""
    await migrate(empty_db, target=1)
    old = await insert_legacy_rows(empty_db, "legacy")

    assert await migrate(empty_db, target=2) == [2]

    assert "billing_cycle" in await columns(empty_db, "organization_seats_purchases")
    assert "plan" not in await columns(empty_db, "organizations")
    assert (
        await empty_db.fetchval(
            "SELECT billing_cycle FROM organization_seats_purchases WHERE id = $1::uuid",
            old["purchase"],
        )
        == "monthly"
    )


async def test_listed_organizations_become_enterprise(empty_db: asyncpg.Connection) -> None:
    """Migration 3 moves the configured organizations to enterprise; the others stay teams."""
    await migrate(empty_db, target=2)
    partner = await insert_legacy_rows(empty_db, "partner")
    ordinary = await insert_legacy_rows(empty_db, "ordinary")

    applied = await migrate(empty_db, enterprise_organization_ids=[partner["org"]])

    assert applied == ALL_VERSIONS[2:]
    plans = dict(await empty_db.fetch("SELECT id::text, plan FROM organizations"))
    assert plans == {partner["org"]: "enterprise", ordinary["org"]: "teams"}


async def test_enterprise_list_is_only_read_by_migration_three(
    empty_db: asyncpg.Connection,
) -> None:
    """Passing the enterprise list after migration 3 has run changes nothing."""
    await migrate(empty_db)
    org = await insert_legacy_rows(empty_db, "late")

    assert await migrate(empty_db, enterprise_organization_ids=[org["org"]]) == []

    plan = await empty_db.fetchval("SELECT plan FROM organizations WHERE id = $1::uuid", org["org"])
    assert plan == "teams"


async def test_new_rows_default_to_monthly_and_teams(db: asyncpg.Connection) -> None:
    """After all migrations a purchase without a cycle is monthly and a new org is teams."""
    rows = await insert_legacy_rows(db, "fresh")

    cycle = await db.fetchval(
        "SELECT billing_cycle FROM organization_seats_purchases WHERE id = $1::uuid",
        rows["purchase"],
    )
    plan = await db.fetchval("SELECT plan FROM organizations WHERE id = $1::uuid", rows["org"])
    assert (cycle, plan) == ("monthly", "teams")


# --- running the migrations -----------------------------------------------------------------


async def test_migrate_is_idempotent(empty_db: asyncpg.Connection) -> None:
    """A second run applies nothing and schema_migrations records 1 to 4 once each."""
    assert await migrate(empty_db) == ALL_VERSIONS

    assert await migrate(empty_db) == []
    assert await applied_versions(empty_db) == ALL_VERSIONS
    names = [r["name"] for r in await empty_db.fetch("SELECT name FROM schema_migrations")]
    assert len(names) == len(set(names)) == len(ALL_VERSIONS)


async def test_concurrent_migrations_apply_each_version_once(empty_database_url: str) -> None:
    """Two replicas migrating at once both succeed; each migration is applied exactly once."""
    first = await asyncpg.connect(empty_database_url)
    second = await asyncpg.connect(empty_database_url)
    try:
        results = await asyncio.gather(migrate(first), migrate(second))
        assert sorted(results, key=len) == [[], ALL_VERSIONS]
        assert await applied_versions(first) == ALL_VERSIONS
        # The lock is released: a third run gets it at once and finds nothing to do.
        assert await asyncio.wait_for(migrate(second), 5) == []
    finally:
        await first.close()
        await second.close()


async def test_failed_migration_leaves_nothing_half_applied(
    empty_db: asyncpg.Connection, tmp_path: Any
) -> None:
    """A migration that fails rolls back entirely, is not recorded, and releases the lock."""
    good = tmp_path / "001_good.sql"
    good.write_text("CREATE TABLE good (id int);")
    bad = tmp_path / "002_bad.sql"
    bad.write_text("CREATE TABLE half (id int); SELECT 1/0;")

    with pytest.raises(asyncpg.DivisionByZeroError):
        await migrate(empty_db, sql_dir=tmp_path)

    assert await applied_versions(empty_db) == [1]
    assert await empty_db.fetchval("SELECT to_regclass('half')") is None
    locks = await empty_db.fetchval(
        """SELECT count(*) FROM pg_locks
           WHERE locktype = 'advisory'
             AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"""
    )
    assert locks == 0


# --- constraints ----------------------------------------------------------------------------


async def test_plan_must_be_teams_or_enterprise(seed: Seed) -> None:
    """The plan CHECK rejects anything but teams and enterprise."""
    assert await seed.org(plan="enterprise")
    with pytest.raises(asyncpg.CheckViolationError):
        await seed.org(plan="gold")


async def test_billing_cycle_must_be_monthly_or_yearly(seed: Seed) -> None:
    """The billing_cycle CHECK rejects anything but monthly and yearly."""
    org = await seed.org()
    assert await seed.purchase(org, billing_cycle="monthly")
    assert await seed.purchase(org, billing_cycle="yearly")
    with pytest.raises(asyncpg.CheckViolationError):
        await seed.purchase(org, billing_cycle="weekly")


# --- NOTIFY triggers ------------------------------------------------------------------------


class Notifications:
    """A LISTEN connection on the gateway's channel, collecting decoded payloads."""

    def __init__(self) -> None:
        self.raw: asyncio.Queue[str] = asyncio.Queue()

    def received(self, _conn: Any, _pid: int, _channel: str, payload: str) -> None:
        self.raw.put_nowait(payload)

    async def next(self) -> dict[str, Any]:
        """The next payload, decoded; fails if none arrives within the deadline."""
        raw = await asyncio.wait_for(self.raw.get(), NOTIFY_DEADLINE_SECONDS)
        assert "key_hash" not in raw
        change: dict[str, Any] = json.loads(raw)
        return change

    async def collect(self, count: int) -> list[dict[str, Any]]:
        return [await self.next() for _ in range(count)]


@pytest.fixture
async def notifications(db_url: str) -> AsyncIterator[Notifications]:
    """Payloads sent on the gateway's channel, from now on."""
    conn = await asyncpg.connect(db_url)
    collected = Notifications()
    await conn.add_listener(CHANNEL, collected.received)
    yield collected
    await conn.close()


async def assert_nothing_else(db: asyncpg.Connection, notifications: Notifications) -> None:
    """No further notification is on its way: a marker sent now is the next to arrive."""
    await db.execute("SELECT pg_notify($1, $2)", CHANNEL, '{"marker": true}')
    assert await notifications.next() == {"marker": True}


async def test_organization_changes_name_the_organization(
    db: asyncpg.Connection, seed: Seed, notifications: Notifications
) -> None:
    """Inserting, updating and deleting an organization each notify with its id."""
    org = await seed.org(credits_acquired_microdollars=0)
    await db.execute(
        "UPDATE organizations SET free_trial_end_at = now() + interval '10 days'"
        " WHERE id = $1::uuid",
        org,
    )
    await db.execute("DELETE FROM organizations WHERE id = $1::uuid", org)

    expected = {"table": "organizations", "organization_id": org}
    # insert: NEW; update: OLD and NEW fold into one; delete: OLD.
    assert await notifications.collect(3) == [expected] * 3
    await assert_nothing_else(db, notifications)


async def test_only_a_charge_is_marked_as_credits_used(
    db: asyncpg.Connection, seed: Seed, notifications: Notifications
) -> None:
    """An update that moved nothing but credits_used_microdollars (the ledger's charge
    batch) says so; credits bought, a trial end, or a charge together with another change
    carry no mark, so the gateway judges the next request on the new row."""
    org = await seed.org(credits_acquired_microdollars=0)
    await notifications.next()
    await db.execute(
        "UPDATE organizations SET credits_used_microdollars = credits_used_microdollars + 5"
        " WHERE id = $1::uuid",
        org,
    )
    await seed.credits(org, 1_000_000)
    await db.execute("UPDATE organizations SET free_trial_end_at = now() WHERE id = $1::uuid", org)
    await db.execute(
        "UPDATE organizations SET credits_used_microdollars = 7, require_seats = false"
        " WHERE id = $1::uuid",
        org,
    )

    plain = {"table": "organizations", "organization_id": org}
    assert await notifications.collect(4) == [
        {**plain, "change": "credits_used"},
        plain,
        plain,
        plain,
    ]
    await assert_nothing_else(db, notifications)


async def test_purchase_changes_name_the_organization(
    db: asyncpg.Connection, seed: Seed, notifications: Notifications
) -> None:
    """A new purchase and a status change notify with the purchase's organization."""
    org = await seed.org(credits_acquired_microdollars=0)
    await notifications.next()
    purchase = await seed.purchase(org)
    await db.execute(
        "UPDATE organization_seats_purchases SET subscription_status = 'ended' WHERE id = $1::uuid",
        purchase,
    )

    expected = {"table": "organization_seats_purchases", "organization_id": org}
    assert await notifications.collect(2) == [expected] * 2
    await assert_nothing_else(db, notifications)


async def test_membership_changes_name_organization_and_user(
    db: asyncpg.Connection, seed: Seed, notifications: Notifications
) -> None:
    """Adding and removing a member notify with the organization and the user."""
    org = await seed.org(credits_acquired_microdollars=0)
    user = await seed.user()
    await notifications.next()
    await seed.member(org, user)
    await db.execute(
        "DELETE FROM organization_memberships WHERE organization_id = $1::uuid AND user_id = $2",
        org,
        user,
    )

    expected = {"table": "organization_memberships", "organization_id": org, "user_id": user}
    assert await notifications.collect(2) == [expected] * 2


async def test_moving_a_row_names_both_organizations(
    db: asyncpg.Connection, seed: Seed, notifications: Notifications
) -> None:
    """An update that moves a membership to another organization notifies for old and new."""
    old_org = await seed.org(credits_acquired_microdollars=0)
    new_org = await seed.org(credits_acquired_microdollars=0)
    user = await seed.user()
    await seed.member(old_org, user)
    await notifications.collect(3)

    await db.execute(
        "UPDATE organization_memberships SET organization_id = $1::uuid WHERE user_id = $2",
        new_org,
        user,
    )

    changes = await notifications.collect(2)
    assert {c["organization_id"] for c in changes} == {old_org, new_org}
    assert all(c["user_id"] == user for c in changes)


async def test_api_key_changes_name_the_key_and_never_its_hash(
    db: asyncpg.Connection, seed: Seed, notifications: Notifications
) -> None:
    """Creating and revoking a key notify with its id, user and org, never its hash."""
    org = await seed.org(credits_acquired_microdollars=0)
    user = await seed.user()
    await notifications.next()
    token = await seed.key(user, org)
    key_id = await db.fetchval(
        "SELECT id::text FROM api_keys WHERE key_hash = $1", hash_token(token)
    )
    await db.execute("UPDATE api_keys SET revoked_at = now() WHERE id = $1::uuid", key_id)
    unbound_token = await seed.key(user)

    created, revoked, unbound = await notifications.collect(3)

    expected = {"table": "api_keys", "key_id": key_id, "user_id": user, "organization_id": org}
    assert created == revoked == expected
    assert unbound["table"] == "api_keys"
    assert unbound["user_id"] == user
    assert "organization_id" not in unbound
    for change in (created, revoked, unbound):
        assert set(change) <= {"table", "key_id", "user_id", "organization_id"}
        text = json.dumps(change)
        assert hash_token(token) not in text
        assert hash_token(unbound_token) not in text
        assert token not in text


async def test_rolled_back_change_does_not_notify(
    db: asyncpg.Connection, seed: Seed, notifications: Notifications
) -> None:
    """Notifications are sent on commit only: a rolled-back change announces nothing."""
    org = await seed.org(credits_acquired_microdollars=0)
    await notifications.next()

    transaction = db.transaction()
    await transaction.start()
    await db.execute("UPDATE organizations SET name = 'x' WHERE id = $1::uuid", org)
    await transaction.rollback()
    await db.execute("UPDATE organizations SET name = 'y' WHERE id = $1::uuid", org)

    # Only the committed update arrives (and it arrives after the rolled-back one would have).
    assert await notifications.next() == {"table": "organizations", "organization_id": org}
    await assert_nothing_else(db, notifications)


async def test_migration_nine_ends_subscriptions_stripe_ended_behind_a_newer_one(
    empty_db: asyncpg.Connection,
) -> None:
    """Before migration 9 only an organization's newest row counted, so a cancellation
    behind a newer subscription was never written. Each subscription counting on its own
    from 9 on, those Stripe recorded as ended are ended; live ones are left alone."""
    await migrate(empty_db, target=8)
    now = datetime.now(UTC)
    org_id: str = await empty_db.fetchval(
        "INSERT INTO organizations (name) VALUES ('Acme') RETURNING id::text"
    )
    stripe_status = {"sub_old": "canceled", "sub_cancelling": "active", "sub_new": "active"}
    for created, subscription in enumerate(stripe_status):
        await empty_db.execute(
            """INSERT INTO organization_seats_purchases (organization_id, subscription_stripe_id,
                   seat_count, starts_at, expires_at, created_at)
               VALUES ($1::uuid, $2, 3, $3, $4, $5)""",
            org_id,
            subscription,
            now - timedelta(days=30),
            now + timedelta(days=300),
            now - timedelta(days=10 - created),
        )
        await empty_db.execute(
            """INSERT INTO stripe_subscriptions (subscription_id, organization_id,
                   last_event_created_at, status, updated_at)
               VALUES ($1, $2::uuid, $3, $4, $3)""",
            subscription,
            org_id,
            now - timedelta(days=1),
            stripe_status[subscription],
        )

    assert await migrate(empty_db, target=9) == [9]

    rows = await empty_db.fetch(
        """SELECT DISTINCT ON (subscription_stripe_id) subscription_stripe_id,
               subscription_status, expires_at, stripe_status
           FROM organization_seats_purchases
           ORDER BY subscription_stripe_id, created_at DESC"""
    )
    latest = {r["subscription_stripe_id"]: r for r in rows}
    assert {s: r["subscription_status"] for s, r in latest.items()} == {
        "sub_cancelling": "active",
        "sub_new": "active",
        "sub_old": "ended",
    }
    ended = latest["sub_old"]
    assert (ended["expires_at"], ended["stripe_status"]) == (now - timedelta(days=1), "canceled")
    assert await migrate(empty_db, target=9) == []


async def test_migration_ten_starts_the_grace_of_past_due_subscriptions_when_recorded(
    empty_db: asyncpg.Connection,
) -> None:
    """A subscription already past_due before migration 10 failed no later than its row was
    written: its grace counts from then, not from the deploy; other rows have no failure."""
    await migrate(empty_db, target=9)
    now = datetime.now(UTC)
    org_id: str = await empty_db.fetchval(
        "INSERT INTO organizations (name) VALUES ('Acme') RETURNING id::text"
    )
    for subscription, status in (("sub_failing", "past_due"), ("sub_paying", "active")):
        await empty_db.execute(
            """INSERT INTO organization_seats_purchases (organization_id, subscription_stripe_id,
                   seat_count, subscription_status, starts_at, expires_at, created_at)
               VALUES ($1::uuid, $2, 3, $3, $4, $5, $6)""",
            org_id,
            subscription,
            status,
            now - timedelta(days=30),
            now + timedelta(days=300),
            now - timedelta(days=5),
        )

    assert await migrate(empty_db, target=10) == [10]

    rows = await empty_db.fetch(
        "SELECT subscription_stripe_id, payment_failed_at FROM organization_seats_purchases"
    )
    assert {r["subscription_stripe_id"]: r["payment_failed_at"] for r in rows} == {
        "sub_failing": now - timedelta(days=5),
        "sub_paying": None,
    }
