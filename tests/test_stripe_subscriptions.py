"""The pure mapping from a Stripe subscription to a seats purchase, by tables of cases."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from gateway.accounts.stripe_subscriptions import (
    canonical_uuid,
    is_catalog_price,
    object_id,
    purchase_status,
    seat_items,
    subscription_state,
)
from gateway.plans import load_catalog
from tests.fake_stripe import subscription_object

CATALOG = load_catalog()
ORG = "0b6f8a52-2d6b-4c1e-9a53-1f1f3c6f6a10"


@pytest.mark.parametrize(
    ("stripe_status", "cancel_at_period_end", "cancel_at", "expected"),
    [
        ("active", False, None, "active"),
        ("trialing", False, None, "active"),
        ("active", True, 1_900_000_000, "pending_cancel"),
        ("active", False, 1_900_000_000, "pending_cancel"),  # cancel_at without the flag
        ("trialing", True, None, "pending_cancel"),
        ("past_due", False, None, "past_due"),
        ("past_due", True, None, "past_due"),
        ("canceled", False, None, "ended"),
        ("canceled", True, None, "ended"),
        ("unpaid", False, None, "ended"),
        ("incomplete", False, None, "ended"),
        ("incomplete_expired", False, None, "ended"),
        ("paused", False, None, "ended"),
        ("some_future_status", False, None, "ended"),
    ],
)
def test_purchase_status(
    stripe_status: str, cancel_at_period_end: bool, cancel_at: int | None, expected: str
) -> None:
    """Stripe's status (and a scheduled cancellation) maps to the purchase status."""
    assert purchase_status(stripe_status, cancel_at_period_end, cancel_at) == expected


def test_state_from_current_api_shape() -> None:
    """Seats, cycle and period come from the seat item; the org from the metadata."""
    sub = subscription_object(
        organization_id=ORG.upper(), customer="cus_1", quantity=7, period_start=100, period_end=200
    )
    state = subscription_state(sub, CATALOG)
    assert (state.organization_id, state.customer_id) == (ORG, "cus_1")
    assert (state.status, state.seat_count, state.billing_cycle) == ("active", 7, "yearly")
    assert state.starts_at == datetime.fromtimestamp(100, UTC)
    assert state.expires_at == datetime.fromtimestamp(200, UTC)


def test_state_from_older_api_shape_with_period_on_subscription() -> None:
    """Before 2025-03 the period was on the subscription; it is used when items lack it."""
    sub = subscription_object(organization_id=ORG, interval="month")
    item = sub["items"]["data"][0]
    sub["current_period_start"] = item.pop("current_period_start")
    sub["current_period_end"] = item.pop("current_period_end")
    state = subscription_state(sub, CATALOG)
    assert state.billing_cycle == "monthly"
    assert state.expires_at.timestamp() == sub["current_period_end"]


def test_ended_subscription_expires_when_it_ended() -> None:
    """A subscription canceled mid-period expires at `ended_at`, not at the period's end."""
    sub = subscription_object(
        organization_id=ORG, status="canceled", period_start=0, period_end=900
    )
    sub["ended_at"] = 500
    assert subscription_state(sub, CATALOG).expires_at.timestamp() == 500


def test_subscription_without_period_is_an_error() -> None:
    """A subscription with no current period cannot become a purchase."""
    sub = subscription_object(organization_id=ORG)
    sub["items"]["data"][0].pop("current_period_start")
    with pytest.raises(ValueError, match="no current period"):
        subscription_state(sub, CATALOG)


def test_seat_item_is_the_one_with_a_catalog_price() -> None:
    """With several items, the one priced from the catalog holds the seats."""
    sub = subscription_object(organization_id=ORG, quantity=4)
    seats = sub["items"]["data"][0]
    addon = {**seats, "quantity": 1, "price": {**seats["price"], "lookup_key": "sso_addon"}}
    sub["items"]["data"] = [addon, seats]
    assert [item["quantity"] for item in seat_items(sub, CATALOG)] == [4]
    assert subscription_state(sub, CATALOG).seat_count == 4


def test_seats_of_every_catalog_item_add_up() -> None:
    """Two items priced from the catalog (yearly and legacy monthly) sell their seats together."""
    sub = subscription_object(organization_id=ORG, quantity=4)
    seats = sub["items"]["data"][0]
    monthly = {
        **seats,
        "quantity": 2,
        "price": {**seats["price"], "lookup_key": "kilo_teams_seat_monthly"},
    }
    sub["items"]["data"] = [seats, monthly]
    state = subscription_state(sub, CATALOG)
    assert (state.seat_count, state.grants_seats) == (6, True)


def test_subscription_to_another_product_grants_no_seats() -> None:
    """A price that is not ours (no catalog lookup key, no kilo_plan mark) sells no seats,
    however many it has: the first item is never taken for the seats."""
    sub = subscription_object(organization_id=ORG, quantity=50, lookup_key=None)
    state = subscription_state(sub, CATALOG)
    assert seat_items(sub, CATALOG) == []
    assert (state.seat_count, state.grants_seats) == (0, False)
    assert seat_items({"items": {"data": []}}, CATALOG) == []


@pytest.mark.parametrize(
    ("price", "ours"),
    [
        ({"lookup_key": "kilo_teams_seat_yearly"}, True),
        ({"lookup_key": "kilo_enterprise_seat_monthly"}, True),
        # stripe-setup marks its prices: one whose lookup key moved on is still ours.
        ({"lookup_key": None, "metadata": {"kilo_plan": "teams"}}, True),
        ({"lookup_key": "legacy", "metadata": {"kilo_plan": "enterprise"}}, True),
        ({"lookup_key": "legacy"}, False),
        ({"lookup_key": None, "metadata": {"kilo_plan": "gold"}}, False),
        ({"lookup_key": None, "metadata": {}}, False),
        ({}, False),
    ],
)
def test_which_prices_are_ours(price: dict[str, Any], ours: bool) -> None:
    """A catalog lookup key or stripe-setup's kilo_plan mark makes a price ours."""
    assert is_catalog_price(price, CATALOG) is ours


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("cus_1", "cus_1"),
        ({"id": "cus_1", "object": "customer"}, "cus_1"),
        (None, None),
        ("", None),
        (42, None),
    ],
)
def test_object_id(value: Any, expected: str | None) -> None:
    """A reference is an id, or an expanded object carrying one."""
    assert object_id(value) == expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [(ORG, ORG), (ORG.upper(), ORG), ("not-a-uuid", None), (None, None), (7, None)],
)
def test_canonical_uuid(value: Any, expected: str | None) -> None:
    """Organization ids from metadata are used only when they are UUIDs."""
    assert canonical_uuid(value) == expected
