"""A Stripe subscription becomes a seats purchase: the pure mapping and its named queries.

Stripe delivers events late, more than once and out of order. The newest event applied
to each subscription is kept in `stripe_subscriptions`; an older event changes nothing.
Otherwise a new `organization_seats_purchases` row records the state (the current
purchase is an organization's newest row), and its NOTIFY makes every gateway re-read
the organization within a second.

    Stripe status                                   purchase status
    active, trialing                                active
    active, trialing, cancelling at period end      pending_cancel
    past_due                                        past_due
    canceled, unpaid, incomplete(_expired), paused  ended

Seats are the quantity of the seat item (the item whose price is one of the catalog's,
else the first); the cycle is `yearly` for a yearly price, else `monthly`; the period is
the item's current period (the subscription's, in API versions before 2025-03).
"""

from __future__ import annotations

import dataclasses
import time
import uuid
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from gateway.access.queries import Queryable
from gateway.access.rule import PAYING_STATUSES, Purchase, is_paying
from gateway.plans import Catalog

GRANTING_STATUSES = frozenset({"active", "trialing"})


@dataclasses.dataclass(frozen=True, slots=True)
class SubscriptionState:
    """What one Stripe subscription says the organization has bought."""

    subscription_id: str
    customer_id: str | None
    organization_id: str | None  # from the subscription's metadata, when valid
    stripe_status: str
    status: str  # the purchase status it maps to
    seat_count: int
    billing_cycle: str
    starts_at: datetime
    expires_at: datetime


def object_id(value: Any) -> str | None:
    """The id of a reference that may be an id or an expanded object."""
    if isinstance(value, Mapping):
        value = value.get("id")
    return value if isinstance(value, str) and value else None


def canonical_uuid(value: Any) -> str | None:
    """`value` as a canonical UUID string, or None when it is not one."""
    if not isinstance(value, str):
        return None
    try:
        return str(uuid.UUID(value))
    except ValueError:
        return None


def purchase_status(stripe_status: str, cancel_at_period_end: bool, cancel_at: Any) -> str:
    """The purchase status for a Stripe subscription status."""
    if stripe_status in GRANTING_STATUSES:
        return "pending_cancel" if cancel_at_period_end or cancel_at else "active"
    if stripe_status == "past_due":
        return "past_due"
    return "ended"


def seat_item(subscription: Mapping[str, Any], catalog: Catalog) -> Mapping[str, Any]:
    """The subscription item that sells seats; {} when it has no items."""
    items = (subscription.get("items") or {}).get("data") or []
    for item in items:
        if catalog.by_lookup_key((item.get("price") or {}).get("lookup_key") or "") is not None:
            return dict(item)
    return dict(items[0]) if items else {}


def subscription_state(subscription: Mapping[str, Any], catalog: Catalog) -> SubscriptionState:
    """The purchase a Stripe subscription object stands for; ValueError when it has no period."""
    item = seat_item(subscription, catalog)
    price = item.get("price") or {}
    start = item.get("current_period_start", subscription.get("current_period_start"))
    end = item.get("current_period_end", subscription.get("current_period_end"))
    if not isinstance(start, int) or not isinstance(end, int):
        raise ValueError(f"subscription {subscription.get('id')} has no current period")
    stripe_status = str(subscription.get("status"))
    status = purchase_status(
        stripe_status, bool(subscription.get("cancel_at_period_end")), subscription.get("cancel_at")
    )
    ended_at = subscription.get("ended_at")
    if status == "ended" and isinstance(ended_at, int):
        end = min(end, ended_at)
    return SubscriptionState(
        subscription_id=str(subscription["id"]),
        customer_id=object_id(subscription.get("customer")),
        organization_id=canonical_uuid((subscription.get("metadata") or {}).get("organization_id")),
        stripe_status=stripe_status,
        status=status,
        seat_count=max(int(item.get("quantity") or 0), 0),
        billing_cycle="yearly"
        if (price.get("recurring") or {}).get("interval") == "year"
        else "monthly",
        starts_at=datetime.fromtimestamp(start, UTC),
        expires_at=datetime.fromtimestamp(end, UTC),
    )


_ORG_EXISTS_SQL = "SELECT id::text FROM organizations WHERE id = $1::uuid"
_ORG_BY_CUSTOMER_SQL = """
SELECT id::text FROM organizations WHERE stripe_customer_id = $1 ORDER BY created_at LIMIT 1
"""
# Takes the subscription's row lock, so deliveries for one subscription apply one at a time;
# returns no row when a newer event was already applied.
_ADVANCE_CLOCK_SQL = """
INSERT INTO stripe_subscriptions (subscription_id, organization_id, last_event_created_at, status)
VALUES ($1, $2::uuid, $3, $4)
ON CONFLICT (subscription_id) DO UPDATE
SET organization_id = EXCLUDED.organization_id,
    last_event_created_at = EXCLUDED.last_event_created_at,
    status = EXCLUDED.status,
    updated_at = now()
WHERE stripe_subscriptions.last_event_created_at <= EXCLUDED.last_event_created_at
RETURNING subscription_id
"""
_CURRENT_PURCHASE_SQL = """
SELECT subscription_stripe_id, subscription_status, seat_count, starts_at, expires_at
FROM organization_seats_purchases
WHERE organization_id = $1::uuid
ORDER BY created_at DESC, id DESC
LIMIT 1
"""
# clock_timestamp(), not now(): a transaction that waited for the row lock must still
# write the newest row, though it began before the one it waited for.
_INSERT_PURCHASE_SQL = """
INSERT INTO organization_seats_purchases (organization_id, subscription_stripe_id, seat_count,
    subscription_status, billing_cycle, starts_at, expires_at, idempotency_key, created_at)
VALUES ($1::uuid, $2, $3, $4, $5, $6, $7, $8, clock_timestamp())
ON CONFLICT (idempotency_key) DO NOTHING
"""


async def find_organization(
    conn: Queryable, candidates: list[str | None], customer_id: str | None
) -> str | None:
    """The first existing organization among `candidates`, else the customer's."""
    for candidate in candidates:
        if candidate is not None and await conn.fetchval(_ORG_EXISTS_SQL, candidate):
            return candidate
    if customer_id is None:
        return None
    found: str | None = await conn.fetchval(_ORG_BY_CUSTOMER_SQL, customer_id)
    return found


async def advance_clock(
    conn: Queryable, state: SubscriptionState, organization_id: str, event_created: datetime
) -> bool:
    """Record the event as the subscription's newest; False when a newer one was applied."""
    row = await conn.fetchval(
        _ADVANCE_CLOCK_SQL,
        state.subscription_id,
        organization_id,
        event_created,
        state.stripe_status,
    )
    return row is not None


async def another_subscription_pays(
    conn: Queryable, state: SubscriptionState, organization_id: str
) -> bool:
    """True when the current purchase is another subscription's and still paying now."""
    row = await conn.fetchrow(_CURRENT_PURCHASE_SQL, organization_id)
    if row is None or row["subscription_stripe_id"] == state.subscription_id:
        return False
    current = Purchase(
        status=row["subscription_status"],
        seat_count=row["seat_count"],
        starts_at=row["starts_at"].timestamp(),
        expires_at=row["expires_at"].timestamp(),
    )
    return is_paying(current, time.time())


async def apply_subscription(
    conn: Queryable,
    state: SubscriptionState,
    *,
    event_id: str,
    event_created: datetime,
    fallback_organization_id: str | None = None,
) -> str:
    """Write the purchase the subscription stands for, unless a newer event already did.

    Returns what happened: applied, stale, unmatched (no organization found) or
    kept_current (an ended subscription never replaces another one that still pays).
    """
    candidates = [state.organization_id, fallback_organization_id]
    organization_id = await find_organization(conn, candidates, state.customer_id)
    if organization_id is None:
        return "unmatched"
    if not await advance_clock(conn, state, organization_id, event_created):
        return "stale"
    if state.status not in PAYING_STATUSES and await another_subscription_pays(
        conn, state, organization_id
    ):
        return "kept_current"
    await conn.execute(
        _INSERT_PURCHASE_SQL,
        organization_id,
        state.subscription_id,
        state.seat_count,
        state.status,
        state.billing_cycle,
        state.starts_at,
        state.expires_at,
        event_id,
    )
    return "applied"
