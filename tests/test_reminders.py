"""Trial reminders: 7, 3 and 1 days left and on expiry, each queued once per organization.

`queue_due_reminders` runs against the real database with an injected clock; the
periodic task runs inside real gateways and delivers through a real SMTP server.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator
from datetime import timedelta
from typing import Any

import asyncpg
import pytest

from gateway import config as gateway_config
from gateway.access.rule import SECONDS_PER_DAY
from gateway.accounts.reminders import queue_due_reminders
from tests.accounts import APP_URL, FAST_EMAIL, Mailbox, running_mailbox, to
from tests.conftest import RunningGateway
from tests.factories import Seed

DAY = SECONDS_PER_DAY


@pytest.fixture
def mailbox() -> Iterator[Mailbox]:
    """A running SMTP server for the test."""
    yield from running_mailbox()


@pytest.fixture
def config(make_config: Callable[..., gateway_config.Config]) -> gateway_config.Config:
    return make_config()


async def trial_org(seed: Seed, **org: Any) -> tuple[str, float]:
    """An organization with an owner, a billing manager and a member; its trial's end."""
    org_id = await seed.org(**org)
    for role, email in (("owner", "own"), ("billing_manager", "pay"), ("member", "use")):
        await seed.member(org_id, await seed.user(f"{email}-{org_id[:8]}@example.test"), role)
    created = await seed.conn.fetchval(
        "SELECT created_at FROM organizations WHERE id = $1::uuid", org_id
    )
    return org_id, created.timestamp() + 30 * DAY


async def reminders(db: asyncpg.Connection, org_id: str) -> list[asyncpg.Record]:
    return await db.fetch(
        "SELECT * FROM email_outbox WHERE organization_id = $1::uuid ORDER BY id", org_id
    )


async def test_each_stage_is_queued_once(
    db: asyncpg.Connection, seed: Seed, config: gateway_config.Config
) -> None:
    """Run at many instants (and twice at each), every stage is queued exactly once."""
    org_id, end = await trial_org(seed)
    timeline = [
        (end - 10 * DAY, 0),
        (end - 7.5 * DAY, 0),
        (end - 6.5 * DAY, 1),
        (end - 5 * DAY, 0),
        (end - 2.5 * DAY, 1),
        (end - 1.5 * DAY, 0),
        (end - 0.5 * DAY, 1),
        (end - 0.1 * DAY, 0),
        (end + 3600, 1),
        (end + 2 * DAY, 0),
    ]
    for now, expected in timeline:
        assert await queue_due_reminders(db, now, config) == expected
        assert await queue_due_reminders(db, now, config) == 0

    rows = await reminders(db, org_id)
    assert [r["dedupe_key"] for r in rows] == [
        f"trial_reminder:{org_id}:{stage}" for stage in ("7_days", "3_days", "1_day", "expired")
    ]
    assert [r["kind"] for r in rows][-1] == "trial_reminder_expired"
    prefix = org_id[:8]
    for row in rows:
        assert row["to_address"] == f"own-{prefix}@example.test, pay-{prefix}@example.test"


async def test_a_late_first_look_sends_only_the_latest_stage(
    db: asyncpg.Connection, seed: Seed, config: gateway_config.Config
) -> None:
    """First seen with half a day left: only the 1-day reminder, never a stale one."""
    org_id, end = await trial_org(seed)
    assert await queue_due_reminders(db, end - 0.5 * DAY, config) == 1
    [row] = await reminders(db, org_id)
    assert row["kind"] == "trial_reminder_1_day"
    assert row["subject"] == "Your Kilo Code trial ends in 1 day"


@pytest.mark.parametrize("case", ["subscribed", "exempt", "expired long ago"])
async def test_no_reminders_for_paying_exempt_or_long_expired_orgs(
    db: asyncpg.Connection, seed: Seed, config: gateway_config.Config, case: str
) -> None:
    """A paying or exempt organization, or one expired weeks ago, is never reminded."""
    if case == "expired long ago":
        _org, end = await trial_org(seed, age=timedelta(days=60))
        instants = [end + 30 * DAY]
    else:
        org_id, end = await trial_org(seed, require_seats=case != "exempt")
        if case == "subscribed":
            await seed.purchase(org_id)
        instants = [end + days * DAY for days in (-7.5, -3.5, -1.5, -0.5, 0.1, 3)]
    for now in instants:
        assert await queue_due_reminders(db, now, config) == 0
    assert await db.fetchval("SELECT count(*) FROM email_outbox") == 0


async def test_reminder_texts_point_to_billing(
    db: asyncpg.Connection, seed: Seed, config: gateway_config.Config
) -> None:
    """Reminders name the end, the monthly-terms price and the billing page; the last one
    says access stopped and credits are locked."""
    org_id, end = await trial_org(seed, name="Acme", plan="enterprise")
    await queue_due_reminders(db, end - 6 * DAY, config)
    await queue_due_reminders(db, end + 60, config)
    week, expired = await reminders(db, org_id)
    billing = f"{APP_URL}/organizations/{org_id}/billing"
    for row in (week, expired):
        assert billing in row["body_text"]
        assert "$299 per seat per month, billed annually ($3,588)" in row["body_text"]
        assert "Acme" in row["body_text"]
    assert week["subject"] == "Your Kilo Code trial ends in 7 days"
    assert "locked" in expired["body_text"] and "ended" in expired["subject"]


async def test_the_periodic_task_delivers_each_reminder_once(
    gateway_factory: Callable[..., Awaitable[RunningGateway]],
    db: asyncpg.Connection,
    seed: Seed,
    mailbox: Mailbox,
) -> None:
    """Two gateways running the task many times: one 7-day email to owner and billing
    manager; an org added later is reminded too, and the first is not again."""
    first, _end = await trial_org(seed, age=timedelta(days=25))
    env = {"SMTP_URL": mailbox.url, "TRIAL_REMINDER_INTERVAL_SECONDS": "0.05", **FAST_EMAIL}
    for _ in range(2):
        await gateway_factory(**env)
    [sent] = await mailbox.wait_for(to(f"own-{first[:8]}@example.test"))
    assert sent.rcpt_tos == [f"own-{first[:8]}@example.test", f"pay-{first[:8]}@example.test"]
    assert sent.subject == "Your Kilo Code trial ends in 7 days"

    later, _end = await trial_org(seed, age=timedelta(days=27))
    [again] = await mailbox.wait_for(to(f"own-{later[:8]}@example.test"))
    assert again.subject == "Your Kilo Code trial ends in 3 days"
    assert len(mailbox.matching(to(f"own-{first[:8]}@example.test"))) == 1
    assert len(await reminders(db, first)) == 1
