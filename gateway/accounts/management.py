"""Managing the subscription there is: the billing portal, reading it, changing its seats.

    POST /api/organizations/{id}/billing/portal        owners, billing managers  {"url"}
    GET  /api/organizations/{id}/subscription          any member                {"subscription"}
    POST /api/organizations/{id}/subscription/seats    owners, billing managers  {"seats": N}

**Reading.** The database names the subscription: the organization's newest live one, as
the status page shows it, since that is what the webhooks wrote and what access is judged
on. Its details are read from Stripe, in one call with the latest invoice and the
schedule inline, because they live only there: the latest invoice's status, a seat
decrease waiting for the next period, and a change made a moment ago whose webhook has
not arrived yet. Storing them would mean writing them on every event for one page; a
Stripe failure is the one envelope's 502 `billing_provider_error`, and an organization
with nothing live is answered `{"subscription": null}` without asking Stripe.

**Seats** change at Stripe only; the webhook that follows reads the subscription back and
writes the purchase (`webhooks.py`), so the answer is 202 with what Stripe was asked.
- *More* take effect now. `proration_behavior=always_invoice` invoices and charges the
  prorated rest of the period at once: with `create_prorations` the charge would wait
  for the next invoice, up to a year away on a yearly plan, while the seats are used.
  `payment_behavior=pending_if_incomplete` leaves the quantity unchanged until that
  invoice is paid, so a failed card never grants seats. A decrease still pending is
  dropped first: the number asked for now replaces it.
- *Fewer* take effect from the next period, through a subscription schedule made from
  the subscription: this period as it is, the next at the new quantity, then released.
  Stripe then bills the renewal at the new quantity itself. Keeping the decrease here
  and applying it at renewal would need a renewal hook and would race the renewal
  invoice, which Stripe draws from the quantity it holds when the period starts.
  Never below the members using seats now (409 `seats_below_members`), nor on a
  subscription cancelling at the period's end (409 `subscription_ending`): the schedule
  would renew it.
"""

from __future__ import annotations

import time
from typing import Any

from aiohttp import web

from gateway.access.members import ANY_ROLE, authorize_member
from gateway.access.queries import fetch_org_facts
from gateway.access.refusals import billing_url, iso_utc
from gateway.access.rule import Purchase, newest_live
from gateway.accounts.checkout import (
    BillingOrg,
    billing_caller,
    client_idempotency_key,
    idempotency_key,
)
from gateway.accounts.seat_changes import (
    DECREASE_PRORATION,
    INCREASE_PRORATION,
    SeatItem,
    decrease_params,
    describe_subscription,
    increase_params,
    parse_seat_count,
    refuse_below_members,
    refuse_decrease_when_ending,
    scheduled_seats,
    seat_item,
)
from gateway.accounts.stripe_client import StripeApi, require_stripe
from gateway.config import CONFIG
from gateway.errors import Conflict, NotFound, Reason
from gateway.platform.database import POOL, run_query

# What GET .../subscription and a change of seats read inline with the subscription.
SUBSCRIPTION_EXPAND = ["latest_invoice", "schedule"]


def checkout_path(organization_id: str) -> str:
    """Where a subscription starts, for the messages that send people there."""
    return f"POST /api/organizations/{organization_id}/subscription/checkout"


async def live_purchase(app: web.Application, organization_id: str) -> tuple[str, Purchase | None]:
    """The organization's plan and its newest live subscription (as the webhooks wrote it)."""
    timeout = app[CONFIG].database_query_timeout_seconds
    facts = await run_query(app[POOL], timeout, fetch_org_facts, organization_id)
    if facts is None:
        raise NotFound("No such organization.")
    return facts.plan, newest_live(facts, time.time())


async def portal_handler(request: web.Request) -> web.Response:
    """A Billing Portal session for the organization's Stripe customer: its URL."""
    api, org, _body = await billing_caller(request)
    return web.json_response({"url": await portal_url(request.app, api, org)})


async def portal_url(app: web.Application, api: StripeApi, org: BillingOrg) -> str:
    """A Billing Portal session's URL; 409 `no_billing_account` before any checkout."""
    page = billing_url(app[CONFIG].app_url, org.id)
    if org.stripe_customer_id is None:
        raise Conflict(
            "Your organization has no billing account yet, so there is nothing to manage:"
            f" subscribe or buy credits first ({checkout_path(org.id)}, or on {page}).",
            reason=Reason.NO_BILLING_ACCOUNT,
            metadata={"subscribe": checkout_path(org.id), "billing_url": page},
        )
    params = {
        "customer": org.stripe_customer_id,
        "configuration": await api.portal_configuration_id(),
        "return_url": page,
    }
    return await api.create_portal_session(params)


async def subscription_handler(request: web.Request) -> web.Response:
    """The live subscription as Stripe holds it now, or null."""
    organization_id, _key, _role = await authorize_member(request, ANY_ROLE)
    return web.json_response(
        {"subscription": await read_subscription(request.app, organization_id)}
    )


async def read_subscription(app: web.Application, organization_id: str) -> dict[str, Any] | None:
    """The newest live subscription as Stripe holds it now; None (Stripe not asked) when
    nothing is live."""
    plan, purchase = await live_purchase(app, organization_id)
    if purchase is None:
        return None
    api = require_stripe(app)
    subscription = await api.subscription_with(purchase.subscription_id, SUBSCRIPTION_EXPAND)
    return describe_subscription(subscription, plan, app[CONFIG].catalog)


async def seats_handler(request: web.Request) -> web.Response:
    """Ask Stripe for N seats: more now (prorated), fewer from the next period."""
    api, org, body = await billing_caller(request)
    seats = parse_seat_count(body)
    client_key = client_idempotency_key(request)
    return web.json_response(
        await change_seats(request.app, api, org, seats, client_key), status=202
    )


async def change_seats(
    app: web.Application, api: StripeApi, org: BillingOrg, seats: int, client_key: str | None
) -> dict[str, Any]:
    """What Stripe was asked for `seats` seats; 409 when there is no subscription to change."""
    purchase = newest_live(org.facts, time.time())
    subscription = None
    if purchase is not None:
        subscription = await api.subscription_with(purchase.subscription_id, ["schedule"])
    item = None if subscription is None else seat_item(subscription, app[CONFIG].catalog)
    if subscription is None or item is None:
        raise Conflict(
            "Your organization has no subscription whose seats can be changed: subscribe"
            f" first ({checkout_path(org.id)}).",
            reason=Reason.NO_SUBSCRIPTION,
            metadata={"subscribe": checkout_path(org.id)},
        )
    if seats < item.quantity:
        refuse_below_members(seats, org.seats_used)
        refuse_decrease_when_ending(subscription)
        return await schedule_decrease(api, subscription, item, seats, org)
    return await increase(api, subscription, item, seats, client_key)


async def increase(
    api: StripeApi, subscription: dict[str, Any], item: SeatItem, seats: int, client_key: str | None
) -> dict[str, Any]:
    """More seats now, the prorated rest of the period charged at once (or the same seats);
    a decrease still scheduled is dropped either way."""
    answer = change_answer(subscription, item, seats, "now", time.time())
    schedule = subscription.get("schedule")
    dropped = False
    if isinstance(schedule, dict) and scheduled_seats(schedule, item) is not None:
        await api.release_schedule(str(schedule["id"]))
        dropped = True
    answer["scheduled_change_cancelled"] = dropped
    if seats == item.quantity:
        answer["message"] = f"The subscription keeps its {seats} seats" + (
            "; the decrease scheduled for the next period is cancelled." if dropped else "."
        )
        return answer
    parts: list[object] = [subscription["id"], item.item_id, item.quantity, seats]
    key = idempotency_key("seats", parts, client_key, time.time())
    params = increase_params(item, seats)
    updated = await api.update_subscription(str(subscription["id"]), params, key)
    answer["proration_behavior"] = INCREASE_PRORATION
    # pending_if_incomplete: Stripe keeps the new quantity aside until the invoice is paid.
    answer["awaiting_payment"] = bool(updated.get("pending_update"))
    answer["message"] = (
        f"Asked Stripe for {seats} seats from now; the prorated rest of the period is"
        " invoiced and charged at once, and the seats count once it is paid."
    )
    return answer


async def schedule_decrease(
    api: StripeApi, subscription: dict[str, Any], item: SeatItem, seats: int, org: BillingOrg
) -> dict[str, Any]:
    """Fewer seats from the next period on, through the subscription's schedule."""
    schedule = subscription.get("schedule")
    if not isinstance(schedule, dict):
        schedule = await api.create_schedule({"from_subscription": subscription["id"]})
    params = decrease_params(schedule, item, seats, org.id)
    await api.update_schedule(str(schedule["id"]), params)
    answer = change_answer(subscription, item, seats, "next_period", item.period_end)
    answer["proration_behavior"] = DECREASE_PRORATION
    answer["message"] = (
        f"Asked Stripe for {seats} seats from {answer['effective_at']}, when the next period"
        f" starts; until then the organization keeps its {item.quantity} seats."
    )
    return answer


def change_answer(
    subscription: dict[str, Any], item: SeatItem, seats: int, effective: str, at: float
) -> dict[str, Any]:
    """What the seats endpoint answers: the change asked of Stripe and from when."""
    return {
        "subscription_id": subscription["id"],
        "seats": {"current": item.quantity, "requested": seats},
        "effective": effective,
        "effective_at": iso_utc(at),
    }


def setup(app: web.Application) -> None:
    """Register the portal and subscription management routes."""
    base = "/api/organizations/{organization_id}"
    app.router.add_post(f"{base}/billing/portal", portal_handler)
    app.router.add_get(f"{base}/subscription", subscription_handler)
    app.router.add_post(f"{base}/subscription/seats", seats_handler)
