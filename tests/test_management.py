"""Managing a subscription: the billing portal, reading the subscription, changing its
seats (more now and prorated, fewer from the next period, never below the members).

A real gateway, real PostgreSQL and the fake Stripe through the real `stripe` library;
`stripe-setup` has run against the fake (products, prices, the portal configuration).
The database changes only through the webhook that follows a change, as with Stripe.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import aiohttp
import asyncpg
import pytest

from gateway.access.refusals import iso_utc
from tests.accounts import APP_URL, Reply, api, assert_error
from tests.conftest import RunningGateway
from tests.factories import Seed
from tests.fake_stripe import (
    RunningFakeStripe,
    event_object,
)
from tests.test_webhooks import deliver, purchases

# Stripe as `stripe-setup` leaves it: products, prices, the portal configuration.
pytestmark = pytest.mark.stripe_set_up

EXPIRED = timedelta(days=40)
UPDATED = "customer.subscription.updated"


class Org:
    """An organization of a test: its id, its owner's token, and calls made as a role."""

    def __init__(
        self,
        seed: Seed,
        client: aiohttp.ClientSession,
        gateway: RunningGateway,
        stripe: RunningFakeStripe,
    ) -> None:
        self.seed, self.client, self.gateway, self.stripe = seed, client, gateway, stripe
        self.id = ""
        self.owner = ""

    async def create(self, *, members: int, age: timedelta = EXPIRED) -> Org:
        """The organization with its owner and `members - 1` more members using seats."""
        self.id = await self.seed.org(age=age)
        _, self.owner = await self.seed.member_with_key(self.id, "owner")
        for _ in range(members - 1):
            await self.seed.member_with_key(self.id, "member")
        return self

    async def token(self, role: str | None) -> str:
        """A token of a new member in `role`, or of a stranger (None)."""
        org_id = self.id if role is not None else await self.seed.org(name="Other")
        _, token = await self.seed.member_with_key(org_id, role or "owner")
        return token

    async def call(self, method: str, route: str, token: str, body: Any = None) -> Reply:
        path = f"/api/organizations/{self.id}{route}"
        return await api(self.client, self.gateway, method, path, token=token, body=body)

    async def subscribe(self, seats: int) -> dict[str, Any]:
        """Check out, pay on Stripe's page, and have the webhook deliver the subscription."""
        checkout = await self.call("POST", "/subscription/checkout", self.owner, {"seats": seats})
        assert checkout.status == 200, checkout.body
        subscription = self.stripe.state.complete_checkout(checkout.body["session_id"])
        self.stripe.state.add_invoice(subscription["id"], "paid")
        await self.announce(subscription["id"], "customer.subscription.created")
        return subscription

    async def announce(self, subscription_id: str, event_type: str = UPDATED) -> None:
        """Stripe's event for the subscription as it is now, delivered and accepted."""
        subscription = self.stripe.state.subscriptions[subscription_id]
        status, body = await deliver(
            self.client, self.gateway, event_object(event_type, subscription)
        )
        assert status == 200, body

    async def seats_purchased(self) -> int:
        """`seats.purchased` of the status page: what the database holds."""
        reply = await api(
            self.client, self.gateway, "GET", f"/api/organizations/{self.id}", token=self.owner
        )
        assert reply.status == 200, reply.body
        purchased: int = reply.body["seats"]["purchased"]
        return purchased


@pytest.fixture
def org(
    seed: Seed,
    client: aiohttp.ClientSession,
    billing_gateway: RunningGateway,
    stripe_server: RunningFakeStripe,
) -> Org:
    return Org(seed, client, billing_gateway, stripe_server)


def portal_configurations(stripe: RunningFakeStripe) -> list[dict[str, Any]]:
    return list(stripe.state.portal_configurations.values())


# The billing portal.


@pytest.mark.parametrize(
    ("role", "status", "reason"),
    [
        ("owner", 200, None),
        ("billing_manager", 200, None),
        ("member", 403, "insufficient_role"),
        (None, 403, "not_a_member"),
    ],
)
async def test_portal_is_for_owners_and_billing_managers(
    org: Org, stripe_server: RunningFakeStripe, role: str | None, status: int, reason: str | None
) -> None:
    """Owners and billing managers get a portal URL; members and strangers get 403."""
    await org.create(members=1)
    await org.subscribe(1)
    reply = await org.call("POST", "/billing/portal", await org.token(role))
    if reason is None:
        assert reply.status == status, reply.body
        assert reply.body["url"].startswith("https://billing.stripe.test/p/session/")
    else:
        assert_error(reply, status, reason)
        assert stripe_server.state.portal_sessions == {}


async def test_portal_session_uses_the_configuration_and_returns_to_the_billing_page(
    org: Org, stripe_server: RunningFakeStripe
) -> None:
    """The session is for the organization's customer, with stripe-setup's configuration
    (cards, invoices, cancelling at period end, no quantity changes) and the billing page
    as its return URL."""
    await org.create(members=1)
    await org.subscribe(2)
    reply = await org.call("POST", "/billing/portal", org.owner)
    assert reply.status == 200, reply.body
    (session,) = stripe_server.state.portal_sessions.values()
    (configuration,) = portal_configurations(stripe_server)
    (customer,) = stripe_server.state.customers
    assert reply.body == {"url": session["url"]}
    assert session["customer"] == customer
    assert session["configuration"] == configuration["id"]
    assert session["return_url"] == f"{APP_URL}/organizations/{org.id}/billing"
    features = configuration["features"]
    assert features["payment_method_update"]["enabled"] is True
    assert features["invoice_history"]["enabled"] is True
    assert features["subscription_cancel"]["enabled"] is True
    assert features["subscription_cancel"]["mode"] == "at_period_end"
    assert features["subscription_update"]["enabled"] is False


async def test_portal_without_a_stripe_customer_says_to_subscribe_first(
    org: Org, stripe_server: RunningFakeStripe
) -> None:
    """An organization that never checked out has no customer: 409 no_billing_account,
    naming the checkout; Stripe is not asked."""
    await org.create(members=1)
    reply = await org.call("POST", "/billing/portal", org.owner)
    error = assert_error(reply, 409, "no_billing_account")
    assert "subscribe" in error["message"]
    assert error["metadata"]["subscribe"].endswith(f"/{org.id}/subscription/checkout")
    assert stripe_server.state.requests_to("POST", "/v1/billing_portal/sessions") == []


async def test_portal_before_stripe_setup_made_its_configuration_is_503(
    org: Org, stripe_server: RunningFakeStripe
) -> None:
    """Without the configuration stripe-setup creates, the portal says to run it."""
    await org.create(members=1)
    await org.subscribe(1)
    stripe_server.state.portal_configurations.clear()
    reply = await org.call("POST", "/billing/portal", org.owner)
    error = assert_error(reply, 503, "billing_unavailable")
    assert "stripe-setup" in error["message"]


# Reading the subscription.


@pytest.mark.parametrize("role", ["owner", "billing_manager", "member"])
async def test_subscription_is_null_before_subscribing_and_stripes_after(
    org: Org, role: str
) -> None:
    """Any member reads it: null before a subscription, then Stripe's plan, cycle, seats,
    status, period end, cancelling and latest invoice."""
    await org.create(members=2)
    token = await org.token(role)
    before = await org.call("GET", "/subscription", token)
    assert (before.status, before.body) == (200, {"subscription": None})
    subscription = await org.subscribe(3)
    after = await org.call("GET", "/subscription", token)
    assert after.status == 200, after.body
    period_end = subscription["items"]["data"][0]["current_period_end"]
    assert after.body["subscription"] == {
        "id": subscription["id"],
        "plan": "teams",
        "billing_cycle": "yearly",
        "seats": 3,
        "status": "active",
        "current_period_end": iso_utc(period_end),
        "cancel_at_period_end": False,
        "cancel_at": None,
        "latest_invoice": {"id": subscription_latest_invoice(org, subscription), "status": "paid"},
        "scheduled_change": None,
    }


def subscription_latest_invoice(org: Org, subscription: dict[str, Any]) -> str:
    invoice: str = org.stripe.state.subscriptions[subscription["id"]]["latest_invoice"]
    return invoice


async def test_subscription_of_a_stranger_is_403(org: Org) -> None:
    """Someone outside the organization reads nothing of it."""
    await org.create(members=1)
    reply = await org.call("GET", "/subscription", await org.token(None))
    assert_error(reply, 403, "not_a_member")


async def test_stripe_outage_reading_the_subscription_is_502_in_the_envelope(
    org: Org, stripe_server: RunningFakeStripe
) -> None:
    """Stripe answering 500 (after the library's retries) is 502 billing_provider_error."""
    await org.create(members=1)
    await org.subscribe(1)
    for _ in range(3):
        stripe_server.state.fail_next(500, "api_error", "Stripe is down")
    reply = await org.call("GET", "/subscription", org.owner)
    error = assert_error(reply, 502, "billing_provider_error")
    assert "Stripe is down" not in error["message"]


# Changing seats.


@pytest.mark.parametrize("role", ["owner", "billing_manager"])
async def test_more_seats_take_effect_now_prorated(
    org: Org, stripe_server: RunningFakeStripe, role: str
) -> None:
    """3 seats to 5: Stripe's quantity is 5 at once, prorated and invoiced now; after the
    webhook the organization has 5 seats."""
    await org.create(members=2)
    subscription = await org.subscribe(3)
    reply = await org.call("POST", "/subscription/seats", await org.token(role), {"seats": 5})
    assert reply.status == 202, reply.body
    assert reply.body["seats"] == {"current": 3, "requested": 5}
    assert (reply.body["effective"], reply.body["proration_behavior"]) == ("now", "always_invoice")
    (update,) = stripe_server.state.requests_to("POST", f"/v1/subscriptions/{subscription['id']}")
    assert update.params["proration_behavior"] == "always_invoice"
    assert update.params["payment_behavior"] == "pending_if_incomplete"
    held = stripe_server.state.subscriptions[subscription["id"]]
    assert held["items"]["data"][0]["quantity"] == 5
    assert await org.seats_purchased() == 3, "the database waits for the webhook"
    await org.announce(subscription["id"])
    assert await org.seats_purchased() == 5
    shown = (await org.call("GET", "/subscription", org.owner)).body["subscription"]
    assert shown["seats"] == 5
    invoice = stripe_server.state.invoices[shown["latest_invoice"]["id"]]
    assert invoice["billing_reason"] == "subscription_update"


async def test_fewer_seats_take_effect_from_the_next_period(
    org: Org, stripe_server: RunningFakeStripe, db: asyncpg.Connection
) -> None:
    """5 seats to 3: this period keeps 5 (at Stripe and here, even after the webhook),
    a schedule holds 3 from the period's end, and at renewal the purchase written is 3
    seats from that instant."""
    await org.create(members=3)
    subscription = await org.subscribe(5)
    period_end = subscription["items"]["data"][0]["current_period_end"]
    reply = await org.call("POST", "/subscription/seats", org.owner, {"seats": 3})
    assert reply.status == 202, reply.body
    assert (reply.body["effective"], reply.body["effective_at"]) == (
        "next_period",
        iso_utc(period_end),
    )
    held = stripe_server.state.subscriptions[subscription["id"]]
    assert held["items"]["data"][0]["quantity"] == 5
    (schedule,) = stripe_server.state.schedules.values()
    assert [p["items"][0]["quantity"] for p in schedule["phases"]] == [5, 3]
    assert schedule["phases"][1]["start_date"] == period_end
    assert schedule["end_behavior"] == "release"
    await org.announce(subscription["id"])
    assert await org.seats_purchased() == 5
    shown = (await org.call("GET", "/subscription", org.owner)).body["subscription"]
    assert shown["seats"] == 5
    assert shown["scheduled_change"] == {"seats": 3, "effective_at": iso_utc(period_end)}

    stripe_server.state.renew(subscription["id"])
    await org.announce(subscription["id"])
    rows = await purchases(db, org.id)
    assert [r["seat_count"] for r in rows] == [5, 3]
    assert rows[-1]["starts_at"].timestamp() == period_end
    shown = (await org.call("GET", "/subscription", org.owner)).body["subscription"]
    assert (shown["seats"], shown["scheduled_change"]) == (3, None)


async def test_asking_for_the_current_seats_cancels_a_scheduled_decrease(
    org: Org, stripe_server: RunningFakeStripe
) -> None:
    """5 to 3 next period, then 5 again: the schedule is released and nothing changes."""
    await org.create(members=1)
    subscription = await org.subscribe(5)
    assert (await org.call("POST", "/subscription/seats", org.owner, {"seats": 3})).status == 202
    reply = await org.call("POST", "/subscription/seats", org.owner, {"seats": 5})
    assert reply.status == 202, reply.body
    assert reply.body["scheduled_change_cancelled"] is True
    (schedule,) = stripe_server.state.schedules.values()
    assert schedule["status"] == "released"
    assert stripe_server.state.subscriptions[subscription["id"]]["schedule"] is None
    shown = (await org.call("GET", "/subscription", org.owner)).body["subscription"]
    assert (shown["seats"], shown["scheduled_change"]) == (5, None)


async def test_fewer_seats_than_members_is_409_with_the_count(
    org: Org, stripe_server: RunningFakeStripe
) -> None:
    """3 members (a billing manager besides, who takes no seat) and 5 seats: asking for 2
    is 409 seats_below_members naming 3; nothing is scheduled."""
    await org.create(members=3)
    await org.token("billing_manager")
    await org.subscribe(5)
    reply = await org.call("POST", "/subscription/seats", org.owner, {"seats": 2})
    error = assert_error(reply, 409, "seats_below_members")
    assert error["metadata"]["seats_used"] == 3
    assert "3" in error["message"]
    assert stripe_server.state.schedules == {}


@pytest.mark.parametrize("seats", [0, -1, 1001, "5", 5.5, True, None])
async def test_seats_must_be_a_whole_number_from_1_to_1000(
    org: Org, stripe_server: RunningFakeStripe, seats: Any
) -> None:
    """Anything else is 400 invalid_request, before Stripe is asked."""
    await org.create(members=1)
    await org.subscribe(2)
    before = len(stripe_server.state.requests)
    reply = await org.call("POST", "/subscription/seats", org.owner, {"seats": seats})
    assert_error(reply, 400, "invalid_request")
    assert len(stripe_server.state.requests) == before


@pytest.mark.parametrize(
    ("role", "reason"), [("member", "insufficient_role"), (None, "not_a_member")]
)
async def test_seats_are_changed_by_owners_and_billing_managers_only(
    org: Org, role: str | None, reason: str
) -> None:
    """A member or a stranger asking for seats is 403."""
    await org.create(members=1)
    await org.subscribe(2)
    reply = await org.call("POST", "/subscription/seats", await org.token(role), {"seats": 4})
    assert_error(reply, 403, reason)


async def test_seats_without_a_subscription_say_to_subscribe_first(org: Org) -> None:
    """No live subscription: 409 no_subscription naming the checkout."""
    await org.create(members=1)
    reply = await org.call("POST", "/subscription/seats", org.owner, {"seats": 4})
    error = assert_error(reply, 409, "no_subscription")
    assert error["metadata"]["subscribe"].endswith(f"/{org.id}/subscription/checkout")


async def test_fewer_seats_on_a_subscription_cancelling_is_409(
    org: Org, stripe_server: RunningFakeStripe
) -> None:
    """Cancelling at the period's end (in the portal): no next period to have fewer seats
    in, and no schedule that would renew it; more seats are still possible."""
    await org.create(members=1)
    subscription = await org.subscribe(4)
    stripe_server.state.update_subscription(subscription["id"], cancel_at_period_end=True)
    await org.announce(subscription["id"])
    reply = await org.call("POST", "/subscription/seats", org.owner, {"seats": 2})
    assert_error(reply, 409, "subscription_ending")
    assert stripe_server.state.schedules == {}
    more = await org.call("POST", "/subscription/seats", org.owner, {"seats": 6})
    assert more.status == 202, more.body
