"""`GET /api/organizations/{id}/usage`: where an organization's credits went, and who may ask.

Rows are written straight into `llm_usage` with chosen `created_at` times so the period
boundaries are exact; one test goes through the proxy to see its own charge reported.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
import asyncpg
import pytest

from tests.conftest import RunningGateway
from tests.factories import Seed

START = datetime(2026, 3, 1, tzinfo=UTC)
END = datetime(2026, 4, 1, tzinfo=UTC)
PERIOD = {"from": "2026-03-01T00:00:00Z", "to": "2026-04-01T00:00:00Z"}
MICROSECOND = timedelta(microseconds=1)
DEADLINE_SECONDS = 5.0


@dataclass(frozen=True)
class Team:
    """An organization with an owner, a billing manager and a member, each with a token."""

    org_id: str
    owner: tuple[str, str]
    billing_manager: tuple[str, str]
    member: tuple[str, str]


@dataclass(frozen=True)
class Reply:
    status: int
    body: Any


@pytest.fixture
async def team(seed: Seed) -> Team:
    org_id = await seed.org()
    return Team(
        org_id,
        await seed.member_with_key(org_id, "owner"),
        await seed.member_with_key(org_id, "billing_manager"),
        await seed.member_with_key(org_id, "member"),
    )


async def report(
    client: aiohttp.ClientSession,
    gateway: RunningGateway,
    org_id: str,
    token: str | None,
    query: dict[str, str] | None = None,
) -> Reply:
    """GET the usage report as `token` (None: no Authorization header)."""
    headers = {} if token is None else {"Authorization": f"Bearer {token}"}
    url = (gateway.url / "api" / "organizations" / org_id / "usage").with_query(query or {})
    async with client.get(url, headers=headers) as response:
        return Reply(response.status, json.loads(await response.read()))


async def add_usage(
    db: asyncpg.Connection,
    org_id: str,
    user_id: str,
    *,
    model: str | None = "openai/gpt-4o-mini",
    cost: int = 100,
    prompt_tokens: int | None = 10,
    completion_tokens: int | None = 5,
    at: datetime = START + timedelta(days=1),
) -> None:
    """Write one llm_usage row as the ledger would, at a chosen time."""
    await db.execute(
        """INSERT INTO llm_usage (request_id, organization_id, user_id, model, prompt_tokens,
               completion_tokens, cost_microdollars, streamed, status, created_at)
           VALUES ($1, $2::uuid, $3, $4, $5, $6, $7, true, 200, $8)""",
        f"req_{uuid.uuid4().hex}",
        org_id,
        user_id,
        model,
        prompt_tokens,
        completion_tokens,
        cost,
        at,
    )


async def email_of(db: asyncpg.Connection, user_id: str) -> str:
    email: str = await db.fetchval("SELECT email FROM users WHERE id = $1", user_id)
    return email


def assert_refused(reply: Reply, status: int, reason: str) -> None:
    assert reply.status == status, reply.body
    assert reply.body["error_type"] == reason
    assert reply.body["error"]["metadata"]["reason"] == reason


def figures(requests: int, cost: int, prompt: int, completion: int) -> dict[str, Any]:
    return {
        "requests": requests,
        "cost_microdollars": cost,
        "cost_usd": cost / 1_000_000,
        "prompt_tokens": prompt,
        "completion_tokens": completion,
    }


# --- Who may read it ----------------------------------------------------------------------


@pytest.mark.parametrize("role", ["owner", "billing_manager"])
async def test_owners_and_billing_managers_get_the_report(
    gateway: RunningGateway,
    client: aiohttp.ClientSession,
    db: asyncpg.Connection,
    seed: Seed,
    team: Team,
    role: str,
) -> None:
    """Owners and billing managers get totals, per model and per member (with email)."""
    owner_id, member_id = team.owner[0], team.member[0]
    stranger_id = await seed.user()  # no longer a member, still in the history
    await add_usage(db, team.org_id, member_id, cost=200, prompt_tokens=20, completion_tokens=2)
    await add_usage(db, team.org_id, member_id, cost=100, prompt_tokens=10, completion_tokens=1)
    await add_usage(db, team.org_id, member_id, model="x/y:free", cost=0, prompt_tokens=None)
    await add_usage(db, team.org_id, owner_id, cost=1000, prompt_tokens=7, completion_tokens=3)
    await add_usage(db, team.org_id, stranger_id, model=None, cost=5, completion_tokens=None)
    await add_usage(db, team.org_id, "user_deleted", cost=1)
    await add_usage(db, str(await seed.org()), owner_id, cost=99_999)  # another org's

    token = team.owner[1] if role == "owner" else team.billing_manager[1]
    reply = await report(client, gateway, team.org_id, token, PERIOD)

    assert reply.status == 200, reply.body
    body = reply.body
    assert body["organization_id"] == team.org_id
    assert datetime.fromisoformat(body["from"]) == START
    assert datetime.fromisoformat(body["to"]) == END
    assert body["total"] == figures(6, 1306, 57, 16)
    assert body["by_model"] == [
        {"model": "openai/gpt-4o-mini", **figures(4, 1301, 47, 11)},
        {"model": None, **figures(1, 5, 10, 0)},
        {"model": "x/y:free", **figures(1, 0, 0, 5)},
    ]
    assert body["by_member"] == [
        {"user_id": owner_id, "email": await email_of(db, owner_id), **figures(1, 1000, 7, 3)},
        {"user_id": member_id, "email": await email_of(db, member_id), **figures(3, 300, 30, 8)},
        {"user_id": stranger_id, "email": await email_of(db, stranger_id), **figures(1, 5, 10, 0)},
        {"user_id": "user_deleted", "email": None, **figures(1, 1, 10, 5)},
    ]


async def test_plain_members_are_refused(
    gateway: RunningGateway, client: aiohttp.ClientSession, team: Team
) -> None:
    """A member who is neither owner nor billing manager gets 403 insufficient_role."""
    reply = await report(client, gateway, team.org_id, team.member[1], PERIOD)
    assert_refused(reply, 403, "insufficient_role")


async def test_strangers_are_refused(
    gateway: RunningGateway, client: aiohttp.ClientSession, seed: Seed, team: Team
) -> None:
    """The owner of another organization gets 403 not_a_member."""
    elsewhere = await seed.org()
    _user, token = await seed.member_with_key(elsewhere, "owner")
    reply = await report(client, gateway, team.org_id, token, PERIOD)
    assert_refused(reply, 403, "not_a_member")


async def test_key_bound_to_another_organization_is_refused(
    gateway: RunningGateway, client: aiohttp.ClientSession, seed: Seed, team: Team
) -> None:
    """An owner's key bound to another of their organizations cannot read this one's report."""
    owner_id = team.owner[0]
    elsewhere = await seed.org()
    await seed.member(elsewhere, owner_id, "owner")
    bound = await seed.key(owner_id, elsewhere)
    reply = await report(client, gateway, team.org_id, bound, PERIOD)
    assert_refused(reply, 403, "not_a_member")


@pytest.mark.parametrize("token", [None, "kilo_not-a-key"], ids=["missing", "unknown"])
async def test_no_valid_key_is_401(
    gateway: RunningGateway, client: aiohttp.ClientSession, team: Team, token: str | None
) -> None:
    """Without a valid key the report is 401 invalid_api_key."""
    reply = await report(client, gateway, team.org_id, token, PERIOD)
    assert_refused(reply, 401, "invalid_api_key")


# --- Bad requests -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "query",
    [
        {"from": "2026-04-01", "to": "2026-03-01"},
        {"from": "2026-03-01T00:00:00Z", "to": "2026-03-01T00:00:00Z"},
        {"from": "yesterday"},
        {"to": "2026-13-01"},
        {"from": "2026-03-01", "to": "0001-01-01"},
        {"to": "0001-01-02"},
    ],
    ids=["reversed", "empty", "not-a-date", "no-such-month", "year-one", "default-from-underflows"],
)
async def test_bad_period_is_400(
    gateway: RunningGateway, client: aiohttp.ClientSession, team: Team, query: dict[str, str]
) -> None:
    """A period that is not an ISO date, or does not run forwards, is 400 invalid_period."""
    reply = await report(client, gateway, team.org_id, team.owner[1], query)
    assert_refused(reply, 400, "invalid_period")


@pytest.mark.parametrize("org_id", ["not-a-uuid", "1234", uuid.UUID(int=1).hex])
async def test_bad_organization_id_is_400(
    gateway: RunningGateway, client: aiohttp.ClientSession, team: Team, org_id: str
) -> None:
    """An organization id in the path that is not a UUID is 400 invalid_organization_id."""
    reply = await report(client, gateway, org_id, team.owner[1], PERIOD)
    assert_refused(reply, 400, "invalid_organization_id")


# --- The period ---------------------------------------------------------------------------


async def test_rows_outside_the_period_are_excluded(
    gateway: RunningGateway, client: aiohttp.ClientSession, db: asyncpg.Connection, team: Team
) -> None:
    """The period is [from, to): a row at `from` counts, a row at `to` does not."""
    user_id = team.member[0]
    await add_usage(db, team.org_id, user_id, cost=1, at=START - MICROSECOND)
    await add_usage(db, team.org_id, user_id, cost=10, at=START)
    await add_usage(db, team.org_id, user_id, cost=100, at=END - MICROSECOND)
    await add_usage(db, team.org_id, user_id, cost=1000, at=END)
    reply = await report(client, gateway, team.org_id, team.owner[1], PERIOD)
    assert reply.status == 200
    assert (reply.body["total"]["requests"], reply.body["total"]["cost_microdollars"]) == (2, 110)


async def test_offsets_and_plain_dates_are_understood(
    gateway: RunningGateway, client: aiohttp.ClientSession, db: asyncpg.Connection, team: Team
) -> None:
    """`from`/`to` may carry an offset or be plain dates (UTC midnight)."""
    user_id = team.member[0]
    await add_usage(db, team.org_id, user_id, cost=1, at=START - timedelta(hours=1))
    await add_usage(db, team.org_id, user_id, cost=10, at=START + timedelta(hours=1))
    query = {"from": "2026-03-01T01:00:00+02:00", "to": "2026-03-02"}
    reply = await report(client, gateway, team.org_id, team.owner[1], query)
    assert reply.status == 200, reply.body
    # 01:00+02:00 is 23:00 UTC the day before: both rows are in.
    assert reply.body["total"]["cost_microdollars"] == 11


async def test_default_period_is_the_last_30_days(
    gateway: RunningGateway, client: aiohttp.ClientSession, db: asyncpg.Connection, team: Team
) -> None:
    """Without `from` and `to` the report covers the last 30 days up to now."""
    user_id = team.member[0]
    now = datetime.now(UTC)
    await add_usage(db, team.org_id, user_id, cost=1, at=now - timedelta(days=31))
    await add_usage(db, team.org_id, user_id, cost=10, at=now - timedelta(days=29))
    await add_usage(db, team.org_id, user_id, cost=100, at=now - timedelta(minutes=1))
    reply = await report(client, gateway, team.org_id, team.owner[1])
    assert reply.status == 200
    assert reply.body["total"]["cost_microdollars"] == 110
    span = datetime.fromisoformat(reply.body["to"]) - datetime.fromisoformat(reply.body["from"])
    assert span == timedelta(days=30)


async def test_empty_period_reports_zeros(
    gateway: RunningGateway, client: aiohttp.ClientSession, team: Team
) -> None:
    """A period with no usage reports zero totals and empty breakdowns."""
    reply = await report(client, gateway, team.org_id, team.owner[1], PERIOD)
    assert reply.status == 200
    assert reply.body["total"] == figures(0, 0, 0, 0)
    assert (reply.body["by_model"], reply.body["by_member"]) == ([], [])


async def test_the_gateways_own_charges_show_up_in_the_report(
    gateway: RunningGateway, client: aiohttp.ClientSession, team: Team
) -> None:
    """A completion made through the proxy appears in the report once its charge is written."""
    user_id, token = team.member
    async with client.post(
        gateway.url / "api/openrouter/chat/completions",
        json={"model": "openai/gpt-4o-mini", "messages": []},
        headers={"Authorization": f"Bearer {token}"},
    ) as response:
        assert response.status == 200
    deadline = time.monotonic() + DEADLINE_SECONDS
    while True:
        reply = await report(client, gateway, team.org_id, team.owner[1])
        if reply.body["total"]["requests"] == 1:
            break
        assert time.monotonic() < deadline, reply.body
        await asyncio.sleep(0.02)
    assert reply.body["by_member"][0]["user_id"] == user_id
    assert reply.body["by_model"][0]["model"] == "openai/gpt-4o-mini"
    assert reply.body["total"]["cost_microdollars"] == 420
