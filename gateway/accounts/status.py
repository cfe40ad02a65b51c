"""What an organization is shown about itself: trial, seats, call to action, pricing.

Pure functions of the organization's facts (the proxy's own `OrgFacts`) and a clock in
UNIX seconds; the handlers fetch the facts and act. Access is always `rule.decide`'s
verdict on those facts, never a second copy of the rule.

The call to action grows louder as the trial ends, by days left (the time left rounded
up to whole days, as a person counts: 30 on the day an organization is created):

    access refused (trial over and not paying, ...)     blocking, the 402's reason and text
    a payment failed, within its grace (past_due)       blocking, `payment_failed`
    exempt (require_seats = false)                      none
    paying, enough seats                                none
    paid during the trial, more members than seats      warning, urgent from 3 days left
    more than 7 days left                               info
    4 to 7 days left                                    warning
    1 to 3 days left                                    urgent

Seats are unlimited only during a trial nothing was bought in, and for exempt
organizations: from the first purchase on, its seats (all paying subscriptions' added
up) cap invitations, though the proxy stays open until the trial ends.

Trial reminder emails follow the same days: `7_days` from 7 days left, `3_days` from 3,
`1_day` from 1, `expired` in the week after the trial ends; only the latest one due is
sent, so a reminder never says "7 days left" when one is.

Every judgement here is the verdict's (`rule.decide`): paying, seats purchased, the
failed payment and its grace.
"""

from __future__ import annotations

import math
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from gateway.access.refusals import balance_usd, billing_url, iso_utc, refusal_message
from gateway.access.rule import (
    SECONDS_PER_DAY,
    OrgFacts,
    Purchase,
    Reason,
    Standing,
    Verdict,
    decide,
    newest_live,
)
from gateway.plans import Catalog

WARNING_DAYS = 7
URGENT_DAYS = 3
# After the trial, the "expired" reminder is still sent this long (then never).
EXPIRED_REMINDER_WINDOW_SECONDS = 7 * SECONDS_PER_DAY
BILLING_MANAGER = "billing_manager"


class Level(StrEnum):
    NONE = "none"
    INFO = "info"
    WARNING = "warning"
    URGENT = "urgent"
    BLOCKING = "blocking"


class ReminderStage(StrEnum):
    DAYS_7 = "7_days"
    DAYS_3 = "3_days"
    DAYS_1 = "1_day"
    EXPIRED = "expired"


# The latest stage whose day count has been reached wins.
_REMINDER_DAYS = ((ReminderStage.DAYS_1, 1), (ReminderStage.DAYS_3, 3), (ReminderStage.DAYS_7, 7))

_BLOCKING_TITLES = {
    Reason.TRIAL_EXPIRED: "Your free trial has ended",
    Reason.SUBSCRIPTION_INACTIVE: "Your subscription is not active",
    Reason.SEATS_EXCEEDED: "Your organization needs more seats",
    Reason.PAYMENT_FAILED: "Your payment failed",
}


def days_remaining(trial_ends_at: float, now: float) -> int:
    """Days left in the trial, rounded up to whole days (30 on the day a 30-day trial
    starts, 1 on its last day); 0 from its end on."""
    return max(0, math.ceil((trial_ends_at - now) / SECONDS_PER_DAY))


def trial_stage(trial_ends_at: float, now: float) -> str:
    """`trialing` before the trial's end, `expired` from that instant on."""
    return "trialing" if now < trial_ends_at else "expired"


def seats_unlimited(facts: OrgFacts, verdict: Verdict) -> bool:
    """True while members are not counted: exempt, or trialing with nothing bought yet."""
    if not facts.require_seats:
        return True
    return verdict.trialing and not verdict.paying


def seats_short(facts: OrgFacts, verdict: Verdict) -> int:
    """How many more members there are than seats bought (0 when unlimited or enough)."""
    if seats_unlimited(facts, verdict):
        return 0
    return max(0, facts.seats_used - verdict.seats_purchased)


def has_seat_for(role: str, *, unlimited: bool, taken: int, purchased: int) -> bool:
    """Whether one more `role` fits: billing managers take no seat; `taken` counts the rest."""
    needed = 0 if role == BILLING_MANAGER else 1
    return unlimited or taken + needed <= purchased


def call_to_action_level(facts: OrgFacts, verdict: Verdict, now: float) -> Level:
    """How loudly to ask for an upgrade, given the verdict on `facts` at `now`."""
    if not verdict.allowed or payment_failing(facts, verdict):
        return Level.BLOCKING
    if not facts.require_seats or verdict.standing is not Standing.TRIALING:
        return Level.NONE
    days = days_remaining(verdict.trial_ends_at, now)
    if verdict.paying:
        if not seats_short(facts, verdict):
            return Level.NONE
        return Level.WARNING if days > URGENT_DAYS else Level.URGENT
    if days > WARNING_DAYS:
        return Level.INFO
    return Level.WARNING if days > URGENT_DAYS else Level.URGENT


def payment_failing(facts: OrgFacts, verdict: Verdict) -> bool:
    """True while a payment failed and access goes on in its grace (exempt orgs aside)."""
    return facts.require_seats and verdict.allowed and verdict.payment_failed_at is not None


def reminder_stage(facts: OrgFacts, verdict: Verdict, now: float) -> ReminderStage | None:
    """The trial reminder due at `now` by the verdict on `facts`, if any (not when paying
    or exempt)."""
    if not facts.require_seats or verdict.paying:
        return None
    ends_at = verdict.trial_ends_at
    if now >= ends_at:
        return ReminderStage.EXPIRED if now - ends_at < EXPIRED_REMINDER_WINDOW_SECONDS else None
    days = days_remaining(ends_at, now)
    for stage, limit in _REMINDER_DAYS:
        if days <= limit:
            return stage
    return None


def plan_pricing(catalog: Catalog, plan: str) -> dict[str, Any]:
    """The plan's annual price per seat, stated in monthly terms."""
    yearly = catalog.price(plan, "yearly")
    monthly_cents, yearly_cents = yearly.monthly_cents, yearly.unit_amount_cents
    return {
        "per_seat_monthly_usd": _usd(monthly_cents),
        "billed": "annually",
        "per_seat_yearly_usd": _usd(yearly_cents),
        "display": (
            f"{_money(monthly_cents)} per seat per month, billed annually ({_money(yearly_cents)})"
        ),
    }


def _usd(cents: int) -> int | float:
    return cents // 100 if cents % 100 == 0 else cents / 100


def _money(cents: int) -> str:
    return f"${cents // 100:,}" if cents % 100 == 0 else f"${cents / 100:,.2f}"


def human_time(unix_seconds: float) -> str:
    """A UTC instant as people read it: `2026-12-25 10:20 UTC`."""
    return datetime.fromtimestamp(unix_seconds, UTC).strftime("%Y-%m-%d %H:%M UTC")


def call_to_action(
    facts: OrgFacts, verdict: Verdict, now: float, *, app_url: str, catalog: Catalog
) -> dict[str, Any]:
    """The upgrade prompt for the status page: level, title, message and billing link."""
    level = call_to_action_level(facts, verdict, now)
    url = billing_url(app_url, facts.organization_id)
    title, message = _texts(level, facts, verdict, now, catalog, url)
    reason = verdict.reason or (Reason.PAYMENT_FAILED if payment_failing(facts, verdict) else None)
    return {
        "level": level.value,
        "reason": None if reason is None else reason.value,
        "title": title,
        "message": message,
        "url": url,
    }


def _texts(
    level: Level, facts: OrgFacts, verdict: Verdict, now: float, catalog: Catalog, link: str
) -> tuple[str | None, str | None]:
    ends = human_time(verdict.trial_ends_at)
    days = days_remaining(verdict.trial_ends_at, now)
    price = plan_pricing(catalog, facts.plan)["display"]
    if level is Level.BLOCKING and verdict.reason is not None:
        balance = balance_usd(facts.balance_microdollars)
        return _BLOCKING_TITLES[verdict.reason], refusal_message(facts, verdict, balance, link)
    if level is Level.BLOCKING:
        assert verdict.payment_failed_at is not None and verdict.grace_ends_at is not None
        return _BLOCKING_TITLES[Reason.PAYMENT_FAILED], (
            "The card paying for your organization's subscription was declined on"
            f" {human_time(verdict.payment_failed_at)}. Kilo Code keeps working until"
            f" {human_time(verdict.grace_ends_at)}, then stops for every member until the"
            " payment goes through: an owner or billing manager can update the card on the"
            f" billing page. Update the card at {link}"
        )
    if level is not Level.NONE and verdict.paying:
        purchased = verdict.seats_purchased
        return _BLOCKING_TITLES[Reason.SEATS_EXCEEDED], (
            f"Your organization has {_count(facts.seats_used, 'member')} but pays for"
            f" {_count(purchased, 'seat')}. At {ends}, when the free trial ends, Kilo Code"
            " stops working for every member unless an owner or billing manager buys more"
            " seats on the billing page or an owner removes members."
        )
    if level is Level.URGENT:
        return f"Only {_days(days)} left", (
            f"Subscribe now. At {ends} Kilo Code stops working for every member of your"
            " organization, and purchased credits stay locked until an owner or billing"
            f" manager subscribes on the billing page. The annual plan is {price}."
        )
    if level is Level.WARNING:
        return f"Your free trial ends in {_days(days)}", (
            f"Subscribe before {ends} to keep using Kilo Code without interruption: the"
            f" annual plan is {price}. An owner or billing manager can subscribe on the"
            " billing page."
        )
    if level is Level.INFO:
        name = catalog.plans[facts.plan].name
        return f"{_days(days)} left in your free trial", (
            f"Your {name} trial runs until {ends}, with as many members as you like."
            " An owner or billing manager can buy credits on the billing page to start using"
            f" paid models, and subscribe whenever you are ready: the annual plan is {price}."
        )
    return None, None


def _days(n: int) -> str:
    return "1 day" if n == 1 else f"{n} days"


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def organization_status(
    facts: OrgFacts,
    now: float,
    *,
    name: str,
    pending_invitations: int,
    trial_days: int,
    grace_days: int,
    app_url: str,
    catalog: Catalog,
) -> dict[str, Any]:
    """Everything the organization page shows, judged at `now`."""
    verdict = decide(facts, now, trial_days, grace_days)
    return {
        "id": facts.organization_id,
        "name": name,
        "plan": facts.plan,
        "created_at": iso_utc(facts.created_at),
        "trial": {
            "ends_at": iso_utc(verdict.trial_ends_at),
            "days_remaining": days_remaining(verdict.trial_ends_at, now),
            "stage": trial_stage(verdict.trial_ends_at, now),
        },
        "seats": {
            "used": facts.seats_used,
            "purchased": verdict.seats_purchased,
            "unlimited": seats_unlimited(facts, verdict),
            "short": seats_short(facts, verdict),
            "pending_invitations": pending_invitations,
        },
        "subscription": _subscription(facts, now),
        "credits": {
            "balance_usd": balance_usd(facts.balance_microdollars),
            "locked": not verdict.allowed,
        },
        "access": {
            "allowed": verdict.allowed,
            "reason": None if verdict.reason is None else verdict.reason.value,
        },
        "pricing": plan_pricing(catalog, facts.plan),
        "call_to_action": call_to_action(facts, verdict, now, app_url=app_url, catalog=catalog),
        "sso": _sso(facts.plan, catalog),
    }


def _subscription(facts: OrgFacts, now: float) -> dict[str, Any] | None:
    """The newest live subscription, else the newest one (seats count them all)."""
    shown = newest_live(facts, now) or next(iter(facts.purchases), None)
    return _purchase(shown) if shown is not None else None


def _purchase(purchase: Purchase) -> dict[str, Any]:
    trialing = purchase.stripe_status == "trialing"
    return {
        "status": purchase.status,
        "billing_cycle": purchase.billing_cycle,
        "seat_count": purchase.seat_count,
        "expires_at": iso_utc(purchase.expires_at),
        # Paid during the trial: Stripe charges first when the trial ends (expires_at).
        "first_charge_at": iso_utc(purchase.expires_at) if trialing else None,
    }


def _sso(plan: str, catalog: Catalog) -> dict[str, Any] | None:
    if plan != "enterprise":
        return None
    return {"self_serve": False, "contact_sales_url": catalog.contact_sales_url}
