"""The fake Stripe refuses what Stripe refuses, so a misspelled parameter fails a test:
unknown parameters at any depth, and a Checkout trial ending within 48 hours. Also what
it does behind the API: subscription updates and completed checkouts.

The real `stripe` library talks to it, as the gateway does.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
import stripe

from gateway.accounts.stripe_client import STRIPE_API_VERSION
from gateway.plans import load_catalog
from tests.fake_stripe import (
    SECRET_KEY,
    RunningFakeStripe,
    add_catalog_prices,
    subscription_object,
)

CATALOG = load_catalog()
DAY = 86_400


@pytest.fixture
async def api(stripe_server: RunningFakeStripe) -> AsyncIterator[stripe.StripeClient]:
    """The stripe library's client, pointed at the fake, as the gateway builds its own."""
    http_client = stripe.AIOHTTPClient()
    yield stripe.StripeClient(
        SECRET_KEY,
        stripe_version=STRIPE_API_VERSION,
        base_addresses={"api": stripe_server.url},
        http_client=http_client,
        max_network_retries=0,
    )
    await http_client.close_async()


def session_params(**changes: Any) -> dict[str, Any]:
    """A subscription-mode session like the gateway's, with `changes` merged in."""
    params: dict[str, Any] = {
        "mode": "subscription",
        "customer": "cus_1",
        "line_items": [{"price": "price_1", "quantity": 2}],
        "subscription_data": {"metadata": {"organization_id": "org"}},
        "success_url": "https://app.example.test/ok",
        "cancel_url": "https://app.example.test/no",
    }
    params.update(changes)
    return params


@pytest.mark.parametrize(
    ("create", "unknown"),
    [
        pytest.param(
            lambda c: c.v1.customers.create_async(params={"emial": "ada@example.test"}),
            "emial",
            id="top-level",
        ),
        pytest.param(
            lambda c: c.v1.checkout.sessions.create_async(
                params=session_params(subscription_data={"trial_ends": 1})
            ),
            "subscription_data[trial_ends]",
            id="nested",
        ),
        pytest.param(
            lambda c: c.v1.checkout.sessions.create_async(
                params=session_params(line_items=[{"price": "p", "quantity": 1}, {"prise": "p"}])
            ),
            "line_items[1][prise]",
            id="in-a-list",
        ),
        pytest.param(
            lambda c: c.v1.prices.list_async(params={"lookup_key": ["k"]}),
            "lookup_key",
            id="query-of-a-list",
        ),
        pytest.param(
            lambda c: c.v1.subscriptions.update_async("sub_1", params={"quantity": 3}),
            "quantity",
            id="subscription-update",
        ),
        pytest.param(
            lambda c: c.v1.billing_portal.configurations.create_async(
                params={"features": {"invoice_history": {"enabled": True, "limit": 5}}}
            ),
            "features[invoice_history][limit]",
            id="portal-configuration",
        ),
        pytest.param(
            lambda c: c.v1.billing_portal.sessions.create_async(
                params={"customer": "cus_1", "return_to": "https://app.example.test"}
            ),
            "return_to",
            id="portal-session",
        ),
        pytest.param(
            lambda c: c.v1.subscription_schedules.update_async(
                "sub_sched_1", params={"phases": [{"items": [], "iterations": 1}]}
            ),
            "phases[0][iterations]",
            id="schedule-phase",
        ),
    ],
)
async def test_unknown_parameter_is_refused_as_stripe_does(
    api: stripe.StripeClient, create: Any, unknown: str
) -> None:
    """400 invalid_request_error "Received unknown parameter: X", X bracketed as Stripe does."""
    with pytest.raises(stripe.InvalidRequestError) as raised:
        await create(api)
    assert raised.value.http_status == 400
    assert raised.value.error is not None and raised.value.error.type == "invalid_request_error"
    assert raised.value.user_message == f"Received unknown parameter: {unknown}"


async def test_known_parameters_pass(
    api: stripe.StripeClient, stripe_server: RunningFakeStripe
) -> None:
    """Metadata takes any keys; a nested known parameter (trial_end, price_data) passes."""
    customer = await api.v1.customers.create_async(
        params={"name": "Acme", "email": "ada@example.test", "metadata": {"anything": "goes"}}
    )
    assert stripe_server.state.customers[customer.id]["email"] == "ada@example.test"
    trial = {"metadata": {"k": "v"}, "trial_end": int(time.time()) + 3 * DAY}
    await api.v1.checkout.sessions.create_async(params=session_params(subscription_data=trial))


async def test_checkout_trial_must_end_48_hours_ahead(api: stripe.StripeClient) -> None:
    """Like Stripe, a subscription_data.trial_end within 48 hours is refused."""
    soon = {"trial_end": int(time.time()) + 47 * 3600}
    with pytest.raises(stripe.InvalidRequestError) as raised:
        await api.v1.checkout.sessions.create_async(params=session_params(subscription_data=soon))
    assert "48 hours" in (raised.value.user_message or "")


async def test_subscription_update_changes_what_is_read_back(
    api: stripe.StripeClient, stripe_server: RunningFakeStripe
) -> None:
    """An update of an item's quantity and of cancel_at_period_end is what a retrieve sees."""
    subscription = subscription_object(organization_id=None, quantity=2)
    stripe_server.state.add_subscription(subscription)
    item_id = subscription["items"]["data"][0]["id"]
    await api.v1.subscriptions.update_async(
        subscription["id"],
        params={"items": [{"id": item_id, "quantity": 5}], "cancel_at_period_end": True},
    )
    found = (await api.v1.subscriptions.retrieve_async(subscription["id"])).to_dict()
    assert found["items"]["data"][0]["quantity"] == 5
    assert found["cancel_at_period_end"] is True
    assert found["cancel_at"] == found["items"]["data"][0]["current_period_end"]


async def test_completed_checkout_with_a_trial_creates_a_trialing_subscription(
    api: stripe.StripeClient, stripe_server: RunningFakeStripe
) -> None:
    """The subscription a completed session creates trials until its trial_end, on the
    session's price and quantity, with the session's subscription metadata."""
    price_id = add_catalog_prices(stripe_server.state, CATALOG)["kilo_teams_seat_yearly"]
    trial_end = int(time.time()) + 20 * DAY
    session = await api.v1.checkout.sessions.create_async(
        params=session_params(
            line_items=[{"price": price_id, "quantity": 3}],
            subscription_data={"metadata": {"organization_id": "org"}, "trial_end": trial_end},
        )
    )
    subscription = stripe_server.state.complete_checkout(session.id)
    (item,) = subscription["items"]["data"]
    assert (subscription["status"], subscription["trial_end"]) == ("trialing", trial_end)
    assert (item["quantity"], item["current_period_end"]) == (3, trial_end)
    assert item["price"]["id"] == price_id
    assert subscription["metadata"] == {"organization_id": "org"}
    assert stripe_server.state.sessions[session.id]["subscription"] == subscription["id"]
