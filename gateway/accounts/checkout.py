"""Upgrading through Stripe Checkout (annual only), buying credits, and stripe-setup.

    POST /api/organizations/{id}/subscription/checkout  {"seats": 5, "billing_cycle": "yearly"}
    POST /api/organizations/{id}/credits/checkout       {"amount_usd": 50}

A credits checkout by an organization the rule refuses now still goes ahead, and says
(`credits_locked`, `message`) that the credits stay locked until access is restored.

Both are for owners and billing managers, answer `{"url", "session_id"}` of a Stripe
Checkout Session and change nothing here: what was bought arrives later through the
webhook (`webhooks.py`). Each organization has one Stripe customer, created on its first
checkout with the owner's email. A repeated click within a minute (or a repeated
`Idempotency-Key` header) gets the same session back, because Stripe replays requests
with the same idempotency key.

An organization has one live subscription: while one is active, trialing, past_due or
pending_cancel, a subscription checkout is 409 `subscription_exists`, naming where to
change it instead. Paying during the trial keeps the free days: the subscription's trial
ends when the organization's does (`subscription_data.trial_end`), and Stripe charges
first then; with less than Stripe's minimum of 48 hours left, it charges at once.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import time
from decimal import Decimal, InvalidOperation
from typing import Any

from aiohttp import web

from gateway.access.members import authorize_member
from gateway.access.queries import Queryable, fetch_org_facts
from gateway.access.refusals import billing_url, iso_utc
from gateway.access.rule import OrgFacts, Purchase, newest_live, trial_end
from gateway.accounts.credit_locks import credits_notice
from gateway.accounts.payloads import choice_field, json_object
from gateway.accounts.stripe_client import StripeApi, require_stripe, stripe_api
from gateway.config import CONFIG, Config
from gateway.errors import BadRequest, Conflict, NotFound, Reason
from gateway.plans import BILLING_CYCLES
from gateway.platform.database import POOL, run_query

BILLING_ROLES = frozenset({"owner", "billing_manager"})
MAX_SEATS = 1000
MIN_CREDITS_USD = Decimal(5)
MAX_CREDITS_USD = Decimal(10_000)
MICRODOLLARS_PER_CENT = 10_000
CREDITS_PRODUCT_NAME = "Kilo Code credits"
# Identical checkout requests within this window get the same Checkout Session.
IDEMPOTENCY_WINDOW_SECONDS = 60
IDEMPOTENCY_HEADER = "Idempotency-Key"
# Stripe refuses a Checkout trial_end less than 48 hours away; the margin covers clocks.
MIN_TRIAL_SECONDS = 48 * 3600 + 600


@dataclasses.dataclass(frozen=True, slots=True)
class BillingOrg:
    """What a checkout needs to know about the organization."""

    id: str
    name: str
    plan: str
    stripe_customer_id: str | None
    owner_email: str | None  # the first owner's, for the Stripe customer
    # What the rule reads (purchases, members, trial), read on the same connection.
    facts: OrgFacts

    @property
    def seats_used(self) -> int:
        return self.facts.seats_used


_BILLING_ORG_SQL = """
SELECT o.id::text AS id, o.name, o.plan, o.stripe_customer_id,
       (SELECT u.email FROM organization_memberships m JOIN users u ON u.id = m.user_id
         WHERE m.organization_id = o.id AND m.role = 'owner'
         ORDER BY m.created_at, m.user_id LIMIT 1) AS owner_email
FROM organizations o
WHERE o.id = $1::uuid
"""
# Only the first customer is kept; a racing checkout's UPDATE matches no row.
_STORE_CUSTOMER_SQL = """
UPDATE organizations SET stripe_customer_id = $2
WHERE id = $1::uuid AND stripe_customer_id IS NULL
RETURNING stripe_customer_id
"""
_CUSTOMER_SQL = "SELECT stripe_customer_id FROM organizations WHERE id = $1::uuid"


async def fetch_billing_org(conn: Queryable, organization_id: str) -> BillingOrg | None:
    """The organization's plan, Stripe customer and facts, or None."""
    row = await conn.fetchrow(_BILLING_ORG_SQL, organization_id)
    facts = None if row is None else await fetch_org_facts(conn, organization_id)
    return None if row is None or facts is None else BillingOrg(**dict(row), facts=facts)


async def store_customer(conn: Queryable, organization_id: str, customer_id: str) -> str:
    """Keep `customer_id` unless the organization already has one; return the one kept."""
    stored: str | None = await conn.fetchval(_STORE_CUSTOMER_SQL, organization_id, customer_id)
    if stored is None:
        stored = await conn.fetchval(_CUSTOMER_SQL, organization_id)
    assert stored is not None
    return stored


def parse_seats(body: dict[str, Any], seats_used: int) -> int:
    """`seats`: a whole number from the members in use (at least 1) to 1000; else 400."""
    low = max(seats_used, 1)
    seats = body.get("seats")
    if isinstance(seats, int) and not isinstance(seats, bool) and low <= seats <= MAX_SEATS:
        return seats
    raise BadRequest(
        f"'seats' must be a whole number from {low} to {MAX_SEATS}: the organization has "
        f"{seats_used} member(s) using seats, and each needs one.",
        reason=Reason.INVALID_SEATS,
        metadata={"min_seats": low, "max_seats": MAX_SEATS},
    )


def parse_amount_cents(body: dict[str, Any]) -> int:
    """`amount_usd`: a number of dollars (whole cents) from 5 to 10,000, in cents; else 400."""
    value = body.get("amount_usd")
    try:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise InvalidOperation
        amount = Decimal(str(value))
        valid = MIN_CREDITS_USD <= amount <= MAX_CREDITS_USD and amount == round(amount, 2)
    except InvalidOperation:
        valid = False
    if not valid:
        raise BadRequest(
            f"'amount_usd' must be a number of dollars from {MIN_CREDITS_USD} to "
            f"{MAX_CREDITS_USD:,}, in whole cents.",
            reason=Reason.INVALID_AMOUNT,
        )
    return int(amount * 100)


def check_billing_cycle(billing_cycle: str, config: Config) -> None:
    """New monthly subscriptions are refused unless MONTHLY_PLAN_ENABLED is on."""
    if billing_cycle == "monthly" and not config.monthly_plan_enabled:
        raise BadRequest(
            "Monthly plans are no longer offered; subscribe yearly (priced per seat per "
            "month, billed annually).",
            reason=Reason.MONTHLY_PLAN_UNAVAILABLE,
        )


def idempotency_key(kind: str, parts: list[object], client_key: str | None, now: float) -> str:
    """A key equal for the same request by the same client, or within the same minute."""
    scope = f"client:{client_key}" if client_key else f"t:{int(now // IDEMPOTENCY_WINDOW_SECONDS)}"
    material = "|".join([kind, *(str(p) for p in parts), scope])
    return f"{kind}-{hashlib.sha256(material.encode()).hexdigest()[:48]}"


def return_urls(config: Config, organization_id: str) -> dict[str, str]:
    """Where Checkout sends the browser back to: the organization's billing page."""
    page = billing_url(config.app_url, organization_id)
    return {"success_url": f"{page}?checkout=success", "cancel_url": f"{page}?checkout=cancelled"}


def first_charge_at(facts: OrgFacts, now: float, trial_days: int) -> int | None:
    """When a subscription bought now is first charged: the trial's end, if Stripe allows."""
    ends_at = trial_end(facts, trial_days)
    # Rounded up to Stripe's whole seconds: the subscription's trial must not end first.
    return math.ceil(ends_at) if ends_at - now >= MIN_TRIAL_SECONDS else None


def subscription_session_params(
    config: Config,
    org: BillingOrg,
    customer_id: str,
    price_id: str,
    seats: int,
    cycle: str,
    trial_ends_at: int | None,
) -> dict[str, Any]:
    """A subscription-mode Checkout Session for `seats` seats of the org's plan."""
    subscription_data: dict[str, Any] = {"metadata": {"organization_id": org.id, "plan": org.plan}}
    if trial_ends_at is not None:
        subscription_data["trial_end"] = trial_ends_at
    return {
        "mode": "subscription",
        "customer": customer_id,
        "client_reference_id": org.id,
        "line_items": [{"price": price_id, "quantity": seats}],
        "metadata": {"organization_id": org.id, "plan": org.plan, "billing_cycle": cycle},
        "subscription_data": subscription_data,
        **return_urls(config, org.id),
    }


def refuse_second_subscription(facts: OrgFacts, now: float) -> None:
    """409 `subscription_exists` while a subscription is live: it is changed, not doubled."""
    live = newest_live(facts, now)
    if live is None:
        return
    base = f"/api/organizations/{facts.organization_id}"
    manage = {
        "portal": f"POST {base}/billing/portal",
        "subscription": f"GET {base}/subscription",
        "seats": f"POST {base}/subscription/seats",
    }
    raise Conflict(
        f"Your organization already has a subscription ({_describe(live)}); a second"
        " one would charge you twice. Change the one you have instead: open the billing"
        f" portal ({manage['portal']}), see it ({manage['subscription']}) or change its"
        f" seats ({manage['seats']}).",
        reason=Reason.SUBSCRIPTION_EXISTS,
        metadata={
            "subscription": {
                "status": live.status,
                "seat_count": live.seat_count,
                "billing_cycle": live.billing_cycle,
                "expires_at": iso_utc(live.expires_at),
            },
            "manage": manage,
        },
    )


def _describe(purchase: Purchase) -> str:
    seats = "1 seat" if purchase.seat_count == 1 else f"{purchase.seat_count} seats"
    return f"{seats}, {purchase.billing_cycle}, {purchase.status.replace('_', ' ')}"


def credits_session_params(
    config: Config, org: BillingOrg, customer_id: str, cents: int
) -> dict[str, Any]:
    """A payment-mode Checkout Session buying `cents` worth of credits."""
    metadata = {
        "organization_id": org.id,
        "kind": "credits",
        "amount_microdollars": str(cents * MICRODOLLARS_PER_CENT),
    }
    product = {"name": CREDITS_PRODUCT_NAME}
    return {
        "mode": "payment",
        "customer": customer_id,
        "client_reference_id": org.id,
        "line_items": [
            {
                "price_data": {"currency": "usd", "unit_amount": cents, "product_data": product},
                "quantity": 1,
            }
        ],
        "metadata": metadata,
        "payment_intent_data": {"metadata": metadata},
        **return_urls(config, org.id),
    }


async def ensure_customer(app: web.Application, api: StripeApi, org: BillingOrg) -> str:
    """The organization's Stripe customer, created and stored on its first checkout."""
    if org.stripe_customer_id is not None:
        return org.stripe_customer_id
    params: dict[str, Any] = {"name": org.name, "metadata": {"organization_id": org.id}}
    if org.owner_email:
        # Stripe sends receipts and the trial's end reminder to the customer's email.
        params["email"] = org.owner_email
    # The same key for the same organization: a retry or a racing request gets this customer.
    customer_id = await api.create_customer(params, f"customer-{org.id}")
    timeout = app[CONFIG].database_query_timeout_seconds
    return await run_query(app[POOL], timeout, store_customer, org.id, customer_id)


async def billing_caller(request: web.Request) -> tuple[StripeApi, BillingOrg, dict[str, Any]]:
    """Stripe, the organization and the JSON body, once the caller may pay for it."""
    api = require_stripe(request.app)
    organization_id, _key, _role = await authorize_member(request, BILLING_ROLES)
    body = await json_object(request)
    return api, await load_billing_org(request.app, organization_id), body


async def load_billing_org(app: web.Application, organization_id: str) -> BillingOrg:
    """The organization as checkouts see it, read now; 404 when it does not exist."""
    timeout = app[CONFIG].database_query_timeout_seconds
    org = await run_query(app[POOL], timeout, fetch_billing_org, organization_id)
    if org is None:
        raise NotFound("No such organization.")
    return org


async def subscription_checkout_handler(request: web.Request) -> web.Response:
    """Start a Checkout Session for a yearly (or, when enabled, monthly) seats subscription."""
    api, org, body = await billing_caller(request)
    cycle = choice_field(body, "billing_cycle", BILLING_CYCLES, "yearly")
    seats = parse_seats(body, org.seats_used)
    client_key = client_idempotency_key(request)
    return web.json_response(
        await start_subscription(request.app, api, org, seats, cycle, client_key)
    )


async def start_subscription(
    app: web.Application,
    api: StripeApi,
    org: BillingOrg,
    seats: int,
    cycle: str,
    client_key: str | None,
) -> dict[str, Any]:
    """A subscription Checkout Session for the organization: `{"url", "session_id"}`."""
    config = app[CONFIG]
    check_billing_cycle(cycle, config)
    moment = now()
    refuse_second_subscription(org.facts, moment)
    trial_ends_at = first_charge_at(org.facts, moment, config.trial_days)
    price_id = await api.price_id(config.catalog.price(org.plan, cycle).lookup_key)
    customer_id = await ensure_customer(app, api, org)
    params = subscription_session_params(
        config, org, customer_id, price_id, seats, cycle, trial_ends_at
    )
    parts: list[object] = [org.id, customer_id, org.plan, cycle, seats, trial_ends_at]
    key = idempotency_key("subscription", parts, client_key, moment)
    session = await api.create_checkout_session(params, key)
    return {"url": session.url, "session_id": session.id}


async def credits_checkout_handler(request: web.Request) -> web.Response:
    """Start a Checkout Session (payment mode) buying credits."""
    api, org, body = await billing_caller(request)
    cents = parse_amount_cents(body)
    client_key = client_idempotency_key(request)
    return web.json_response(await start_credits(request.app, api, org, cents, client_key))


async def start_credits(
    app: web.Application, api: StripeApi, org: BillingOrg, cents: int, client_key: str | None
) -> dict[str, Any]:
    """A payment-mode Checkout Session buying `cents` of credits, and whether they will
    stay locked: never refused, a blocked organization may buy ahead."""
    config = app[CONFIG]
    moment = now()
    customer_id = await ensure_customer(app, api, org)
    params = credits_session_params(config, org, customer_id, cents)
    parts: list[object] = [org.id, customer_id, cents]
    key = idempotency_key("credits", parts, client_key, moment)
    session = await api.create_checkout_session(params, key)
    notice = credits_notice(org.facts, moment, config)
    return {"url": session.url, "session_id": session.id, **notice}


def client_idempotency_key(request: web.Request) -> str | None:
    """The client's Idempotency-Key: printable ASCII of at most 255 characters, else 400."""
    value = request.headers.get(IDEMPOTENCY_HEADER)
    if value is not None and not (value.isascii() and value.isprintable() and len(value) <= 255):
        raise BadRequest(f"{IDEMPOTENCY_HEADER} must be at most 255 printable ASCII characters.")
    return value


def now() -> float:
    """The wall clock, in UNIX seconds (the idempotency window's)."""
    return time.time()


def setup(app: web.Application) -> None:
    """Register the checkout routes and the Stripe client's lifetime."""
    app.cleanup_ctx.append(stripe_api)
    base = "/api/organizations/{organization_id}"
    app.router.add_post(f"{base}/subscription/checkout", subscription_checkout_handler)
    app.router.add_post(f"{base}/credits/checkout", credits_checkout_handler)
