"""Subscriptions end to end, through the webhook and the proxy: several live subscriptions
add their seats, one of another product grants nothing, events in any order and in one
second end in Stripe's state, and paying during the trial keeps its free days and caps
invitations at once.

A real gateway, real PostgreSQL and the fake Stripe, which holds each subscription as
Stripe would; the gateway reads it back on every event (`publish` changes it, then
delivers the event announcing the change).
"""

from __future__ import annotations

import asyncio
import dataclasses
import io
import json
import math
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
import asyncpg
import pytest

from gateway.access.refusals import iso_utc
from gateway.accounts.stripe_subscriptions import (
    ConcurrentUpdate,
    SubscriptionState,
    apply_subscription,
    subscription_state,
    subscription_version,
)
from gateway.plans import load_catalog
from tests.accounts import api, assert_error, eventually
from tests.conftest import RunningGateway
from tests.factories import Seed
from tests.fake_stripe import (
    RunningFakeStripe,
    add_catalog_prices,
    event_object,
    stripe_env,
    subscription_object,
)
from tests.test_webhooks import chat, deliver, purchases

CATALOG = load_catalog()
EXPIRED = timedelta(days=40)
# A purchase takes effect on the proxy within a second of its webhook.
DEADLINE_SECONDS = 1.0
CREATED = "customer.subscription.created"
UPDATED = "customer.subscription.updated"
DELETED = "customer.subscription.deleted"


@pytest.fixture
async def billing_gateway(
    gateway_factory: Callable[..., Any], stripe_server: RunningFakeStripe
) -> RunningGateway:
    add_catalog_prices(stripe_server.state, CATALOG)
    gateway: RunningGateway = await gateway_factory(**stripe_env(stripe_server))
    return gateway


class Stripe:
    """Stripe's side of a test: change a subscription, then deliver the event announcing it."""

    def __init__(
        self, server: RunningFakeStripe, client: aiohttp.ClientSession, gateway: RunningGateway
    ) -> None:
        self.state = server.state
        self.client = client
        self.gateway = gateway

    async def publish(self, event_type: str, subscription: dict[str, Any]) -> None:
        """The subscription is now `subscription`; its event is delivered and accepted."""
        self.state.add_subscription(subscription)
        await self.deliver(event_object(event_type, subscription))

    async def deliver(self, event: dict[str, Any]) -> None:
        status, body = await deliver(self.client, self.gateway, event)
        assert status == 200, body


@pytest.fixture
def stripe(
    stripe_server: RunningFakeStripe, client: aiohttp.ClientSession, billing_gateway: RunningGateway
) -> Stripe:
    return Stripe(stripe_server, client, billing_gateway)


async def expired_org(seed: Seed, *, seats_used: int) -> tuple[str, str]:
    """An organization past its trial with an owner and members, `seats_used` in all; the
    owner's token."""
    org_id = await seed.org(age=EXPIRED)
    _, token = await seed.member_with_key(org_id, "owner")
    for _ in range(seats_used - 1):
        await seed.member_with_key(org_id, "member")
    return org_id, token


async def becomes(
    client: aiohttp.ClientSession, gateway: RunningGateway, token: str, expected: Any
) -> None:
    await eventually(lambda: chat(client, gateway, token), expected, DEADLINE_SECONDS)


async def org_status(
    client: aiohttp.ClientSession, gateway: RunningGateway, org_id: str, token: str
) -> Any:
    reply = await api(client, gateway, "GET", f"/api/organizations/{org_id}", token=token)
    assert reply.status == 200, reply.body
    return reply.body


# Several subscriptions.


async def test_two_live_subscriptions_add_their_seats(
    stripe: Stripe,
    client: aiohttp.ClientSession,
    billing_gateway: RunningGateway,
    seed: Seed,
) -> None:
    """An org paying 3 + 6 seats for 9 members is let through; an update to the 3-seat
    subscription (its seats unchanged) does not make it judge that one alone."""
    org_id, token = await expired_org(seed, seats_used=9)
    three = subscription_object(organization_id=org_id, quantity=3)
    six = subscription_object(organization_id=org_id, quantity=6)
    await stripe.publish(CREATED, three)
    await becomes(client, billing_gateway, token, (402, "seats_exceeded"))
    await stripe.publish(CREATED, six)
    await becomes(client, billing_gateway, token, (200, None))
    renamed = stripe.state.update_subscription(three["id"], description="Acme, team A")
    await stripe.deliver(event_object(UPDATED, renamed))
    assert await chat(client, billing_gateway, token) == (200, None)
    status = await org_status(client, billing_gateway, org_id, token)
    assert (status["seats"]["used"], status["seats"]["purchased"]) == (9, 9)


async def test_cancelling_one_of_two_leaves_the_other_paying(
    stripe: Stripe,
    client: aiohttp.ClientSession,
    billing_gateway: RunningGateway,
    seed: Seed,
) -> None:
    """5 members, subscriptions of 3 and 6 seats: the 3-seat one ends and the 6 still
    cover everyone; once the other ends too, the org is refused."""
    org_id, token = await expired_org(seed, seats_used=5)
    three = subscription_object(organization_id=org_id, quantity=3)
    six = subscription_object(organization_id=org_id, quantity=6)
    await stripe.publish(CREATED, three)
    await stripe.publish(CREATED, six)
    await becomes(client, billing_gateway, token, (200, None))
    ended_at = int(time.time()) - 1
    for subscription in (three, six):
        canceled = stripe.state.update_subscription(
            subscription["id"], status="canceled", ended_at=ended_at
        )
        await stripe.deliver(event_object(DELETED, canceled))
        if subscription is three:
            assert await chat(client, billing_gateway, token) == (200, None)
    await becomes(client, billing_gateway, token, (402, "subscription_inactive"))


async def test_subscription_to_another_product_grants_nothing(
    stripe: Stripe,
    client: aiohttp.ClientSession,
    billing_gateway: RunningGateway,
    seed: Seed,
    db: asyncpg.Connection,
    log_stream: io.StringIO,
) -> None:
    """50 seats of a price that is not ours: no purchase, still trial_expired, and a
    warning naming the subscription and its price."""
    org_id, token = await expired_org(seed, seats_used=2)
    foreign = subscription_object(organization_id=org_id, quantity=50, lookup_key=None)
    await stripe.publish(CREATED, foreign)
    assert await purchases(db, org_id) == []
    assert await chat(client, billing_gateway, token) == (402, "trial_expired")
    warnings = [
        line
        for line in map(json.loads, log_stream.getvalue().splitlines())
        if line.get("event") == "stripe_subscription_not_ours"
    ]
    assert [(w["level"], w["subscription_id"], w["outcome"]) for w in warnings] == [
        ("warning", foreign["id"], "not_ours")
    ]
    assert warnings[0]["prices"] == [
        {"id": foreign["items"]["data"][0]["price"]["id"], "lookup_key": None}
    ]


async def test_subscription_moved_to_another_product_stops_granting(
    stripe: Stripe,
    client: aiohttp.ClientSession,
    billing_gateway: RunningGateway,
    seed: Seed,
    db: asyncpg.Connection,
) -> None:
    """A subscription of ours whose item changes to a price that is not ours is ended."""
    org_id, token = await expired_org(seed, seats_used=2)
    ours = subscription_object(organization_id=org_id, quantity=5)
    await stripe.publish(CREATED, ours)
    await becomes(client, billing_gateway, token, (200, None))
    other = subscription_object(organization_id=None, lookup_key=None)["items"]["data"][0]
    moved = stripe.state.update_subscription(ours["id"])
    moved["items"]["data"][0]["price"] = other["price"]
    await stripe.publish(UPDATED, moved)
    await becomes(client, billing_gateway, token, (402, "subscription_inactive"))
    assert [r["subscription_status"] for r in await purchases(db, org_id)] == ["active", "ended"]


# Order.


async def test_same_second_updates_out_of_order_end_in_stripes_state(
    stripe: Stripe,
    client: aiohttp.ClientSession,
    billing_gateway: RunningGateway,
    seed: Seed,
    db: asyncpg.Connection,
) -> None:
    """Two updates in one second (4 seats, then 5) delivered newest first: the older one,
    though its timestamp is the same, reads Stripe's 5 and leaves them; 5 members pass."""
    org_id, token = await expired_org(seed, seats_used=5)
    subscription = subscription_object(organization_id=org_id, quantity=3)
    await stripe.publish(CREATED, subscription)
    second = int(time.time())
    four = stripe.state.update_subscription(subscription["id"], quantity=4)
    five = stripe.state.update_subscription(subscription["id"], quantity=5)
    await stripe.deliver(event_object(UPDATED, five, created=second))
    await stripe.deliver(event_object(UPDATED, four, created=second))
    assert [r["seat_count"] for r in await purchases(db, org_id)] == [3, 5]
    await becomes(client, billing_gateway, token, (200, None))


async def test_many_events_at_once_end_in_stripes_state(
    stripe_server: RunningFakeStripe,
    client: aiohttp.ClientSession,
    billing_gateway: RunningGateway,
    seed: Seed,
    db: asyncpg.Connection,
) -> None:
    """Ten events of one subscription delivered at once, each carrying another quantity:
    every delivery is accepted and the subscription ends as Stripe has it (7 seats)."""
    org_id, _ = await expired_org(seed, seats_used=1)
    subscription = subscription_object(organization_id=org_id, quantity=1)
    stripe_server.state.add_subscription(subscription)
    copies = [
        stripe_server.state.update_subscription(subscription["id"], quantity=n)
        for n in range(1, 11)
    ]
    stripe_server.state.update_subscription(subscription["id"], quantity=7)
    events = [event_object(UPDATED, copy, created=time.time()) for copy in copies]
    results = await asyncio.gather(*(deliver(client, billing_gateway, e) for e in events))
    assert [status for status, _ in results] == [200] * 10, results
    rows = await purchases(db, org_id)
    assert [r["seat_count"] for r in rows] == [7]


async def test_state_read_before_another_was_written_is_read_again(
    seed: Seed, db: asyncpg.Connection
) -> None:
    """Two deliveries read the subscription (version None), then the one that read 5 seats
    writes: the other, whose older read says 4, gets ConcurrentUpdate instead of writing,
    and once read again (the version after the write) finds nothing to change."""
    org_id = await seed.org()
    subscription = subscription_object(organization_id=org_id, quantity=5)
    read_before = await subscription_version(db, subscription["id"])
    newer = subscription_state(subscription, CATALOG)
    older = dataclasses.replace(newer, seat_count=4)
    when = datetime.now(UTC)

    async def apply(state: SubscriptionState, version: int | None, event_id: str) -> str:
        async with db.transaction():
            return await apply_subscription(
                db, state, event_id=event_id, event_created=when, read_version=version
            )

    assert await apply(newer, read_before, "evt_newer") == "applied"
    with pytest.raises(ConcurrentUpdate):
        await apply(older, read_before, "evt_older")
    read_again = await subscription_version(db, subscription["id"])
    assert read_again == 1
    assert await apply(newer, read_again, "evt_older") == "unchanged"
    assert [r["seat_count"] for r in await purchases(db, org_id)] == [5]


# Paying during the trial.


async def test_paying_on_day_10_keeps_the_free_days_and_caps_invitations(
    stripe: Stripe,
    client: aiohttp.ClientSession,
    billing_gateway: RunningGateway,
    seed: Seed,
    db: asyncpg.Connection,
) -> None:
    """On day 10 of 30 an owner buys 3 seats: Stripe is told to charge at day 30, the
    trialing subscription's seats count at once, the third seat can still be given and a
    fourth cannot, and the proxy serves meanwhile."""
    org_id = await seed.org(age=timedelta(days=10))
    _, token = await seed.member_with_key(org_id, "owner")
    await seed.member_with_key(org_id, "member")
    created_at = await db.fetchval("SELECT created_at FROM organizations WHERE id = $1", org_id)
    day_30 = math.ceil((created_at + timedelta(days=30)).timestamp())

    path = f"/api/organizations/{org_id}/subscription/checkout"
    checkout = await api(client, billing_gateway, "POST", path, token=token, body={"seats": 3})
    assert checkout.status == 200, checkout.body
    (session,) = stripe.state.requests_to("POST", "/v1/checkout/sessions")
    assert session.params["subscription_data"]["trial_end"] == str(day_30)

    session_id = checkout.body["session_id"]
    subscription = stripe.state.complete_checkout(session_id)
    assert subscription["status"] == "trialing"
    await stripe.deliver(event_object(CREATED, subscription))
    completed = event_object("checkout.session.completed", stripe.state.sessions[session_id])
    await stripe.deliver(completed)
    (row,) = await purchases(db, org_id)
    assert (row["subscription_status"], row["stripe_status"]) == ("active", "trialing")
    assert (row["seat_count"], row["expires_at"].timestamp()) == (3, day_30)

    status = await org_status(client, billing_gateway, org_id, token)
    assert status["seats"]["purchased"] == 3 and status["seats"]["unlimited"] is False
    assert status["subscription"]["first_charge_at"] == iso_utc(day_30)
    assert status["call_to_action"]["level"] == "none"
    invitations = f"/api/organizations/{org_id}/invitations"
    third = await api(
        client, billing_gateway, "POST", invitations, token=token, body={"email": "c@x.test"}
    )
    assert third.status == 201, third.body
    fourth = await api(
        client, billing_gateway, "POST", invitations, token=token, body={"email": "d@x.test"}
    )
    error = assert_error(fourth, 409, "seats_exhausted")
    assert error["metadata"]["seats_purchased"] == 3
    assert await chat(client, billing_gateway, token) == (200, None)


async def test_more_members_than_seats_bought_in_the_trial_warns_before_it_ends(
    stripe: Stripe,
    client: aiohttp.ClientSession,
    billing_gateway: RunningGateway,
    seed: Seed,
) -> None:
    """Paid for 2 seats during the trial, with 3 members: the proxy still serves, and the
    status says seats are short and warns of the trial's end."""
    org_id = await seed.org(age=timedelta(days=10))
    _, token = await seed.member_with_key(org_id, "owner")
    for _ in range(2):
        await seed.member_with_key(org_id, "member")
    ends_at = time.time() + 20 * 86_400
    trialing = subscription_object(
        organization_id=org_id, status="trialing", quantity=2, period_end=ends_at
    )
    await stripe.publish(CREATED, trialing)
    status = await org_status(client, billing_gateway, org_id, token)
    assert (status["seats"]["purchased"], status["seats"]["short"]) == (2, 1)
    assert status["access"] == {"allowed": True, "reason": None}
    action = status["call_to_action"]
    assert (action["level"], action["title"]) == ("warning", "Your organization needs more seats")
    assert "3 members but pays for 2 seats" in action["message"]
    assert await chat(client, billing_gateway, token) == (200, None)
