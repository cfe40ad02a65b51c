"""A Stripe subscription becomes a seats purchase: the pure mapping and its named queries.

Stripe delivers events late, more than once, out of order and several in one second, so
an event's own copy of the subscription is never trusted: the webhook reads the
subscription back from Stripe and writes that state (`webhooks.py`). Each subscription's
newest `organization_seats_purchases` row is its state now; an organization may have
several, and the rule adds up the seats of those that pay. A row is written only when
the state changed, and its NOTIFY makes every gateway re-read the organization.

Two reads of one subscription can race (two events at once). `stripe_subscriptions.version`
counts the states written: the webhook reads it before asking Stripe, and a write
succeeds only if it is unchanged, else `ConcurrentUpdate` and the webhook reads again.
A state written is thus never older than one written before it; a state equal to the
newest row writes nothing and needs no such check.

    Stripe status                                   purchase status
    active, trialing                                active
    active, trialing, cancelling at period end      pending_cancel
    past_due                                        past_due
    canceled, unpaid, incomplete(_expired), paused  ended

Only items priced from our catalog sell seats (a price whose lookup key is one of
`config/plans.toml`, or that `stripe-setup` marked with `kilo_plan`): their quantities add
up. A subscription with none grants nothing; if it granted seats before, it is ended.
The cycle is `yearly` for a yearly price, else `monthly`; the period is the seat item's
(the subscription's, in API versions before 2025-03); a trialing subscription's period
ends at its trial's end, when Stripe charges for the first time.

A past_due state carries `payment_failed_at`, the instant its payment failed, from which
the rule counts the grace: the creation time of the first event that found it past_due,
kept by every later row while it stays past_due, so Stripe's retries (each one another
`invoice.payment_failed`) never extend the grace. Any other state has none.
"""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

import asyncpg

from gateway.access.queries import Queryable
from gateway.accounts.stripe_setup import PLAN_METADATA_KEY
from gateway.plans import Catalog

GRANTING_STATUSES = frozenset({"active", "trialing"})


class ConcurrentUpdate(Exception):
    """Another state of the subscription was applied after this one was read from Stripe."""


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
    grants_seats: bool = True  # False: none of its prices is ours
    payment_failed_at: datetime | None = None  # while past_due: when the payment failed


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


def is_catalog_price(price: Mapping[str, Any], catalog: Catalog) -> bool:
    """True for a price of ours: a catalog lookup key, or stripe-setup's `kilo_plan` mark."""
    if catalog.by_lookup_key(price.get("lookup_key") or "") is not None:
        return True
    return (price.get("metadata") or {}).get(PLAN_METADATA_KEY) in catalog.plans


def subscription_items(subscription: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The subscription's items."""
    return [dict(item) for item in (subscription.get("items") or {}).get("data") or []]


def seat_items(subscription: Mapping[str, Any], catalog: Catalog) -> list[dict[str, Any]]:
    """The items that sell seats: those priced from the catalog."""
    items = subscription_items(subscription)
    return [item for item in items if is_catalog_price(item.get("price") or {}, catalog)]


def subscription_state(subscription: Mapping[str, Any], catalog: Catalog) -> SubscriptionState:
    """The purchase a Stripe subscription object stands for; ValueError when it has no period."""
    seats = seat_items(subscription, catalog)
    item = (seats or subscription_items(subscription) or [{}])[0]
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
        seat_count=sum(max(int(i.get("quantity") or 0), 0) for i in seats),
        billing_cycle="yearly"
        if (price.get("recurring") or {}).get("interval") == "year"
        else "monthly",
        starts_at=datetime.fromtimestamp(start, UTC),
        expires_at=datetime.fromtimestamp(end, UTC),
        grants_seats=bool(seats),
    )


_ORG_EXISTS_SQL = "SELECT id::text FROM organizations WHERE id = $1::uuid"
_ORG_BY_CUSTOMER_SQL = """
SELECT id::text FROM organizations WHERE stripe_customer_id = $1 ORDER BY created_at LIMIT 1
"""
_VERSION_SQL = "SELECT version FROM stripe_subscriptions WHERE subscription_id = $1"
# Takes the subscription's row lock, so writes of one subscription apply one at a time;
# returns no row when the version moved since it was read ($5, NULL: there was no row).
_CLAIM_SQL = """
INSERT INTO stripe_subscriptions
    (subscription_id, organization_id, last_event_created_at, status, version)
VALUES ($1, $2::uuid, $3, $4, 1)
ON CONFLICT (subscription_id) DO UPDATE
SET organization_id = EXCLUDED.organization_id,
    last_event_created_at = greatest(stripe_subscriptions.last_event_created_at,
                                     EXCLUDED.last_event_created_at),
    status = EXCLUDED.status,
    version = stripe_subscriptions.version + 1,
    updated_at = now()
WHERE stripe_subscriptions.version IS NOT DISTINCT FROM $5::bigint
RETURNING version
"""
_LATEST_SQL = """
SELECT subscription_status, seat_count, billing_cycle, starts_at, expires_at, stripe_status,
       payment_failed_at
FROM organization_seats_purchases
WHERE organization_id = $1::uuid AND subscription_stripe_id = $2
ORDER BY created_at DESC, id DESC
LIMIT 1
"""
# clock_timestamp(), not now(): a transaction that waited for the row lock must still
# write the newest row, though it began before the one it waited for.
_INSERT_PURCHASE_SQL = """
INSERT INTO organization_seats_purchases (organization_id, subscription_stripe_id, seat_count,
    subscription_status, billing_cycle, starts_at, expires_at, idempotency_key, stripe_status,
    payment_failed_at, created_at)
VALUES ($1::uuid, $2, $3, $4, $5, $6, $7, $8, $9, $10, clock_timestamp())
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


async def subscription_version(conn: Queryable, subscription_id: str) -> int | None:
    """How many states of the subscription were applied; None before the first."""
    version: int | None = await conn.fetchval(_VERSION_SQL, subscription_id)
    return version


async def claim_version(
    conn: Queryable,
    state: SubscriptionState,
    organization_id: str,
    event_created: datetime,
    read_version: int | None,
) -> None:
    """Count this state as the next one applied; `ConcurrentUpdate` if another came first."""
    args = (state.subscription_id, organization_id, event_created, state.stripe_status)
    if await conn.fetchval(_CLAIM_SQL, *args, read_version) is None:
        raise ConcurrentUpdate(state.subscription_id)


def _row_state(state: SubscriptionState) -> tuple[Any, ...]:
    """The state as `_LATEST_SQL` reads a row back, to tell whether anything changed."""
    return (
        state.status,
        state.seat_count,
        state.billing_cycle,
        state.starts_at,
        state.expires_at,
        state.stripe_status,
        state.payment_failed_at,
    )


def with_failure(
    state: SubscriptionState, latest: asyncpg.Record | None, event_created: datetime
) -> SubscriptionState:
    """The state with its payment failure: kept from the newest row while past_due, else
    this event's time (the first to find it past_due); none when it is not past_due."""
    if state.status != "past_due":
        return dataclasses.replace(state, payment_failed_at=None)
    if latest is not None and latest["payment_failed_at"] is not None:
        return dataclasses.replace(state, payment_failed_at=latest["payment_failed_at"])
    return dataclasses.replace(state, payment_failed_at=event_created)


def _ended(latest: asyncpg.Record, state: SubscriptionState, now: datetime) -> SubscriptionState:
    """The subscription's last purchase, ended now: it no longer sells our seats."""
    return dataclasses.replace(
        state,
        status="ended",
        seat_count=latest["seat_count"],
        billing_cycle=latest["billing_cycle"],
        starts_at=latest["starts_at"],
        expires_at=max(latest["starts_at"], min(latest["expires_at"], now)),
    )


async def apply_subscription(
    conn: Queryable,
    state: SubscriptionState,
    *,
    event_id: str,
    event_created: datetime,
    read_version: int | None,
    fallback_organization_id: str | None = None,
) -> str:
    """Write the subscription's state if it changed, in the caller's transaction.

    `read_version` is `subscription_version` as read before the state was fetched.
    Returns what happened: applied, unchanged, unmatched (no organization found),
    not_ours (no price of ours: nothing granted) or not_ours_ended (it granted seats
    before, and no longer does).
    """
    candidates = [state.organization_id, fallback_organization_id]
    organization_id = await find_organization(conn, candidates, state.customer_id)
    if organization_id is None:
        return "unmatched"
    latest = await conn.fetchrow(_LATEST_SQL, organization_id, state.subscription_id)
    outcome = "applied"
    if not state.grants_seats:
        if latest is None or latest["subscription_status"] == "ended":
            return "not_ours"
        state, outcome = _ended(latest, state, datetime.now(UTC)), "not_ours_ended"
    state = with_failure(state, latest, event_created)
    if latest is not None and tuple(latest) == _row_state(state):
        # Nothing to write, so nothing to order: a read older than the row changes nothing.
        return "unchanged"
    # Only now, holding the row lock: no state was written since this one was read from
    # Stripe, so `latest` is still the newest row too.
    await claim_version(conn, state, organization_id, event_created, read_version)
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
        state.stripe_status,
        state.payment_failed_at,
    )
    return outcome
