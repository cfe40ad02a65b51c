"""Organizations end to end: create without a card, the status page, SSO through sales.

A real gateway on a real port, real PostgreSQL, and a real SMTP server for the emails.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator
from datetime import datetime, timedelta
from typing import Any

import aiohttp
import asyncpg
import pytest

from gateway.plans import load_catalog
from tests.accounts import (
    APP_URL,
    FAST_EMAIL,
    Mailbox,
    api,
    assert_error,
    chat_status,
    running_mailbox,
    to,
)
from tests.conftest import RunningGateway
from tests.factories import Seed

CATALOG = load_catalog()
SALES = "sales-team@example.test"
EXPIRED = timedelta(days=31)


@pytest.fixture
def mailbox() -> Iterator[Mailbox]:
    """A running SMTP server for the test."""
    yield from running_mailbox()


@pytest.fixture
async def gateway_with_mail(
    gateway_factory: Callable[..., Awaitable[RunningGateway]], mailbox: Mailbox
) -> RunningGateway:
    """A gateway that delivers its email to the test's SMTP server."""
    return await gateway_factory(SMTP_URL=mailbox.url, SALES_EMAIL=SALES, **FAST_EMAIL)


async def create(
    client: aiohttp.ClientSession, gateway: RunningGateway, token: str, **body: Any
) -> Any:
    return await api(client, gateway, "POST", "/api/organizations", token=token, body=body)


async def status_of(
    client: aiohttp.ClientSession, gateway: RunningGateway, org_id: str, token: str
) -> Any:
    return await api(client, gateway, "GET", f"/api/organizations/{org_id}", token=token)


# Creating an organization


async def test_create_organization_starts_a_trial_without_credits(
    gateway: RunningGateway, client: aiohttp.ClientSession, db: asyncpg.Connection, seed: Seed
) -> None:
    """201 with the org and its page; the caller owns it; 30-day trial; no credits at all."""
    user_id = await seed.user("ada@example.test")
    token = await seed.key(user_id)
    reply = await create(client, gateway, token, name="Acme", plan="teams")

    assert reply.status == 201, reply.body
    org = reply.body["organization"]
    assert set(org) == {"id", "name", "plan", "created_at", "trial_ends_at"}
    assert (org["name"], org["plan"]) == ("Acme", "teams")
    assert reply.body["redirect_url"] == f"{APP_URL}/organizations/{org['id']}"
    created = datetime.fromisoformat(org["created_at"])
    assert datetime.fromisoformat(org["trial_ends_at"]) - created == timedelta(days=30)
    row = await db.fetchrow("SELECT * FROM organizations WHERE id = $1::uuid", org["id"])
    assert row["free_trial_end_at"] is None and row["require_seats"] is True
    assert row["credits_acquired_microdollars"] == 0
    assert row["created_at"] == created
    assert await db.fetchval("SELECT count(*) FROM credit_transactions") == 0
    role = await db.fetchval(
        "SELECT role FROM organization_memberships WHERE user_id = $1", user_id
    )
    assert role == "owner"


async def test_welcome_email_explains_the_trial(
    gateway_with_mail: RunningGateway, client: aiohttp.ClientSession, seed: Seed, mailbox: Mailbox
) -> None:
    """The welcome email names the plan, the end date, how to upgrade and buying credits."""
    token = await seed.key(await seed.user("grace@example.test"))
    org = (await create(client, gateway_with_mail, token, name="Hopper", plan="teams")).body

    [welcome] = await mailbox.wait_for(to("grace@example.test"))
    body = welcome.body
    assert "Kilo Code Teams" in body and "Kilo Code Teams" in welcome.subject
    assert org["organization"]["trial_ends_at"][:10] in body
    assert "Hopper" in body
    assert f"{APP_URL}/organizations/{org['organization']['id']}/billing" in body
    assert "$29 per seat per month, billed annually ($348)" in body
    assert "buy credits" in body.lower()
    assert "upgrade" in body.lower()
    assert welcome.message["From"] == "Kilo Code <hello@kilocode.ai>"


async def test_enterprise_organization_welcome_names_enterprise_pricing(
    gateway_with_mail: RunningGateway, client: aiohttp.ClientSession, seed: Seed, mailbox: Mailbox
) -> None:
    """An enterprise organization is created the same way, with enterprise prices."""
    token = await seed.key(await seed.user("ent@example.test"))
    reply = await create(client, gateway_with_mail, token, name="Big Co", plan="enterprise")
    assert reply.status == 201
    assert reply.body["organization"]["plan"] == "enterprise"
    [welcome] = await mailbox.wait_for(to("ent@example.test"))
    assert "Kilo Code Enterprise" in welcome.body
    assert "$299 per seat per month, billed annually ($3,588)" in welcome.body


async def test_new_owner_can_use_the_proxy_at_once(
    gateway: RunningGateway, client: aiohttp.ClientSession, seed: Seed
) -> None:
    """The creator can use free models right away; paid ones wait for credits."""
    token = await seed.key(await seed.user())
    org_id = (await create(client, gateway, token, name="Acme")).body["organization"]["id"]
    assert await chat_status(client, gateway, token, org_id, "meta/llama:free") == 200
    assert await chat_status(client, gateway, token, org_id) == 402


async def test_plan_defaults_to_teams_and_any_key_may_create(
    gateway: RunningGateway, client: aiohttp.ClientSession, seed: Seed
) -> None:
    """Without a plan the organization is teams; a key bound to another org still creates."""
    other = await seed.org()
    user_id = await seed.user()
    await seed.member(other, user_id)
    bound = await seed.key(user_id, other)
    reply = await create(client, gateway, bound, name="Side project")
    assert reply.status == 201
    assert reply.body["organization"]["plan"] == "teams"


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b'{"plan": "teams"}', "invalid_request"),
        (b'{"name": "", "plan": "teams"}', "invalid_request"),
        (b'{"name": 5, "plan": "teams"}', "invalid_request"),
        (b'{"name": "Two\\nlines"}', "invalid_request"),
        (b'{"name": "Acme", "plan": "pro"}', "invalid_request"),
        (b'{"name": "Acme", "plan": null}', "invalid_request"),
        (b'{"name": "Acme"', "invalid_json"),
        (b'["Acme"]', "invalid_json"),
    ],
)
async def test_bad_input_is_400_and_creates_nothing(
    gateway: RunningGateway,
    client: aiohttp.ClientSession,
    db: asyncpg.Connection,
    seed: Seed,
    raw: bytes,
    reason: str,
) -> None:
    """Missing or bad fields and malformed JSON get the 400 envelope; nothing is written."""
    token = await seed.key(await seed.user())
    reply = await api(client, gateway, "POST", "/api/organizations", token=token, raw=raw)
    assert_error(reply, 400, reason)
    assert await db.fetchval("SELECT count(*) FROM organizations") == 0
    assert await db.fetchval("SELECT count(*) FROM email_outbox") == 0


async def test_create_needs_a_valid_key(
    gateway: RunningGateway, client: aiohttp.ClientSession
) -> None:
    """No key, or an unknown one: 401."""
    assert_error(await create(client, gateway, "kilo_nope", name="Acme"), 401, "invalid_api_key")
    reply = await api(client, gateway, "POST", "/api/organizations", body={"name": "Acme"})
    assert_error(reply, 401, "invalid_api_key")


# The status page


async def test_status_of_a_new_organization(
    gateway: RunningGateway, client: aiohttp.ClientSession, seed: Seed
) -> None:
    """A fresh teams org: trialing 30 days, unlimited seats, nothing bought, info prompt."""
    token = await seed.key(await seed.user())
    org_id = (await create(client, gateway, token, name="Acme")).body["organization"]["id"]
    reply = await status_of(client, gateway, org_id, token)

    assert reply.status == 200, reply.body
    body = reply.body
    assert body["plan"] == "teams"
    assert body["trial"]["stage"] == "trialing"
    # Created a moment ago: 30 days left, as a person counts them (not 29).
    assert body["trial"]["days_remaining"] == 30
    assert body["call_to_action"]["title"] == "30 days left in your free trial"
    assert body["seats"] == {
        "used": 1,
        "purchased": 0,
        "unlimited": True,
        "short": 0,
        "pending_invitations": 0,
    }
    assert body["subscription"] is None
    assert body["credits"] == {"balance_usd": 0.0, "locked": False}
    assert body["access"] == {"allowed": True, "reason": None}
    assert body["pricing"]["display"] == "$29 per seat per month, billed annually ($348)"
    assert body["call_to_action"]["level"] == "info"
    assert body["call_to_action"]["url"] == f"{APP_URL}/organizations/{org_id}/billing"
    assert body["sso"] is None


@pytest.mark.parametrize(
    ("age_days", "level"), [(1, "info"), (25, "warning"), (28, "urgent"), (31, "blocking")]
)
async def test_call_to_action_grows_louder(
    gateway: RunningGateway, client: aiohttp.ClientSession, seed: Seed, age_days: int, level: str
) -> None:
    """5 days left is a warning, 2 urgent, and after the trial it blocks."""
    org_id = await seed.org(age=timedelta(days=age_days))
    _user, token = await seed.member_with_key(org_id, "owner")
    reply = await status_of(client, gateway, org_id, token)
    assert reply.body["call_to_action"]["level"] == level


async def test_expired_status_matches_the_proxys_refusal(
    gateway: RunningGateway, client: aiohttp.ClientSession, seed: Seed
) -> None:
    """The status page's access is the proxy's own verdict, and credits are locked."""
    org_id = await seed.org(age=EXPIRED)
    _user, token = await seed.member_with_key(org_id, "owner")
    body = (await status_of(client, gateway, org_id, token)).body
    proxy = await api(
        client,
        gateway,
        "POST",
        "/api/openrouter/chat/completions",
        token=token,
        body={"model": "m", "messages": []},
    )
    assert proxy.status == 402
    assert body["access"] == {"allowed": False, "reason": proxy.body["error_type"]}
    assert body["credits"] == {"balance_usd": 100.0, "locked": True}
    assert body["trial"] == {
        "ends_at": proxy.body["error"]["metadata"]["trial_ends_at"],
        "days_remaining": 0,
        "stage": "expired",
    }
    assert body["call_to_action"]["level"] == "blocking"
    assert body["call_to_action"]["message"] == proxy.body["error"]["message"]


async def test_status_of_a_subscribed_organization(
    gateway: RunningGateway, client: aiohttp.ClientSession, seed: Seed
) -> None:
    """After the trial with a yearly purchase: allowed, seats purchased, no prompt."""
    org_id = await seed.org(age=timedelta(days=40))
    _user, token = await seed.member_with_key(org_id, "owner")
    await seed.purchase(org_id, seat_count=5)
    body = (await status_of(client, gateway, org_id, token)).body
    assert body["trial"]["stage"] == "expired"
    assert body["subscription"]["status"] == "active"
    assert body["subscription"]["billing_cycle"] == "yearly"
    assert body["subscription"]["seat_count"] == 5
    assert body["seats"] == {
        "used": 1,
        "purchased": 5,
        "unlimited": False,
        "short": 0,
        "pending_invitations": 0,
    }
    assert body["access"] == {"allowed": True, "reason": None}
    assert body["credits"]["locked"] is False
    assert body["call_to_action"]["level"] == "none"


async def test_status_of_an_exempt_organization(
    gateway: RunningGateway, client: aiohttp.ClientSession, seed: Seed
) -> None:
    """`require_seats = false` after its trial: allowed, unlimited, never prompted."""
    org_id = await seed.org(age=timedelta(days=400), require_seats=False)
    _user, token = await seed.member_with_key(org_id, "owner")
    body = (await status_of(client, gateway, org_id, token)).body
    assert body["access"] == {"allowed": True, "reason": None}
    assert body["seats"]["unlimited"] is True
    assert body["call_to_action"]["level"] == "none"


async def test_status_of_an_enterprise_organization_offers_sso_through_sales(
    gateway: RunningGateway, client: aiohttp.ClientSession, seed: Seed
) -> None:
    """Enterprise: monthly-terms enterprise pricing, and SSO is not self-serve."""
    org_id = await seed.org(plan="enterprise")
    _user, token = await seed.member_with_key(org_id, "owner")
    body = (await status_of(client, gateway, org_id, token)).body
    assert body["plan"] == "enterprise"
    assert body["pricing"] == {
        "per_seat_monthly_usd": 299,
        "billed": "annually",
        "per_seat_yearly_usd": 3588,
        "display": "$299 per seat per month, billed annually ($3,588)",
    }
    assert body["sso"] == {"self_serve": False, "contact_sales_url": CATALOG.contact_sales_url}


@pytest.mark.parametrize("role", ["owner", "member", "billing_manager"])
async def test_every_member_role_sees_the_status(
    gateway: RunningGateway, client: aiohttp.ClientSession, seed: Seed, role: str
) -> None:
    """Owners, members and billing managers all read the status; billing managers hold no seat."""
    org_id = await seed.org()
    await seed.member_with_key(org_id, "owner")
    _user, token = await seed.member_with_key(org_id, role)
    reply = await status_of(client, gateway, org_id, token)
    assert reply.status == 200
    assert reply.body["seats"]["used"] == (1 if role == "billing_manager" else 2)


async def test_strangers_and_foreign_keys_are_refused(
    gateway: RunningGateway, client: aiohttp.ClientSession, seed: Seed
) -> None:
    """Not a member, a key bound to another org, or no such org: 403; bad id 400; no key 401."""
    org_id, other = await seed.org(), await seed.org()
    stranger = await seed.key(await seed.user())
    user_id, _token = await seed.member_with_key(org_id, "owner")
    await seed.member(other, user_id)
    bound_elsewhere = await seed.key(user_id, other)
    missing = "00000000-0000-4000-8000-00000000dead"
    assert_error(await status_of(client, gateway, org_id, stranger), 403, "not_a_member")
    assert_error(await status_of(client, gateway, org_id, bound_elsewhere), 403, "not_a_member")
    assert_error(await status_of(client, gateway, missing, stranger), 403, "not_a_member")
    reply = await status_of(client, gateway, "not-a-uuid", stranger)
    assert_error(reply, 400, "invalid_organization_id")
    reply = await api(client, gateway, "GET", f"/api/organizations/{org_id}")
    assert_error(reply, 401, "invalid_api_key")


# Enterprise SSO goes through sales


async def contact_sales(
    client: aiohttp.ClientSession, gateway: RunningGateway, org_id: str, token: str, **body: Any
) -> Any:
    path = f"/api/organizations/{org_id}/sso/contact-sales"
    return await api(client, gateway, "POST", path, token=token, body=body)


async def test_enterprise_owner_reaches_sales(
    gateway_with_mail: RunningGateway,
    client: aiohttp.ClientSession,
    db: asyncpg.Connection,
    seed: Seed,
    mailbox: Mailbox,
) -> None:
    """202; the request is recorded and SALES_EMAIL gets the org, plan, requester, message."""
    org_id = await seed.org(name="Initech", plan="enterprise")
    user_id = await seed.user("peter@initech.test")
    await seed.member(org_id, user_id, "owner")
    token = await seed.key(user_id)
    reply = await contact_sales(client, gateway_with_mail, org_id, token, message="We use Okta.")

    assert reply.status == 202, reply.body
    assert reply.body["contact_request"]["topic"] == "sso"
    row = await db.fetchrow("SELECT * FROM sales_contact_requests")
    assert (str(row["organization_id"]), row["user_id"]) == (org_id, user_id)
    assert row["message"] == "We use Okta."
    [sent] = await mailbox.wait_for(to(SALES))
    for text in ("Initech", org_id, "enterprise", "peter@initech.test", "We use Okta."):
        assert text in sent.body


async def test_teams_owner_is_told_sso_needs_enterprise(
    gateway: RunningGateway, client: aiohttp.ClientSession, db: asyncpg.Connection, seed: Seed
) -> None:
    """Teams: 400 `sso_requires_enterprise` with a clear message; nothing recorded or sent."""
    org_id = await seed.org(plan="teams")
    _user, token = await seed.member_with_key(org_id, "owner")
    error = assert_error(
        await contact_sales(client, gateway, org_id, token, message="SSO please"),
        400,
        "sso_requires_enterprise",
    )
    assert "Enterprise" in error["message"] and "sales" in error["message"]
    assert await db.fetchval("SELECT count(*) FROM sales_contact_requests") == 0
    assert await db.fetchval("SELECT count(*) FROM email_outbox WHERE kind = 'sales_contact'") == 0


@pytest.mark.parametrize("role", ["member", "billing_manager"])
async def test_only_owners_contact_sales(
    gateway: RunningGateway, client: aiohttp.ClientSession, seed: Seed, role: str
) -> None:
    """Members and billing managers of an enterprise org: 403 `insufficient_role`."""
    org_id = await seed.org(plan="enterprise")
    _user, token = await seed.member_with_key(org_id, role)
    reply = await contact_sales(client, gateway, org_id, token, message="hi")
    assert_error(reply, 403, "insufficient_role")
