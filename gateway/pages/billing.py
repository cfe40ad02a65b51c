"""The subscription page (`$APP_URL/organizations/{id}/billing`, where every 402 points).

    GET  /organizations/{id}/billing              status, period end, seats; the forms
    POST /organizations/{id}/billing/subscribe    a seats subscription: to Stripe Checkout
    POST /organizations/{id}/billing/seats        more seats now, fewer from the next period
    POST /organizations/{id}/billing/portal       card, invoices, cancelling: Stripe's portal

Any member may look; owners and billing managers may act, as on the API. The details of
a live subscription (the latest invoice, a decrease waiting for the next period) are
read from Stripe, as `GET .../subscription` does; when Stripe does not answer, the page
still shows what the webhooks wrote, and says so.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from gateway.accounts.checkout import MAX_SEATS, parse_seats, start_subscription
from gateway.accounts.management import change_seats, portal_url, read_subscription
from gateway.accounts.payloads import choice_field
from gateway.accounts.seat_changes import parse_seat_count
from gateway.config import CONFIG
from gateway.errors import GatewayError
from gateway.pages.organization import (
    ORGANIZATION,
    member_role,
    number_field,
    organization_path,
    organization_view,
    paying_form,
)
from gateway.pages.render import notify, page, redirect, render, signed_in
from gateway.plans import BILLING_CYCLES

# What Stripe Checkout's return adds to the billing page's address.
CHECKOUT_NOTICES = {
    "success": "Thank you: Stripe has your payment details. The subscription shows here as"
    " soon as Stripe confirms it, usually within seconds; reload the page to see it.",
    "cancelled": "Checkout was cancelled: nothing was bought.",
}


@page
async def billing_handler(request: web.Request) -> web.StreamResponse:
    """`GET /organizations/{id}/billing`: the subscription page, for any member."""
    session = await signed_in(request)
    organization_id, role = await member_role(request, session)
    view = await organization_view(request, organization_id, role)
    config = request.app[CONFIG]
    stripe_details, stripe_error = await stripe_view(request, organization_id, view)
    cycles = [c for c in BILLING_CYCLES if c == "yearly" or config.monthly_plan_enabled]
    context: dict[str, Any] = {
        **view,
        "details": stripe_details,
        "stripe_error": stripe_error,
        "billing_available": config.stripe_configured,
        "cycles": cycles,
        "min_seats": max(view["org"]["seats"]["used"], 1),
        "max_seats": MAX_SEATS,
        "checkout_notice": CHECKOUT_NOTICES.get(request.query.get("checkout", "")),
    }
    return render(request, "billing.html", context)


async def stripe_view(
    request: web.Request, organization_id: str, view: dict[str, Any]
) -> tuple[dict[str, Any] | None, str | None]:
    """The live subscription as Stripe holds it, or why it cannot be shown."""
    if view["org"]["subscription"] is None or not request.app[CONFIG].stripe_configured:
        return None, None
    try:
        return await read_subscription(request.app, organization_id), None
    except GatewayError as exc:
        return None, exc.message


@page
async def subscribe_handler(request: web.Request) -> web.StreamResponse:
    """`POST .../billing/subscribe`: start a Checkout Session and go to it."""
    _session, fields, api, org = await paying_form(request, billing_path_of(request))
    body: dict[str, Any] = {"seats": number_field(fields.get("seats"))}
    if "billing_cycle" in fields:
        body["billing_cycle"] = fields["billing_cycle"]
    cycle = choice_field(body, "billing_cycle", BILLING_CYCLES, "yearly")
    seats = parse_seats(body, org.seats_used)
    checkout = await start_subscription(request.app, api, org, seats, cycle, None)
    return redirect(str(checkout["url"]))


@page
async def seats_handler(request: web.Request) -> web.StreamResponse:
    """`POST .../billing/seats`: change the subscription's seats at Stripe."""
    back = billing_path_of(request)
    session, fields, api, org = await paying_form(request, back)
    seats = parse_seat_count({"seats": number_field(fields.get("seats"))})
    answer = await change_seats(request.app, api, org, seats, None)
    await notify(request, session, str(answer["message"]))
    return redirect(back)


@page
async def portal_handler(request: web.Request) -> web.StreamResponse:
    """`POST .../billing/portal`: to Stripe's Billing Portal (card, invoices, cancel)."""
    _session, _fields, api, org = await paying_form(request, billing_path_of(request))
    return redirect(await portal_url(request.app, api, org))


def billing_path_of(request: web.Request) -> str:
    """The subscription page of the organization in the request's path."""
    return f"{organization_path(request.match_info['organization_id'])}/billing"


def setup(app: web.Application) -> None:
    """Register the subscription page."""
    app.router.add_get(f"{ORGANIZATION}/billing", billing_handler)
    app.router.add_post(f"{ORGANIZATION}/billing/subscribe", subscribe_handler)
    app.router.add_post(f"{ORGANIZATION}/billing/seats", seats_handler)
    app.router.add_post(f"{ORGANIZATION}/billing/portal", portal_handler)
