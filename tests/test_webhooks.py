"""The Stripe webhook: signatures, exactly-once events, out-of-order deliveries, what each
event writes, and the proxy letting an organization through within a second of a purchase.

Events are signed with the stripe library's own helper, as Stripe signs them. The
gateway reads every subscription back from the fake Stripe, so a test first makes the
fake hold the state an event announces (`publish`), as Stripe would.
"""

from __future__ import annotations

import asyncio
import io
import json
import time
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Any

import aiohttp
import asyncpg
import pytest
import stripe

from gateway.accounts.webhooks import credit_payment, parse_event, related_subscription_id
from tests.conftest import RunningGateway
from tests.factories import Seed
from tests.fake_stripe import (
    WEBHOOK_SECRET,
    RunningFakeStripe,
    event_object,
    new_id,
    stripe_env,
    subscription_object,
)

EXPIRED = timedelta(days=40)
# The contract: a purchase takes effect on the proxy within one second of the webhook.
UNBLOCK_DEADLINE_SECONDS = 1.0
POLL_INTERVAL_SECONDS = 0.01
DAY_SECONDS = 86_400


async def deliver(
    client: aiohttp.ClientSession,
    gateway: RunningGateway,
    event: dict[str, Any],
    *,
    secret: str = WEBHOOK_SECRET,
    timestamp: int | None = None,
    signature: str | None = "sign",
) -> tuple[int, Any]:
    """POST the event as Stripe does, signed with `secret` at `timestamp`."""
    payload = json.dumps(event)
    headers = {"Content-Type": "application/json"}
    if signature == "sign":
        signature = stripe.WebhookSignature.generate_signature_header(payload, secret, timestamp)
    if signature is not None:
        headers["Stripe-Signature"] = signature
    async with client.post(
        gateway.url / "api/stripe/webhook", data=payload.encode(), headers=headers
    ) as response:
        return response.status, json.loads(await response.read())


async def publish(
    client: aiohttp.ClientSession,
    gateway: RunningGateway,
    stripe_server: RunningFakeStripe,
    event_type: str,
    subscription: dict[str, Any],
    *,
    created: float | None = None,
) -> tuple[int, Any]:
    """Stripe's side of a change: the subscription is now `subscription`, and the event
    announcing it is delivered."""
    stripe_server.state.add_subscription(subscription)
    event = event_object(event_type, subscription, created=created)
    return await deliver(client, gateway, event)


async def chat(
    client: aiohttp.ClientSession, gateway: RunningGateway, token: str
) -> tuple[int, str | None]:
    """A chat completion through the proxy: its status and refusal reason."""
    async with client.post(
        gateway.url / "api/openrouter/chat/completions",
        json={"model": "m"},
        headers={"Authorization": f"Bearer {token}"},
    ) as response:
        body = await response.read()
    return response.status, None if response.status == 200 else json.loads(body)["error_type"]


async def eventually(
    probe: Callable[[], Awaitable[Any]], expected: Any, deadline_seconds: float
) -> float:
    """Poll until `probe()` returns `expected`; the seconds it took, or fail at the deadline."""
    started = time.monotonic()
    while True:
        got = await probe()
        if got == expected:
            return time.monotonic() - started
        assert time.monotonic() - started < deadline_seconds, f"still {got}, wanted {expected}"
        await asyncio.sleep(POLL_INTERVAL_SECONDS)


async def purchases(db: asyncpg.Connection, org_id: str | None = None) -> list[asyncpg.Record]:
    """The seats purchases (of one organization), oldest first."""
    return await db.fetch(
        """SELECT * FROM organization_seats_purchases
           WHERE $1::uuid IS NULL OR organization_id = $1::uuid ORDER BY created_at, id""",
        org_id,
    )


async def count(db: asyncpg.Connection, table: str) -> int:
    value: int = await db.fetchval(f"SELECT count(*) FROM {table}")
    return value


async def assert_nothing_written(db: asyncpg.Connection) -> None:
    for table in ("stripe_events", "stripe_subscriptions", "organization_seats_purchases"):
        assert await count(db, table) == 0, table


# Signatures.


async def test_forged_signature_is_400_and_writes_nothing(
    billing_gateway: RunningGateway,
    client: aiohttp.ClientSession,
    seed: Seed,
    db: asyncpg.Connection,
) -> None:
    """An event signed with another secret is refused before anything is written."""
    event = event_object(
        "customer.subscription.created", subscription_object(organization_id=await seed.org())
    )
    status, body = await deliver(client, billing_gateway, event, secret="whsec_forged")
    assert (status, body["error_type"]) == (400, "invalid_signature")
    await assert_nothing_written(db)


async def test_tampered_body_is_400(
    billing_gateway: RunningGateway,
    client: aiohttp.ClientSession,
    seed: Seed,
    db: asyncpg.Connection,
) -> None:
    """A signature made for another body does not verify this one."""
    org_id = await seed.org()
    signed = json.dumps(
        event_object("customer.subscription.created", subscription_object(organization_id=org_id))
    )
    header = stripe.WebhookSignature.generate_signature_header(signed, WEBHOOK_SECRET)
    event = event_object(
        "customer.subscription.created", subscription_object(organization_id=org_id, quantity=999)
    )
    status, body = await deliver(client, billing_gateway, event, signature=header)
    assert (status, body["error_type"]) == (400, "invalid_signature")
    await assert_nothing_written(db)


async def test_stale_signature_is_400(
    billing_gateway: RunningGateway,
    client: aiohttp.ClientSession,
    seed: Seed,
    db: asyncpg.Connection,
) -> None:
    """A correctly signed event older than the 300 second tolerance is refused (replay)."""
    event = event_object(
        "customer.subscription.created", subscription_object(organization_id=await seed.org())
    )
    status, body = await deliver(client, billing_gateway, event, timestamp=int(time.time()) - 301)
    assert (status, body["error_type"]) == (400, "invalid_signature")
    await assert_nothing_written(db)


async def test_missing_signature_is_400(
    billing_gateway: RunningGateway,
    client: aiohttp.ClientSession,
    seed: Seed,
    db: asyncpg.Connection,
) -> None:
    """An event without a Stripe-Signature header is refused."""
    event = event_object(
        "customer.subscription.created", subscription_object(organization_id=await seed.org())
    )
    status, body = await deliver(client, billing_gateway, event, signature=None)
    assert (status, body["error_type"]) == (400, "invalid_signature")
    await assert_nothing_written(db)


async def test_signed_body_that_is_no_event_is_400(
    billing_gateway: RunningGateway, client: aiohttp.ClientSession, db: asyncpg.Connection
) -> None:
    """A verified body that is not a Stripe event is 400 invalid_payload."""
    status, body = await deliver(client, billing_gateway, {"object": "event", "id": "evt_1"})
    assert (status, body["error_type"]) == (400, "invalid_payload")
    await assert_nothing_written(db)


async def test_without_webhook_secret_is_503(
    gateway_factory: Callable[..., Any],
    stripe_server: RunningFakeStripe,
    client: aiohttp.ClientSession,
) -> None:
    """With a Stripe key but no STRIPE_WEBHOOK_SECRET events are 503, which Stripe retries."""
    gateway = await gateway_factory(**stripe_env(stripe_server, STRIPE_WEBHOOK_SECRET=""))
    status, body = await deliver(client, gateway, event_object("customer.created", {"id": "cus_1"}))
    assert (status, body["error_type"]) == (503, "billing_unavailable")
    assert "STRIPE_WEBHOOK_SECRET" in body["error"]["message"]


# Exactly once, in order.


async def test_duplicate_delivery_is_applied_once(
    billing_gateway: RunningGateway,
    client: aiohttp.ClientSession,
    seed: Seed,
    db: asyncpg.Connection,
    stripe_server: RunningFakeStripe,
) -> None:
    """The second delivery of an event id is answered 200 duplicate and changes nothing."""
    org_id = await seed.org()
    sub = subscription_object(organization_id=org_id)
    stripe_server.state.add_subscription(sub)
    event = event_object("customer.subscription.created", sub)
    assert await deliver(client, billing_gateway, event) == (200, {"received": True})
    assert await deliver(client, billing_gateway, event) == (
        200,
        {"received": True, "duplicate": True},
    )
    assert len(await purchases(db, org_id)) == 1
    assert await count(db, "stripe_events") == 1


async def test_older_event_delivered_late_applies_stripes_state(
    billing_gateway: RunningGateway,
    client: aiohttp.ClientSession,
    seed: Seed,
    db: asyncpg.Connection,
    stripe_server: RunningFakeStripe,
) -> None:
    """`created` (5 seats) delivered after the newer `updated` (9 seats): both read the
    subscription back from Stripe, which has 9, so 9 stays and nothing else is written."""
    org_id = await seed.org()
    now = int(time.time())
    sub = subscription_object(organization_id=org_id, quantity=5)
    newer = subscription_object(organization_id=org_id, quantity=9, subscription_id=sub["id"])
    stripe_server.state.add_subscription(newer)
    updated = event_object("customer.subscription.updated", newer, created=now)
    created = event_object("customer.subscription.created", sub, created=now - 5)
    assert (await deliver(client, billing_gateway, updated))[0] == 200
    assert (await deliver(client, billing_gateway, created))[0] == 200
    rows = await purchases(db, org_id)
    assert [r["seat_count"] for r in rows] == [9]
    clock = await db.fetchrow(
        "SELECT * FROM stripe_subscriptions WHERE subscription_id = $1", sub["id"]
    )
    assert clock["last_event_created_at"].timestamp() == now
    assert clock["version"] == 1  # the late one read the same state: nothing written
    assert await count(db, "stripe_events") == 2


async def test_each_change_writes_a_purchase_row(
    billing_gateway: RunningGateway,
    client: aiohttp.ClientSession,
    seed: Seed,
    db: asyncpg.Connection,
    stripe_server: RunningFakeStripe,
) -> None:
    """Changes in order each write a purchase row; the newest is the subscription's state."""
    org_id = await seed.org()
    now = int(time.time())
    sub = subscription_object(organization_id=org_id, quantity=5)
    more = subscription_object(organization_id=org_id, quantity=8, subscription_id=sub["id"])
    created = "customer.subscription.created"
    await publish(client, billing_gateway, stripe_server, created, sub, created=now - 5)
    updated = "customer.subscription.updated"
    await publish(client, billing_gateway, stripe_server, updated, more, created=now)
    rows = await purchases(db, org_id)
    assert [r["seat_count"] for r in rows] == [5, 8]
    assert rows[-1]["idempotency_key"].startswith("evt_")


# What subscription events write.


@pytest.mark.parametrize(
    ("stripe_status", "cancel_at_period_end", "interval", "expected_status", "expected_cycle"),
    [
        ("active", False, "year", "active", "yearly"),
        ("trialing", False, "year", "active", "yearly"),
        ("active", True, "year", "pending_cancel", "yearly"),
        ("past_due", False, "month", "past_due", "monthly"),
        ("canceled", False, "year", "ended", "yearly"),
        ("unpaid", False, "year", "ended", "yearly"),
        ("incomplete", False, "year", "ended", "yearly"),
        ("incomplete_expired", False, "year", "ended", "yearly"),
    ],
)
async def test_subscription_event_writes_the_mapped_purchase(
    billing_gateway: RunningGateway,
    client: aiohttp.ClientSession,
    seed: Seed,
    db: asyncpg.Connection,
    stripe_server: RunningFakeStripe,
    stripe_status: str,
    cancel_at_period_end: bool,
    interval: str,
    expected_status: str,
    expected_cycle: str,
) -> None:
    """Seats, cycle, status and period come from the subscription's seat item."""
    org_id = await seed.org()
    start = int(time.time()) - 60
    sub = subscription_object(
        organization_id=org_id,
        status=stripe_status,
        cancel_at_period_end=cancel_at_period_end,
        interval=interval,
        quantity=4,
        period_start=start,
        period_end=start + 1000,
    )
    stripe_server.state.add_subscription(sub)
    event = event_object("customer.subscription.updated", sub)
    assert (await deliver(client, billing_gateway, event))[0] == 200
    (row,) = await purchases(db, org_id)
    assert row["stripe_status"] == stripe_status
    assert row["subscription_status"] == expected_status
    assert row["billing_cycle"] == expected_cycle
    assert row["seat_count"] == 4
    assert row["subscription_stripe_id"] == sub["id"]
    assert (row["starts_at"].timestamp(), row["expires_at"].timestamp()) == (start, start + 1000)
    assert row["idempotency_key"] == event["id"]


async def test_organization_is_found_by_customer_without_metadata(
    billing_gateway: RunningGateway,
    client: aiohttp.ClientSession,
    seed: Seed,
    db: asyncpg.Connection,
    stripe_server: RunningFakeStripe,
) -> None:
    """A subscription without organization metadata belongs to the customer's organization."""
    org_id = await seed.org()
    await db.execute(
        "UPDATE organizations SET stripe_customer_id = 'cus_known' WHERE id = $1", org_id
    )
    sub = subscription_object(organization_id=None, customer="cus_known")
    created = "customer.subscription.created"
    assert (await publish(client, billing_gateway, stripe_server, created, sub))[0] == 200
    assert len(await purchases(db, org_id)) == 1


async def test_subscription_of_no_known_organization_is_only_recorded(
    billing_gateway: RunningGateway,
    client: aiohttp.ClientSession,
    db: asyncpg.Connection,
    stripe_server: RunningFakeStripe,
) -> None:
    """An event for nobody we know is answered 200 (so Stripe stops) and writes no purchase."""
    sub = subscription_object(
        organization_id="3f1c0f5e-0000-4000-8000-000000000000", customer="cus_x"
    )
    created = "customer.subscription.created"
    assert (await publish(client, billing_gateway, stripe_server, created, sub))[0] == 200
    assert await count(db, "stripe_events") == 1
    assert await purchases(db) == []


async def test_ended_subscription_leaves_another_that_pays(
    billing_gateway: RunningGateway,
    client: aiohttp.ClientSession,
    seed: Seed,
    db: asyncpg.Connection,
    stripe_server: RunningFakeStripe,
) -> None:
    """A late cancellation of an old subscription ends that one only: the org's other,
    paying subscription still lets its member through."""
    org_id, token = await expired_org_with_member(seed)
    paying = await seed.purchase(org_id, seat_count=3)
    old = subscription_object(organization_id=org_id, status="canceled")
    deleted = "customer.subscription.deleted"
    assert (await publish(client, billing_gateway, stripe_server, deleted, old))[0] == 200
    rows = await purchases(db, org_id)
    assert [(str(r["id"]) == paying, r["subscription_status"]) for r in rows] == [
        (True, "active"),
        (False, "ended"),
    ]
    assert await chat(client, billing_gateway, token) == (200, None)


async def test_other_event_types_are_recorded(
    billing_gateway: RunningGateway, client: aiohttp.ClientSession, db: asyncpg.Connection
) -> None:
    """An event type the gateway does not handle is recorded and answered 200."""
    event = event_object("customer.created", {"id": "cus_1", "object": "customer"})
    assert await deliver(client, billing_gateway, event) == (200, {"received": True})
    assert (
        await db.fetchval("SELECT type FROM stripe_events WHERE id = $1", event["id"])
        == "customer.created"
    )


async def test_unhandled_event_types_are_logged_at_debug(
    billing_gateway: RunningGateway,
    client: aiohttp.ClientSession,
    seed: Seed,
    stripe_server: RunningFakeStripe,
    log_stream: io.StringIO,
) -> None:
    """Stripe sends many types the gateway does not handle: their line is at debug, so an
    info log shows only the events that did something (those stay at info)."""
    other = event_object("customer.created", {"id": "cus_1", "object": "customer"})
    assert (await deliver(client, billing_gateway, other))[0] == 200
    sub = subscription_object(organization_id=await seed.org())
    created = "customer.subscription.created"
    status, _ = await publish(client, billing_gateway, stripe_server, created, sub)
    assert status == 200
    lines = [json.loads(line) for line in log_stream.getvalue().splitlines() if line[:1] == "{"]
    levels = {
        line["event_type"]: line["level"] for line in lines if line.get("event") == "stripe_event"
    }
    assert levels == {"customer.created": "debug", created: "info"}


async def test_unexpected_failure_is_500_and_rolls_back(
    billing_gateway: RunningGateway,
    client: aiohttp.ClientSession,
    seed: Seed,
    db: asyncpg.Connection,
    stripe_server: RunningFakeStripe,
) -> None:
    """A subscription Stripe would never send fails with 500, and the event id is not kept."""
    sub = subscription_object(organization_id=await seed.org())
    sub["items"]["data"][0].pop("current_period_end")
    created = "customer.subscription.created"
    status, body = await publish(client, billing_gateway, stripe_server, created, sub)
    assert (status, body["error_type"]) == (500, "internal_error")
    await assert_nothing_written(db)


# Events that name a subscription: it is read back from Stripe.


async def test_completed_subscription_checkout_applies_the_subscription_read_back(
    billing_gateway: RunningGateway,
    client: aiohttp.ClientSession,
    seed: Seed,
    db: asyncpg.Connection,
    stripe_server: RunningFakeStripe,
) -> None:
    """checkout.session.completed reads the subscription from Stripe and applies it."""
    org_id = await seed.org()
    sub = subscription_object(organization_id=None, quantity=6)
    stripe_server.state.add_subscription(sub)
    session = {
        "id": new_id("cs"),
        "object": "checkout.session",
        "mode": "subscription",
        "client_reference_id": org_id,
        "metadata": {"organization_id": org_id},
        "subscription": sub["id"],
        "payment_status": "paid",
    }
    assert (
        await deliver(client, billing_gateway, event_object("checkout.session.completed", session))
    )[0] == 200
    assert [r["seat_count"] for r in await purchases(db, org_id)] == [6]
    assert stripe_server.state.requests_to("GET", f"/v1/subscriptions/{sub['id']}")


async def test_invoice_paid_extends_expiry(
    billing_gateway: RunningGateway,
    client: aiohttp.ClientSession,
    seed: Seed,
    db: asyncpg.Connection,
    stripe_server: RunningFakeStripe,
) -> None:
    """A renewal's invoice.paid re-reads the subscription, whose period now ends a year later."""
    org_id = await seed.org()
    now = int(time.time())
    sub = subscription_object(
        organization_id=org_id, period_start=now - 365 * DAY_SECONDS, period_end=now + 60
    )
    created = "customer.subscription.created"
    await publish(client, billing_gateway, stripe_server, created, sub, created=now - 10)
    renewed = subscription_object(
        organization_id=org_id,
        subscription_id=sub["id"],
        period_start=now + 60,
        period_end=now + 60 + 365 * DAY_SECONDS,
    )
    stripe_server.state.add_subscription(renewed)
    invoice = {
        "id": new_id("in"),
        "object": "invoice",
        "status": "paid",
        "parent": {
            "type": "subscription_details",
            "subscription_details": {"subscription": sub["id"]},
        },
    }
    assert (
        await deliver(client, billing_gateway, event_object("invoice.paid", invoice, created=now))
    )[0] == 200
    rows = await purchases(db, org_id)
    assert rows[-1]["expires_at"].timestamp() == now + 60 + 365 * DAY_SECONDS


async def test_invoice_payment_failed_marks_past_due(
    billing_gateway: RunningGateway,
    client: aiohttp.ClientSession,
    seed: Seed,
    db: asyncpg.Connection,
    stripe_server: RunningFakeStripe,
) -> None:
    """invoice.payment_failed (older API shape: `subscription` on the invoice) applies past_due."""
    org_id = await seed.org()
    sub = subscription_object(organization_id=org_id, status="past_due")
    stripe_server.state.add_subscription(sub)
    invoice = {"id": new_id("in"), "object": "invoice", "subscription": sub["id"]}
    assert (
        await deliver(client, billing_gateway, event_object("invoice.payment_failed", invoice))
    )[0] == 200
    assert [r["subscription_status"] for r in await purchases(db, org_id)] == ["past_due"]


async def test_stripe_failure_while_reading_back_is_retried_cleanly(
    billing_gateway: RunningGateway,
    client: aiohttp.ClientSession,
    seed: Seed,
    db: asyncpg.Connection,
    stripe_server: RunningFakeStripe,
) -> None:
    """When Stripe cannot be read the event fails (Stripe retries) and the retry applies it."""
    org_id = await seed.org()
    sub = subscription_object(organization_id=org_id)
    stripe_server.state.add_subscription(sub)
    event = event_object(
        "invoice.paid", {"id": new_id("in"), "object": "invoice", "subscription": sub["id"]}
    )
    stripe_server.state.fail_next(400, "invalid_request_error", "Something is wrong")
    status, body = await deliver(client, billing_gateway, event)
    assert (status, body["error_type"]) == (502, "billing_provider_error")
    await assert_nothing_written(db)
    assert await deliver(client, billing_gateway, event) == (200, {"received": True})
    assert len(await purchases(db, org_id)) == 1


# Credits.


def credits_session(org_id: str, amount_microdollars: int, *, paid: bool = True) -> dict[str, Any]:
    """A completed payment-mode Checkout Session buying credits, as Stripe sends it."""
    return {
        "id": new_id("cs"),
        "object": "checkout.session",
        "mode": "payment",
        "client_reference_id": org_id,
        "payment_status": "paid" if paid else "unpaid",
        "payment_intent": new_id("pi"),
        "amount_total": amount_microdollars // 10_000,
        "metadata": {
            "organization_id": org_id,
            "kind": "credits",
            "amount_microdollars": str(amount_microdollars),
        },
    }


async def balance(db: asyncpg.Connection, org_id: str) -> int:
    value: int = await db.fetchval(
        """SELECT credits_acquired_microdollars - credits_used_microdollars
           FROM organizations WHERE id = $1""",
        org_id,
    )
    return value


async def test_credits_payment_delivered_twice_credits_once(
    billing_gateway: RunningGateway,
    client: aiohttp.ClientSession,
    seed: Seed,
    db: asyncpg.Connection,
) -> None:
    """The same payment, redelivered or reported by a second event, is one ledger row."""
    org_id = await seed.org()
    before = await balance(db, org_id)
    session = credits_session(org_id, 50_000_000)
    completed = event_object("checkout.session.completed", session)
    assert await deliver(client, billing_gateway, completed) == (200, {"received": True})
    assert (await deliver(client, billing_gateway, completed))[1]["duplicate"] is True
    late = event_object("checkout.session.async_payment_succeeded", session)
    assert await deliver(client, billing_gateway, late) == (200, {"received": True})
    assert await balance(db, org_id) == before + 50_000_000
    rows = await db.fetch("SELECT * FROM credit_transactions WHERE stripe_payment_id IS NOT NULL")
    assert [(r["amount_microdollars"], r["stripe_payment_id"]) for r in rows] == [
        (50_000_000, session["payment_intent"])
    ]


async def test_unpaid_credits_checkout_credits_nothing(
    billing_gateway: RunningGateway,
    client: aiohttp.ClientSession,
    seed: Seed,
    db: asyncpg.Connection,
) -> None:
    """A completed checkout whose payment is still pending adds no credits yet."""
    org_id = await seed.org()
    before = await balance(db, org_id)
    event = event_object(
        "checkout.session.completed", credits_session(org_id, 9_000_000, paid=False)
    )
    assert (await deliver(client, billing_gateway, event))[0] == 200
    assert await balance(db, org_id) == before


# End to end through the proxy.


async def expired_org_with_member(seed: Seed, *, members: int = 1) -> tuple[str, str]:
    """An organization whose trial ended, and a member's token."""
    org_id = await seed.org(age=EXPIRED)
    await seed.member_with_key(org_id, "owner")
    token = ""
    for _ in range(members):
        _, token = await seed.member_with_key(org_id, "member")
    return org_id, token


async def test_yearly_purchase_unblocks_an_expired_org_within_a_second(
    billing_gateway: RunningGateway,
    client: aiohttp.ClientSession,
    seed: Seed,
    stripe_server: RunningFakeStripe,
) -> None:
    """402 trial_expired, then a signed subscription.created: the proxy serves within 1 s."""
    org_id, token = await expired_org_with_member(seed)
    assert await chat(client, billing_gateway, token) == (402, "trial_expired")
    sub = subscription_object(organization_id=org_id, quantity=2)
    created = "customer.subscription.created"
    assert (await publish(client, billing_gateway, stripe_server, created, sub))[0] == 200
    await eventually(
        lambda: chat(client, billing_gateway, token), (200, None), UNBLOCK_DEADLINE_SECONDS
    )


async def test_cancellation_after_expiry_blocks_again(
    billing_gateway: RunningGateway,
    client: aiohttp.ClientSession,
    seed: Seed,
    stripe_server: RunningFakeStripe,
) -> None:
    """A deleted (canceled) subscription whose period is over blocks: subscription_inactive."""
    org_id, token = await expired_org_with_member(seed)
    now = int(time.time())
    sub = subscription_object(organization_id=org_id, quantity=2)
    created = "customer.subscription.created"
    await publish(client, billing_gateway, stripe_server, created, sub, created=now - 10)
    await eventually(
        lambda: chat(client, billing_gateway, token), (200, None), UNBLOCK_DEADLINE_SECONDS
    )
    canceled = subscription_object(
        organization_id=org_id,
        subscription_id=sub["id"],
        status="canceled",
        quantity=2,
        period_start=now - 365 * DAY_SECONDS,
        period_end=now - 1,
    )
    deleted = "customer.subscription.deleted"
    status, _ = await publish(client, billing_gateway, stripe_server, deleted, canceled)
    assert status == 200
    await eventually(
        lambda: chat(client, billing_gateway, token),
        (402, "subscription_inactive"),
        UNBLOCK_DEADLINE_SECONDS,
    )


async def test_pending_cancel_stays_allowed_until_expires_at(
    billing_gateway: RunningGateway,
    client: aiohttp.ClientSession,
    seed: Seed,
    stripe_server: RunningFakeStripe,
) -> None:
    """Cancelling at period end keeps access until the period ends, then blocks."""
    org_id, token = await expired_org_with_member(seed)
    period_end = int(time.time()) + 2
    sub = subscription_object(
        organization_id=org_id, quantity=2, cancel_at_period_end=True, period_end=period_end
    )
    updated = "customer.subscription.updated"
    assert (await publish(client, billing_gateway, stripe_server, updated, sub))[0] == 200
    await eventually(
        lambda: chat(client, billing_gateway, token), (200, None), UNBLOCK_DEADLINE_SECONDS
    )
    await eventually(
        lambda: chat(client, billing_gateway, token), (402, "subscription_inactive"), 5.0
    )
    assert time.time() >= period_end


async def test_fewer_seats_than_members_is_seats_exceeded(
    billing_gateway: RunningGateway,
    client: aiohttp.ClientSession,
    seed: Seed,
    stripe_server: RunningFakeStripe,
) -> None:
    """A yearly purchase for fewer seats than members refuses with seats_exceeded."""
    org_id, token = await expired_org_with_member(seed, members=2)  # owner + 2 members
    sub = subscription_object(organization_id=org_id, quantity=2)
    created = "customer.subscription.created"
    assert (await publish(client, billing_gateway, stripe_server, created, sub))[0] == 200
    await eventually(
        lambda: chat(client, billing_gateway, token),
        (402, "seats_exceeded"),
        UNBLOCK_DEADLINE_SECONDS,
    )


# The pure parts.


def test_related_subscription_of_each_event_type() -> None:
    """Subscription events, checkouts in subscription mode and invoices (both API shapes)
    name the subscription to read back; other events none."""
    changed = [
        event_object(kind, {"id": "sub_0", "object": "subscription"})
        for kind in (
            "customer.subscription.created",
            "customer.subscription.updated",
            "customer.subscription.deleted",
        )
    ]
    customer = event_object("customer.created", {"id": "cus_1", "object": "customer"})
    checkout = event_object(
        "checkout.session.completed", {"mode": "subscription", "subscription": "sub_1"}
    )
    payment = event_object("checkout.session.completed", {"mode": "payment", "subscription": None})
    old_invoice = event_object("invoice.paid", {"subscription": "sub_2"})
    new_invoice = event_object(
        "invoice.payment_failed", {"parent": {"subscription_details": {"subscription": "sub_3"}}}
    )
    one_off = event_object("invoice.paid", {"parent": None})
    expected = ["sub_0"] * 3 + [None, "sub_1", None, "sub_2", "sub_3", None]
    events = [*changed, customer, checkout, payment, old_invoice, new_invoice, one_off]
    assert [related_subscription_id(parse_event(e)) for e in events] == expected


@pytest.mark.parametrize(
    ("change", "credited"),
    [
        ({}, True),
        ({"payment_status": "unpaid"}, False),
        ({"mode": "subscription"}, False),
        (
            {"metadata": {"kind": "credits", "amount_microdollars": "5000000"}},
            True,
        ),  # via client ref
        (
            {"metadata": {"organization_id": "x", "kind": "credits", "amount_microdollars": "1"}},
            True,
        ),
        ({"metadata": {"kind": "other"}}, False),
        ({"metadata": {"kind": "credits", "amount_microdollars": "-5"}}, False),
        ({"metadata": {"kind": "credits", "amount_microdollars": "ten"}}, False),
    ],
)
def test_credit_payment_only_for_paid_credits_checkouts(
    change: dict[str, Any], credited: bool
) -> None:
    """Only a paid payment-mode checkout of kind credits with a positive amount credits."""
    org_id = "0b6f8a52-2d6b-4c1e-9a53-1f1f3c6f6a10"
    session = {**credits_session(org_id, 5_000_000), **change}
    payment = credit_payment(parse_event(event_object("checkout.session.completed", session)))
    assert (payment is not None) == credited
    if payment is not None:
        assert payment.organization_id == org_id
        assert payment.payment_id == session["payment_intent"]
