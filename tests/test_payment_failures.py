"""Failed payments end to end: `invoice.payment_failed` emails the owners and billing
managers once per invoice, the proxy serves through PAST_DUE_GRACE_DAYS and then refuses
with 402 payment_failed, and `invoice.paid` lets everyone through again at once.

A real gateway, real PostgreSQL, the fake Stripe (which holds each subscription as Stripe
would; the gateway reads it back on every event), real webhook signing and a real SMTP
server behind the outbox.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any

import aiohttp
import asyncpg
import pytest

from tests.accounts import (
    APP_URL,
    FAST_EMAIL,
    Mailbox,
    api,
    assert_error,
    eventually,
    running_mailbox,
)
from tests.conftest import RunningGateway
from tests.factories import Seed
from tests.fake_stripe import (
    FakeStripe,
    RunningFakeStripe,
    event_object,
    new_id,
    stripe_env,
    subscription_object,
)
from tests.test_webhooks import chat, deliver, purchases

DAY = 86_400
GRACE_DAYS = 14
# A change takes effect on the proxy within a second of its webhook.
DEADLINE_SECONDS = 1.0
FAILED = "invoice.payment_failed"


@pytest.fixture
def mailbox() -> Iterator[Mailbox]:
    yield from running_mailbox()


@pytest.fixture
async def billing_gateway(
    gateway_factory: Callable[..., Any], stripe_server: RunningFakeStripe, mailbox: Mailbox
) -> RunningGateway:
    """A gateway with Stripe, its webhook secret and an SMTP server."""
    env = {**stripe_env(stripe_server), "SMTP_URL": mailbox.url, **FAST_EMAIL}
    gateway: RunningGateway = await gateway_factory(**env)
    return gateway


class Org:
    """A paying organization past its trial: an owner, a billing manager and a member."""

    def __init__(self, org_id: str, owner_token: str, member_token: str, tag: str) -> None:
        self.id, self.owner_token, self.member_token = org_id, owner_token, member_token
        self.owner = f"own-{tag}@example.test"
        self.billing_manager = f"pay-{tag}@example.test"
        self.member = f"use-{tag}@example.test"


async def paying_org(seed: Seed) -> Org:
    org_id = await seed.org(age=timedelta(days=40))
    tag = org_id[:8]
    tokens = {}
    for role, prefix in (("owner", "own"), ("billing_manager", "pay"), ("member", "use")):
        user_id = await seed.user(f"{prefix}-{tag}@example.test")
        await seed.member(org_id, user_id, role)
        tokens[role] = await seed.key(user_id)
    return Org(org_id, tokens["owner"], tokens["member"], tag)


def invoice(subscription_id: str, invoice_id: str | None = None) -> dict[str, Any]:
    """An invoice of the subscription, as the event carries it (only its ids are read)."""
    details = {"subscription": subscription_id}
    return {
        "id": invoice_id or new_id("in"),
        "object": "invoice",
        "parent": {"type": "subscription_details", "subscription_details": details},
    }


async def subscribed(
    client: aiohttp.ClientSession,
    gateway: RunningGateway,
    stripe: RunningFakeStripe,
    org: Org,
) -> dict[str, Any]:
    """The organization pays for 3 seats: its subscription, applied and serving."""
    sub = subscription_object(organization_id=org.id, quantity=3)
    stripe.state.add_subscription(sub)
    event = event_object("customer.subscription.created", sub, created=time.time() - 60)
    assert (await deliver(client, gateway, event))[0] == 200
    await eventually(lambda: chat(client, gateway, org.member_token), (200, None))
    return sub


def renewal_failed(stripe: FakeStripe, sub: dict[str, Any], *, period_start: float) -> None:
    """Stripe's side of a failed renewal: the period moved on, the subscription past_due."""
    item = stripe.subscriptions[sub["id"]]["items"]["data"][0]
    item["current_period_start"] = int(period_start)
    item["current_period_end"] = int(period_start) + 365 * DAY
    stripe.update_subscription(sub["id"], status="past_due")


async def failure_emails(db: asyncpg.Connection, org_id: str) -> list[asyncpg.Record]:
    return await db.fetch(
        "SELECT * FROM email_outbox WHERE organization_id = $1::uuid AND kind = 'payment_failed'",
        org_id,
    )


async def call_to_action(
    client: aiohttp.ClientSession, gateway: RunningGateway, org: Org
) -> dict[str, Any]:
    reply = await api(client, gateway, "GET", f"/api/organizations/{org.id}", token=org.owner_token)
    assert reply.status == 200, reply.body
    action: dict[str, Any] = reply.body["call_to_action"]
    return action


async def test_failed_payment_emails_owners_and_billing_managers_once_per_invoice(
    billing_gateway: RunningGateway,
    client: aiohttp.ClientSession,
    seed: Seed,
    db: asyncpg.Connection,
    stripe_server: RunningFakeStripe,
    mailbox: Mailbox,
) -> None:
    """The event delivered twice and Stripe's retry failing again (another event, the same
    invoice): one email, to the owner and the billing manager, with the billing page; the
    proxy keeps serving in the grace."""
    org = await paying_org(seed)
    sub = await subscribed(client, billing_gateway, stripe_server, org)
    renewal_failed(stripe_server.state, sub, period_start=time.time() - 10)
    bill = invoice(sub["id"])
    first = event_object(FAILED, bill)
    assert await deliver(client, billing_gateway, first) == (200, {"received": True})
    assert (await deliver(client, billing_gateway, first))[1]["duplicate"] is True
    retried = event_object(FAILED, bill, created=time.time() + 1)
    assert await deliver(client, billing_gateway, retried) == (200, {"received": True})

    [row] = await failure_emails(db, org.id)
    assert row["dedupe_key"] == f"payment_failed:{bill['id']}"
    [received] = await mailbox.wait_for(lambda m: "Payment failed" in m.subject)
    assert sorted(received.rcpt_tos) == sorted([org.owner, org.billing_manager])
    assert f"{APP_URL}/organizations/{org.id}/billing" in received.body
    assert "declined" in received.body
    # Sent once: the row is marked sent, and no second message follows it.
    sent = "SELECT sent_at IS NOT NULL FROM email_outbox WHERE id = $1"
    await eventually(lambda: db.fetchval(sent, row["id"]), True)
    assert len(mailbox.matching(lambda m: "Payment failed" in m.subject)) == 1
    assert await chat(client, billing_gateway, org.member_token) == (200, None)
    action = await call_to_action(client, billing_gateway, org)
    assert (action["level"], action["reason"]) == ("blocking", "payment_failed")


async def test_a_second_failed_invoice_is_announced_too(
    billing_gateway: RunningGateway,
    client: aiohttp.ClientSession,
    seed: Seed,
    db: asyncpg.Connection,
    stripe_server: RunningFakeStripe,
) -> None:
    """Each failed invoice is announced once: another invoice failing is another email."""
    org = await paying_org(seed)
    sub = await subscribed(client, billing_gateway, stripe_server, org)
    renewal_failed(stripe_server.state, sub, period_start=time.time() - 10)
    for bill in (invoice(sub["id"]), invoice(sub["id"])):
        assert (await deliver(client, billing_gateway, event_object(FAILED, bill)))[0] == 200
    assert len(await failure_emails(db, org.id)) == 2


async def test_grace_over_is_402_payment_failed_and_a_paid_invoice_restores_at_once(
    billing_gateway: RunningGateway,
    client: aiohttp.ClientSession,
    seed: Seed,
    stripe_server: RunningFakeStripe,
) -> None:
    """A failure 15 days ago (the default grace is 14): 402 payment_failed, in the 402
    envelope, ending with the billing link; invoice.paid serves within a second and
    clears the call to action."""
    org = await paying_org(seed)
    sub = await subscribed(client, billing_gateway, stripe_server, org)
    failed_at = time.time() - (GRACE_DAYS + 1) * DAY
    renewal_failed(stripe_server.state, sub, period_start=failed_at)
    event = event_object(FAILED, invoice(sub["id"]), created=failed_at)
    assert (await deliver(client, billing_gateway, event))[0] == 200
    await eventually(
        lambda: chat(client, billing_gateway, org.member_token), (402, "payment_failed")
    )
    reply = await api(
        client,
        billing_gateway,
        "POST",
        "/api/openrouter/chat/completions",
        token=org.member_token,
        body={"model": "m"},
    )
    error = assert_error(reply, 402, "payment_failed")
    link = f"{APP_URL}/organizations/{org.id}/billing"
    assert (error["title"], error["buyCreditsUrl"]) == ("Your payment failed", link)
    assert "declined" in error["message"] and error["message"].endswith(f" {link}")
    assert error["metadata"]["seats_purchased"] == 0
    action = await call_to_action(client, billing_gateway, org)
    assert (action["level"], action["reason"]) == ("blocking", "payment_failed")

    stripe_server.state.update_subscription(sub["id"], status="active")
    paid = event_object("invoice.paid", invoice(sub["id"]))
    assert (await deliver(client, billing_gateway, paid))[0] == 200
    await eventually(
        lambda: chat(client, billing_gateway, org.member_token), (200, None), DEADLINE_SECONDS
    )
    action = await call_to_action(client, billing_gateway, org)
    assert (action["level"], action["reason"]) == ("none", None)


async def test_grace_holds_after_the_period_end_while_stripe_retries(
    billing_gateway: RunningGateway,
    client: aiohttp.ClientSession,
    seed: Seed,
    db: asyncpg.Connection,
    stripe_server: RunningFakeStripe,
) -> None:
    """The renewal failed and the row still has the period that ended a minute ago: the
    grace counts from the failure, so the proxy keeps serving."""
    org = await paying_org(seed)
    now = time.time()
    sub = subscription_object(
        organization_id=org.id,
        status="past_due",
        quantity=3,
        period_start=now - 365 * DAY,
        period_end=now - 60,
    )
    stripe_server.state.add_subscription(sub)
    event = event_object(FAILED, invoice(sub["id"]), created=now - 30)
    assert (await deliver(client, billing_gateway, event))[0] == 200
    [row] = await purchases(db, org.id)
    assert row["subscription_status"] == "past_due"
    assert row["payment_failed_at"].timestamp() == int(now - 30)
    assert await chat(client, billing_gateway, org.member_token) == (200, None)


async def test_retries_keep_the_first_failure_instant(
    billing_gateway: RunningGateway,
    client: aiohttp.ClientSession,
    seed: Seed,
    db: asyncpg.Connection,
    stripe_server: RunningFakeStripe,
) -> None:
    """Stripe's later retries, and other updates while past_due, never move the failure
    instant on: the grace is counted from the first."""
    org = await paying_org(seed)
    sub = await subscribed(client, billing_gateway, stripe_server, org)
    first = time.time() - 3 * DAY
    renewal_failed(stripe_server.state, sub, period_start=first)
    bill = invoice(sub["id"])
    for created in (first, first + DAY, first + 2 * DAY):
        event = event_object(FAILED, bill, created=created)
        assert (await deliver(client, billing_gateway, event))[0] == 200
    stripe_server.state.update_subscription(sub["id"], quantity=4)
    updated = event_object(
        "customer.subscription.updated", stripe_server.state.subscriptions[sub["id"]]
    )
    assert (await deliver(client, billing_gateway, updated))[0] == 200
    rows = await purchases(db, org.id)
    assert [r["seat_count"] for r in rows] == [3, 3, 4]
    assert rows[-1]["payment_failed_at"].timestamp() == int(first)
    assert rows[-2]["payment_failed_at"] == rows[-1]["payment_failed_at"]


async def test_failure_announced_after_the_invoice_was_paid_sends_nothing(
    billing_gateway: RunningGateway,
    client: aiohttp.ClientSession,
    seed: Seed,
    db: asyncpg.Connection,
    stripe_server: RunningFakeStripe,
) -> None:
    """A late invoice.payment_failed, delivered once Stripe's retry succeeded: the
    subscription read back is active, so no email and no failure."""
    org = await paying_org(seed)
    sub = await subscribed(client, billing_gateway, stripe_server, org)
    event = event_object(FAILED, invoice(sub["id"]), created=time.time() - 3600)
    assert (await deliver(client, billing_gateway, event))[0] == 200
    assert await failure_emails(db, org.id) == []
    assert [r["payment_failed_at"] for r in await purchases(db, org.id)] == [None]
