"""`POST /api/stripe/webhook`: Stripe's events, the source of truth for what was bought.

1. The raw body is verified against `Stripe-Signature` with `STRIPE_WEBHOOK_SECRET` by
   the stripe library: a forged, stale (older than 300 s) or missing signature is 400
   `invalid_signature`, and nothing is written.
2. The subscription behind any subscription event (`customer.subscription.*`, a
   subscription-mode `checkout.session.completed`, `invoice.paid`,
   `invoice.payment_failed`) is read from Stripe, outside any transaction: its state now,
   never the event's copy, so the order events arrive in and their whole-second
   timestamps do not matter.
3. One transaction records the event id, once (a redelivery is answered
   `{"received": true, "duplicate": true}`), and applies the event:
   - a subscription event: the subscription's state becomes its seats purchase
     (`stripe_subscriptions.py`) when it changed. If another delivery applied a state of
     the same subscription meanwhile, the transaction is undone and the subscription read
     again (`ConcurrentUpdate`), at most `SYNC_ATTEMPTS` times. A subscription with no
     price of ours grants nothing and is logged at warning;
   - `invoice.payment_failed` also emails the owners and billing managers, once per
     invoice, while the subscription is past_due (`payment_failures.py`);
   - a paid credits checkout (`checkout.session.completed`, or
     `checkout.session.async_payment_succeeded` for delayed payment methods): one ledger
     row per payment intent, however often it is delivered;
   - any other type is only recorded (and logged at debug: Stripe sends many).
4. Events are expected in `STRIPE_API_VERSION`, the webhook endpoint's version; another
   is logged at warning (only ids are read from an event, the rest from Stripe).
5. An unexpected failure is a 500 and rolls everything back, the event id included, so
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
from gateway.accounts.payment_failures import PAYMENT_FAILED_EVENT, queue_failure_email
from gateway.accounts.stripe_client import (
    STRIPE_API_VERSION,
    StripeApi,
    require_stripe,
    verify_webhook,
)
from gateway.accounts.stripe_subscriptions import (
    ConcurrentUpdate,
    apply_subscription,
    canonical_uuid,
    object_id,
    subscription_items,
    subscription_state,
    subscription_version,
)
from gateway.common.money import MICRODOLLARS_PER_USD
from gateway.config import CONFIG, Config
from gateway.errors import BadRequest, BillingUnavailable, InternalError, Reason
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
INVOICE_EVENTS = frozenset({"invoice.paid", PAYMENT_FAILED_EVENT})
CHECKOUT_COMPLETED = "checkout.session.completed"
CREDIT_EVENTS = frozenset({CHECKOUT_COMPLETED, "checkout.session.async_payment_succeeded"})
HANDLED_EVENTS = SUBSCRIPTION_EVENTS | INVOICE_EVENTS | CREDIT_EVENTS
DUPLICATE = "duplicate"
NOT_OURS = frozenset({"not_ours", "not_ours_ended"})
# Reads of one subscription racing each other: each lost race means another state was
# written meanwhile, so a handful of attempts always suffices but under a storm.
SYNC_ATTEMPTS = 5


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
    """The subscription behind an event, to be read from Stripe; None for other events."""
    obj = event.object
    if event.type in SUBSCRIPTION_EVENTS:
        return object_id(obj)
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


@dataclasses.dataclass(frozen=True, slots=True)
class ReadBack:
    """A subscription as Stripe had it, and its `stripe_subscriptions.version` before that."""

    subscription: dict[str, Any]
    version: int | None


async def apply_event(
    conn: Queryable, event: Event, read_back: ReadBack | None, config: Config
) -> str:
    """Apply one event (already recorded) in the caller's transaction; returns the outcome."""
    payment = credit_payment(event)
    if payment is not None:
        return await credit_ledger(conn, payment)
    if read_back is None:
        return "recorded"
    fallback = None
    if event.type == CHECKOUT_COMPLETED:
        metadata = event.object.get("metadata") or {}
        fallback = canonical_uuid(metadata.get("organization_id")) or canonical_uuid(
            event.object.get("client_reference_id")
        )
    state = subscription_state(read_back.subscription, config.catalog)
    outcome = await apply_subscription(
        conn,
        state,
        event_id=event.id,
        event_created=event.created,
        read_version=read_back.version,
        fallback_organization_id=fallback,
    )
    invoice_id = object_id(event.object)
    if event.type == PAYMENT_FAILED_EVENT and invoice_id is not None:
        await queue_failure_email(conn, invoice_id, state.subscription_id, config)
    return outcome


async def record_and_apply(
    conn: asyncpg.Connection, event: Event, read_back: ReadBack | None, config: Config
) -> str:
    """Record and apply the event in one transaction; `duplicate` when it was seen before."""
    async with conn.transaction():
        if not await record_event(conn, event):
            return DUPLICATE
        return await apply_event(conn, event, read_back, config)


def webhook_secret(config: Config) -> str:
    """The signing secret, or 503 (Stripe retries) when this gateway has none."""
    if not config.stripe_webhook_secret:
        raise BillingUnavailable(
            "Stripe webhooks are not accepted: STRIPE_WEBHOOK_SECRET is not set on this gateway."
        )
    return config.stripe_webhook_secret


async def receive(app: web.Application, api: StripeApi, event: Event) -> str:
    """Record and apply an event not seen before, reading its subscription from Stripe."""
    config = app[CONFIG]
    pool, timeout = app[POOL], config.database_query_timeout_seconds
    subscription_id = None if credit_payment(event) else related_subscription_id(event)
    if subscription_id is None:
        return await run_query(pool, timeout, record_and_apply, event, None, config)
    for _attempt in range(SYNC_ATTEMPTS):
        # Read before Stripe is: a state another delivery writes after this point may be
        # newer than the one fetched below, which is then not written (ConcurrentUpdate).
        version = await run_query(pool, timeout, subscription_version, subscription_id)
        read_back = ReadBack(await api.retrieve_subscription(subscription_id), version)
        try:
            outcome = await run_query(pool, timeout, record_and_apply, event, read_back, config)
        except ConcurrentUpdate:
            log.info("stripe_subscription_read_again", subscription_id=subscription_id)
            continue
        if outcome in NOT_OURS:
            warn_not_ours(event, read_back.subscription, outcome)
        return outcome
    # Stripe retries the event later, when the storm of updates has passed.
    raise InternalError("The subscription kept changing while it was applied; retry later.")


def warn_not_ours(event: Event, subscription: dict[str, Any], outcome: str) -> None:
    """A subscription none of whose prices is ours grants nothing: say so, once per event."""
    prices = [item.get("price") or {} for item in subscription_items(subscription)]
    log.warning(
        "stripe_subscription_not_ours",
        event_id=event.id,
        subscription_id=subscription.get("id"),
        outcome=outcome,
        prices=[{"id": p.get("id"), "lookup_key": p.get("lookup_key")} for p in prices],
    )


def check_api_version(raw: dict[str, Any]) -> None:
    """Warn when the webhook endpoint sends events in another API version than ours."""
    version = raw.get("api_version")
    if version is not None and version != STRIPE_API_VERSION:
        log.warning(
            "stripe_event_api_version_differs",
            event_api_version=version,
            expected=STRIPE_API_VERSION,
        )


async def webhook_handler(request: web.Request) -> web.Response:
    """Verify, record once and apply a Stripe event."""
    api = require_stripe(request.app)
    config = request.app[CONFIG]
    secret = webhook_secret(config)
    raw = verify_webhook(await request.read(), request.headers.get(SIGNATURE_HEADER), secret)
    event = parse_event(raw)
    check_api_version(raw)
    pool, timeout = request.app[POOL], config.database_query_timeout_seconds
    if await run_query(pool, timeout, is_recorded, event.id):
        outcome = DUPLICATE
    else:
        outcome = await receive(request.app, api, event)
    # Stripe sends every event type the endpoint subscribes to; the others are noise.
    log_event = log.info if event.type in HANDLED_EVENTS else log.debug
    log_event("stripe_event", event_id=event.id, event_type=event.type, outcome=outcome)
    if outcome == DUPLICATE:
        return web.json_response({"received": True, "duplicate": True})
    return web.json_response({"received": True})


def setup(app: web.Application) -> None:
    """Register the webhook route (the Stripe client is billing's)."""
    app.router.add_post("/api/stripe/webhook", webhook_handler)
