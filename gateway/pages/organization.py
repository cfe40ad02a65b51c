"""The organization's pages: the list, creating one, and the organization page itself.

    GET  /organizations                              your organizations (the only one: its page)
    GET  /organizations/new, POST /organizations     create one: name and plan, no card
    GET  /organizations/{id}                         trial banner, credits, seats, members
    POST /organizations/{id}/invitations             invite (owners)
    POST /organizations/{id}/invitations/{inv}/revoke   revoke (owners)
    POST /organizations/{id}/credits                 buy credits: to Stripe Checkout
    POST /organizations/{id}/sso                     enterprise SSO: contact sales (owners)

Each action is what the JSON API does, through the same functions (`accounts/`), with the
same checks; only the caller is a signed-in browser instead of a key, and the answer a
redirect with a notice instead of JSON.
"""

from __future__ import annotations

import time
from typing import Any, NamedTuple

from aiohttp import web
from multidict import MultiDictProxy

from gateway.access.auth import parse_organization_id, require_user_role
from gateway.access.cache import CACHE
from gateway.access.members import ANY_ROLE, OWNERS
from gateway.access.rule import newest_live, trial_end
from gateway.accounts.checkout import (
    BILLING_ROLES,
    BillingOrg,
    load_billing_org,
    parse_amount_cents,
    start_credits,
)
from gateway.accounts.invitations import ROLES, create_invitation, invited_email
from gateway.accounts.organizations import (
    create_organization,
    fetch_members,
    membership_changed,
    organization_name,
    read_status,
    record_sales_contact,
    sales_message,
)
from gateway.accounts.payloads import choice_field
from gateway.accounts.pending_invitations import invitation_id, revoke_invitation
from gateway.accounts.profile import fetch_profile
from gateway.accounts.status import human_time, plan_pricing
from gateway.accounts.stripe_client import StripeApi, require_stripe
from gateway.common.context import CONTEXT
from gateway.config import CONFIG
from gateway.pages.render import form, notify, page, redirect, render, run, signed_in
from gateway.pages.sessions import Session
from gateway.plans import PLAN_NAMES

ORGANIZATION = "/organizations/{organization_id:[0-9a-fA-F-]{36}}"


def organization_path(organization_id: str) -> str:
    return f"/organizations/{organization_id}"


async def member_role(
    request: web.Request, session: Session, roles: frozenset[str] = ANY_ROLE
) -> tuple[str, str]:
    """The path's organization and the signed-in user's role in it, when one of `roles`."""
    organization_id = parse_organization_id(
        request.match_info["organization_id"], "The organization in the address"
    )
    request[CONTEXT].organization_id = organization_id
    role = await require_user_role(session.user_id, organization_id, request.app[CACHE], roles)
    return organization_id, role


async def organization_view(
    request: web.Request, organization_id: str, role: str
) -> dict[str, Any]:
    """Everything the organization and billing pages show, read now (not from the cache,
    so that the page reloaded after a change shows it)."""
    config = request.app[CONFIG]
    status, facts = await read_status(request.app, organization_id)
    return {
        "org": status,
        "role": role,
        "may_invite": role in OWNERS,
        "may_pay": role in BILLING_ROLES,
        "plan_name": config.catalog.plans[facts.plan].name,
        # Nothing bought yet and still in its trial: buying credits is the next step.
        "new_organization": facts.balance_microdollars <= 0
        and not facts.purchases
        and status["access"]["allowed"],
        "trial_ends": human_time(trial_end(facts, config.trial_days)),
        # The price as the spec shows it: monthly terms, billed annually.
        "pricing": status["pricing"]["display"],
        "billing_path": f"{organization_path(organization_id)}/billing",
        "live_subscription": newest_live(facts, time.time()) is not None,
    }


@page
async def list_handler(request: web.Request) -> web.StreamResponse:
    """`GET /organizations`: the user's organizations; the only one opens at once."""
    session = await signed_in(request)
    profile = await run(request, fetch_profile, session.user_id)
    organizations = [] if profile is None else profile["organizations"]
    if len(organizations) == 1 and session.notice is None:
        return redirect(organization_path(organizations[0]["id"]))
    return render(request, "organizations.html", {"organizations": organizations})


@page
async def new_handler(request: web.Request) -> web.StreamResponse:
    """`GET /organizations/new`: name and plan; no card, no seat count."""
    await signed_in(request)
    config = request.app[CONFIG]
    plans = [
        {
            "id": plan,
            "name": config.catalog.plans[plan].name,
            "price": plan_pricing(config.catalog, plan)["display"],
        }
        for plan in PLAN_NAMES
    ]
    return render(
        request, "organization_new.html", {"plans": plans, "trial_days": config.trial_days}
    )


@page
async def create_handler(request: web.Request) -> web.StreamResponse:
    """`POST /organizations`: create the trialing organization, then show its page."""
    session, fields = await form(request, "/organizations/new")
    name = organization_name(dict(fields))
    plan = choice_field(dict(fields), "plan", PLAN_NAMES, default="teams")
    config = request.app[CONFIG]
    created = await run(request, create_organization, session.user_id, name, plan, config)
    membership_changed(request.app, created["id"], session.user_id)
    await notify(
        request, session, f"{name} is created: your free {config.trial_days}-day trial starts now."
    )
    return redirect(organization_path(created["id"]))


@page
async def organization_handler(request: web.Request) -> web.StreamResponse:
    """`GET /organizations/{id}`: the organization page, for any member."""
    session = await signed_in(request)
    organization_id, role = await member_role(request, session)
    view = await organization_view(request, organization_id, role)
    listing = await run(request, fetch_members, organization_id, role in OWNERS)
    context = {**view, "members": listing["members"], "invitations": listing.get("invitations")}
    context["invite_roles"] = ROLES
    return render(request, "organization.html", context)


@page
async def invite_handler(request: web.Request) -> web.StreamResponse:
    """`POST /organizations/{id}/invitations`: an owner invites someone by email."""
    back = organization_path(request.match_info["organization_id"])
    session, fields = await form(request, back)
    organization_id, _role = await member_role(request, session, OWNERS)
    body = dict(fields)
    email = invited_email(body)
    role = choice_field(body, "role", ROLES, default="member")
    config = request.app[CONFIG]
    await run(request, create_invitation, organization_id, session.user_id, email, role, config)
    await notify(request, session, f"Invitation sent to {email}.")
    return redirect(back)


@page
async def revoke_handler(request: web.Request) -> web.StreamResponse:
    """`POST /organizations/{id}/invitations/{inv}/revoke`: an owner revokes one."""
    back = organization_path(request.match_info["organization_id"])
    session, _fields = await form(request, back)
    organization_id, _role = await member_role(request, session, OWNERS)
    invitation = invitation_id(request.match_info["invitation_id"])
    await run(request, revoke_invitation, organization_id, invitation)
    await notify(request, session, "The invitation is revoked: its link no longer works.")
    return redirect(back)


class PayingForm(NamedTuple):
    """A form posted by someone who may pay for the organization: what acting needs."""

    session: Session
    fields: MultiDictProxy[str]
    api: StripeApi
    org: BillingOrg


async def paying_form(request: web.Request, back: str) -> PayingForm:
    """The form, once its poster is an owner or billing manager and Stripe is set up."""
    session, fields = await form(request, back)
    organization_id, _role = await member_role(request, session, BILLING_ROLES)
    api = require_stripe(request.app)
    org = await load_billing_org(request.app, organization_id)
    return PayingForm(session, fields, api, org)


@page
async def credits_handler(request: web.Request) -> web.StreamResponse:
    """`POST /organizations/{id}/credits`: buy credits through Stripe Checkout."""
    back = organization_path(request.match_info["organization_id"])
    if request.query.get("from") == "billing":
        back += "/billing"
    session, fields, api, org = await paying_form(request, back)
    cents = parse_amount_cents({"amount_usd": number_field(fields.get("amount_usd"))})
    checkout = await start_credits(request.app, api, org, cents, None)
    if checkout.get("credits_locked"):
        await notify(request, session, str(checkout["message"]))
    return redirect(str(checkout["url"]))


def number_field(value: str | None) -> Any:
    """A form's number as JSON would carry it (the API's parser judges it); else as sent."""
    if value is None:
        return None
    text = value.strip().replace(",", "")
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            continue
    return value


@page
async def sso_handler(request: web.Request) -> web.StreamResponse:
    """`POST /organizations/{id}/sso`: an enterprise owner asks sales to set up SSO."""
    back = organization_path(request.match_info["organization_id"])
    session, fields = await form(request, back)
    organization_id, _role = await member_role(request, session, OWNERS)
    message = sales_message(dict(fields))
    config = request.app[CONFIG]
    result = await run(
        request, record_sales_contact, organization_id, session.user_id, message, config.sales_email
    )
    await notify(request, session, str(result["message"]))
    return redirect(back)


def setup(app: web.Application) -> None:
    """Register the organization pages."""
    app.router.add_get("/organizations", list_handler)
    app.router.add_get("/organizations/new", new_handler)
    app.router.add_post("/organizations", create_handler)
    app.router.add_get(ORGANIZATION, organization_handler)
    app.router.add_post(f"{ORGANIZATION}/invitations", invite_handler)
    app.router.add_post(f"{ORGANIZATION}/invitations/{{invitation_id}}/revoke", revoke_handler)
    app.router.add_post(f"{ORGANIZATION}/credits", credits_handler)
    app.router.add_post(f"{ORGANIZATION}/sso", sso_handler)
