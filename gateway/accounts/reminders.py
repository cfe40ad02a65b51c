"""Trial reminders at 7, 3 and 1 days left and on expiry, each at most once per organization.

Every `TRIAL_REMINDER_INTERVAL_SECONDS` the task looks at organizations whose trial ends
within 8 days or ended within the last week, asks `status.reminder_stage` which reminder
is due (none for paying or exempt organizations), and queues one email to all of the
organization's owners and billing managers. The outbox's unique `dedupe_key`
(`trial_reminder:{organization}:{stage}`) makes each stage go once however often the task
runs and however many gateway processes run it.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import asyncpg
import structlog
from aiohttp import web

from gateway.access.queries import Queryable, fetch_org_facts
from gateway.access.refusals import billing_url
from gateway.access.rule import OrgFacts, decide, trial_end
from gateway.accounts.emails import billing_contacts, queue_email, trial_reminder_email
from gateway.accounts.status import (
    EXPIRED_REMINDER_WINDOW_SECONDS,
    ReminderStage,
    plan_pricing,
    reminder_stage,
)
from gateway.config import CONFIG, Config
from gateway.platform.database import POOL, UNAVAILABLE_ERRORS

log = structlog.get_logger("gateway.reminders")

# The earliest reminder goes out with 7 days left (rounded up): within the next 8 days.
LOOKAHEAD_DAYS = 8

_CANDIDATES_SQL = """
SELECT id::text FROM organizations
WHERE require_seats
  AND coalesce(free_trial_end_at, created_at + make_interval(days => $2))
      BETWEEN $1::timestamptz - make_interval(secs => $3)
          AND $1::timestamptz + make_interval(days => $4)
ORDER BY id
"""
_NAME_SQL = "SELECT name FROM organizations WHERE id = $1::uuid"


def dedupe_key(organization_id: str, stage: ReminderStage) -> str:
    """The outbox key that lets each reminder stage go once per organization."""
    return f"trial_reminder:{organization_id}:{stage.value}"


async def candidate_organizations(conn: Queryable, now: float, trial_days: int) -> list[str]:
    """Organizations whose trial ends soon or ended lately (the only ones a reminder fits)."""
    rows = await conn.fetch(
        _CANDIDATES_SQL,
        datetime.fromtimestamp(now, UTC),
        trial_days,
        float(EXPIRED_REMINDER_WINDOW_SECONDS),
        LOOKAHEAD_DAYS,
    )
    return [r[0] for r in rows]


async def queue_due_reminders(conn: Queryable, now: float, config: Config) -> int:
    """Queue every reminder due at UNIX time `now` and not queued before; return how many."""
    queued = 0
    for organization_id in await candidate_organizations(conn, now, config.trial_days):
        facts = await fetch_org_facts(conn, organization_id)
        if facts is None:
            continue
        verdict = decide(facts, now, config.trial_days, config.past_due_grace_days)
        stage = reminder_stage(facts, verdict, now)
        if stage is not None:
            queued += await queue_reminder(conn, facts, stage, config)
    return queued


async def queue_reminder(
    conn: Queryable, facts: OrgFacts, stage: ReminderStage, config: Config
) -> int:
    """Queue the stage's reminder to the owners and billing managers; 0 if already queued."""
    recipients = await billing_contacts(conn, facts.organization_id)
    if not recipients:
        return 0
    email = trial_reminder_email(
        to=", ".join(recipients),
        organization_name=await conn.fetchval(_NAME_SQL, facts.organization_id),
        stage=stage,
        trial_ends_at=trial_end(facts, config.trial_days),
        billing_url=billing_url(config.app_url, facts.organization_id),
        price_display=plan_pricing(config.catalog, facts.plan)["display"],
    )
    key = dedupe_key(facts.organization_id, stage)
    queued = await queue_email(conn, email, organization_id=facts.organization_id, dedupe_key=key)
    return int(queued)


class ReminderTask:
    """Runs `queue_due_reminders` now and then every interval, until cancelled."""

    def __init__(self, config: Config) -> None:
        self.config = config

    async def run(self, pool: asyncpg.Pool) -> None:
        """Queue due reminders every `TRIAL_REMINDER_INTERVAL_SECONDS`."""
        while True:
            await self.run_once(pool)
            await asyncio.sleep(self.config.trial_reminder_interval_seconds)

    async def run_once(self, pool: asyncpg.Pool) -> None:
        """One pass; an unreachable database is logged and tried again next time."""
        try:
            timeout = self.config.database_query_timeout_seconds
            async with pool.acquire(timeout=timeout) as conn:
                queued = await queue_due_reminders(conn, time.time(), self.config)
        except UNAVAILABLE_ERRORS as exc:
            log.warning("trial_reminders_unavailable", error=type(exc).__name__)
        except Exception:
            log.exception("trial_reminders_failed")
        else:
            if queued:
                log.info("trial_reminders_queued", count=queued)


REMINDERS = web.AppKey("reminders", ReminderTask)


def setup(app: web.Application) -> None:
    """Run the reminder task with the application."""
    app[REMINDERS] = ReminderTask(app[CONFIG])
    app.cleanup_ctx.append(trial_reminders)


async def trial_reminders(app: web.Application) -> AsyncIterator[None]:
    """The periodic reminder task; cancelled at shutdown (a pass is one short query set)."""
    task = asyncio.create_task(app[REMINDERS].run(app[POOL]), name="trial-reminders")
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
