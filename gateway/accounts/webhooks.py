"""`POST /api/stripe/webhook`: Stripe's events, the source of truth for what was bought.

1. The raw body is verified against `Stripe-Signature` with `STRIPE_WEBHOOK_SECRET` by
   the stripe library: a forged, stale (older than 300 s) or missing signature is 400
   `invalid_signature`, and nothing is written.
2. A subscription the event only names (behind a checkout or an invoice) is read from
   Stripe first, outside any transaction.
3. One transaction records the event id, once (a redelivery is answered
   `{"received": true, "duplicate": true}`), and applies the event:
   - `customer.subscription.created|updated|deleted`: the subscription in the event
     becomes a seats purchase (`stripe_subscriptions.py`), unless a newer event already
     wrote one;
   - `checkout.session.completed` in subscription mode, `invoice.paid` and
     `invoice.payment_failed`: the same, with the subscription as Stripe has it now;
   - a paid credits checkout (`checkout.session.completed`, or
     `checkout.session.async_payment_succeeded` for delayed payment methods): one ledger
     row per payment intent, however often it is delivered;
   - any other type is only recorded.
4. An unexpected failure is a 500 and rolls everything back, the event id included, so
   Stripe's retry starts clean.
"""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime
from typing import Any

import asyncpg
import structlog
from aiohttp import web

from gateway.access.queries import Queryable
from gateway.accounts.stripe_client import StripeApi, require_stripe, verify_webhook
from gateway.accounts.stripe_subscriptions import (
    apply_subscription,
    canonical_uuid,
    object_id,
    subscription_state,
)
from gateway.common.money import MICRODOLLARS_PER_USD
from gateway.config import CONFIG, Config
from gateway.errors import BadRequest, BillingUnavailable, Reason
from gateway.plans import Catalog
from gateway.platform.database import POOL, run_query

log = structlog.get_logger("gateway.webhooks")

SIGNATURE_HEADER = "Stripe-Signature"
SUBSCRIPTION_EVENTS = frozenset(
    {
        "customer.subscription.created",
        "customer.subscription.updated",
        "customer.subscription.deleted",
    }
)
INVOICE_EVENTS = frozenset({"invoice.paid", "invoice.payment_failed"})
CHECKOUT_COMPLETED = "checkout.session.completed"
CREDIT_EVENTS = frozenset({CHECKOUT_COMPLETED, "checkout.session.async_payment_succeeded"})
DUPLICATE = "duplicate"


@dataclasses.dataclass(frozen=True, slots=True)
class Event:
    """A verified Stripe event: its id, type, creation time and the object it carries."""

    id: str
    type: str
    created: datetime
    object: dict[str, Any]


@dataclasses.dataclass(frozen=True, slots=True)
class CreditPayment:
    """A paid credits checkout: who bought how much, and the payment that pays for it."""

    organization_id: str
    amount_microdollars: int
    payment_id: str


def parse_event(raw: dict[str, Any]) -> Event:
    """The parts of a Stripe event the gateway uses; 400 when they are missing."""
    try:
        data_object = raw["data"]["object"]
        event = Event(
            id=str(raw["id"]),
            type=str(raw["type"]),
            created=datetime.fromtimestamp(int(raw["created"]), UTC),
            object=data_object,
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise BadRequest(
            "The webhook body is not a Stripe event.", reason=Reason.INVALID_PAYLOAD
        ) from exc
    if not isinstance(event.object, dict):
        raise BadRequest("The webhook event carries no object.", reason=Reason.INVALID_PAYLOAD)
    return event


def related_subscription_id(event: Event) -> str | None:
    """The subscription an event names but does not carry, to be read from Stripe."""
    obj = event.object
    if event.type == CHECKOUT_COMPLETED and obj.get("mode") == "subscription":
        return object_id(obj.get("subscription"))
    if event.type in INVOICE_EVENTS:
        # API versions since 2025-03 moved it under parent.subscription_details.
        details = (obj.get("parent") or {}).get("subscription_details") or {}
        return object_id(obj.get("subscription")) or object_id(details.get("subscription"))
    return None


def credit_payment(event: Event) -> CreditPayment | None:
    """The credits a paid payment-mode checkout bought, or None for any other event."""
    session = event.object
    metadata = session.get("metadata") or {}
    if (
        event.type not in CREDIT_EVENTS
        or session.get("mode") != "payment"
        or metadata.get("kind") != "credits"
        or session.get("payment_status") != "paid"
    ):
        return None
    organization_id = canonical_uuid(metadata.get("organization_id")) or canonical_uuid(
        session.get("client_reference_id")
    )
    amount = str(metadata.get("amount_microdollars", ""))
    payment_id = object_id(session.get("payment_intent")) or object_id(session)
    if organization_id is None or not amount.isdigit() or int(amount) <= 0 or payment_id is None:
        return None
    return CreditPayment(organization_id, int(amount), payment_id)


_IS_RECORDED_SQL = "SELECT true FROM stripe_events WHERE id = $1"
_RECORD_EVENT_SQL = """
INSERT INTO stripe_events (id, type, created_at) VALUES ($1, $2, $3)
ON CONFLICT (id) DO NOTHING
RETURNING id
"""
# Inserts nothing for an organization that does not exist, or a payment already credited.
_CREDIT_SQL = """
INSERT INTO credit_transactions (organization_id, amount_microdollars, description,
    stripe_payment_id)
SELECT id, $2, $3, $4 FROM organizations WHERE id = $1::uuid
ON CONFLICT (stripe_payment_id) DO NOTHING
RETURNING id
"""


async def is_recorded(conn: Queryable, event_id: str) -> bool:
    """True when the event was already received."""
    return bool(await conn.fetchval(_IS_RECORDED_SQL, event_id))


async def record_event(conn: Queryable, event: Event) -> bool:
    """Record the event id; False when it was already there."""
    return await conn.fetchval(_RECORD_EVENT_SQL, event.id, event.type, event.created) is not None


async def credit_ledger(conn: Queryable, payment: CreditPayment) -> str:
    """Add the payment's credits to the ledger, once per payment."""
    usd = payment.amount_microdollars / MICRODOLLARS_PER_USD
    description = f"Credits bought through Stripe (${usd:,.2f})"
    row = await conn.fetchval(
        _CREDIT_SQL,
        payment.organization_id,
        payment.amount_microdollars,
        description,
        payment.payment_id,
    )
    return "credited" if row is not None else "not_credited"


async def apply_event(
    conn: Queryable, event: Event, subscription: dict[str, Any] | None, catalog: Catalog
) -> str:
    """Apply one event (already recorded) in the caller's transaction; returns the outcome."""
    payment = credit_payment(event)
    if payment is not None:
        return await credit_ledger(conn, payment)
    if event.type in SUBSCRIPTION_EVENTS:
        subscription = event.object
    if subscription is None:
        return "recorded"
    fallback = None
    if event.type == CHECKOUT_COMPLETED:
        metadata = event.object.get("metadata") or {}
        fallback = canonical_uuid(metadata.get("organization_id")) or canonical_uuid(
            event.object.get("client_reference_id")
        )
    return await apply_subscription(
        conn,
        subscription_state(subscription, catalog),
        event_id=event.id,
        event_created=event.created,
        fallback_organization_id=fallback,
    )


async def record_and_apply(
    conn: asyncpg.Connection, event: Event, subscription: dict[str, Any] | None, catalog: Catalog
) -> str:
    """Record and apply the event in one transaction; `duplicate` when it was seen before."""
    async with conn.transaction():
        if not await record_event(conn, event):
            return DUPLICATE
        return await apply_event(conn, event, subscription, catalog)


def webhook_secret(config: Config) -> str:
    """The signing secret, or 503 (Stripe retries) when this gateway has none."""
    if not config.stripe_webhook_secret:
        raise BillingUnavailable(
            "Stripe webhooks are not accepted: STRIPE_WEBHOOK_SECRET is not set on this gateway."
        )
    return config.stripe_webhook_secret


async def fetch_subscription(api: StripeApi, event: Event) -> dict[str, Any] | None:
    """The subscription the event names, as Stripe has it now; None when it names none."""
    subscription_id = related_subscription_id(event)
    return None if subscription_id is None else await api.retrieve_subscription(subscription_id)


async def webhook_handler(request: web.Request) -> web.Response:
    """Verify, record once and apply a Stripe event."""
    api = require_stripe(request.app)
    config = request.app[CONFIG]
    secret = webhook_secret(config)
    raw = verify_webhook(await request.read(), request.headers.get(SIGNATURE_HEADER), secret)
    event = parse_event(raw)
    pool, timeout = request.app[POOL], config.database_query_timeout_seconds
    if await run_query(pool, timeout, is_recorded, event.id):
        outcome = DUPLICATE
    else:
        subscription = await fetch_subscription(api, event)
        outcome = await run_query(
            pool, timeout, record_and_apply, event, subscription, config.catalog
        )
    log.info("stripe_event", event_id=event.id, event_type=event.type, outcome=outcome)
    if outcome == DUPLICATE:
        return web.json_response({"received": True, "duplicate": True})
    return web.json_response({"received": True})


def setup(app: web.Application) -> None:
    """Register the webhook route (the Stripe client is billing's)."""
    app.router.add_post("/api/stripe/webhook", webhook_handler)
