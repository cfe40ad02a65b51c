"""Apply the rule to a request: the verdict, the enforcement mode, and the 402 it may cost.

`rule.decide` says whether the organization may use the proxy; this module turns a
refusal into the 402 the Kilo Code extension shows in its payment dialog.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import NamedTuple

from gateway.access.rule import (
    OrgFacts,
    Reason,
    Verdict,
    decide,
    decide_credits,
    is_free_model,
)
from gateway.common.money import MICRODOLLARS_PER_USD
from gateway.config import EnforcementMode
from gateway.errors import PaymentRequired

_TITLES = {
    Reason.TRIAL_EXPIRED: "Your free trial has ended",
    Reason.SUBSCRIPTION_INACTIVE: "Your subscription is not active",
    Reason.SEATS_EXCEEDED: "Your organization needs more seats",
    Reason.INSUFFICIENT_CREDITS: "Your organization is out of credits",
    Reason.PAYMENT_FAILED: "Your payment failed",
}


class Unread:
    """The body has not been read for the model it names (`check`, `admission.admit`)."""

    def __repr__(self) -> str:
        return "UNREAD"


UNREAD = Unread()


class Outcome(NamedTuple):
    """What to do with a request: forward it, and the reason it would have been refused."""

    verdict: Verdict
    would_block: Reason | None


def iso_utc(unix_seconds: float) -> str:
    """A UNIX time as an ISO 8601 UTC timestamp with a Z."""
    return datetime.fromtimestamp(unix_seconds, UTC).isoformat().replace("+00:00", "Z")


def balance_usd(balance_microdollars: int) -> float:
    """A balance in USD."""
    return balance_microdollars / MICRODOLLARS_PER_USD


def billing_url(app_url: str, organization_id: str) -> str:
    """Where an owner or billing manager buys a plan, seats or credits for the organization."""
    return f"{app_url}/organizations/{organization_id}/billing"


def check(
    facts: OrgFacts,
    now: float,
    *,
    trial_days: int,
    grace_days: int,
    mode: EnforcementMode,
    app_url: str,
    unwritten_microdollars: int = 0,
    model: str | Unread | None = UNREAD,
) -> Outcome:
    """Judge the organization now; in enforce mode a refusal raises `PaymentRequired`.

    `model` is the model a metered request names; with it `UNREAD` the credit check is
    left out (the balance, the database's less what this process charged and has not
    written yet, matters only for a model that is known and not free).
    """
    verdict = decide(facts, now, trial_days, grace_days)
    balance = facts.balance_microdollars - unwritten_microdollars
    if verdict.allowed and not isinstance(model, Unread) and balance <= 0:
        verdict = decide_credits(verdict, balance, is_free_model(model))
    if verdict.allowed:
        return Outcome(verdict, None)
    assert verdict.reason is not None
    if mode is EnforcementMode.ENFORCE:
        raise payment_required(facts, verdict, app_url, balance)
    return Outcome(verdict, verdict.reason)


def needs_model(facts: OrgFacts, unwritten_microdollars: int) -> bool:
    """True when the credit check must know the model: the balance is used up."""
    return facts.balance_microdollars - unwritten_microdollars <= 0


def payment_required(
    facts: OrgFacts, verdict: Verdict, app_url: str, balance_microdollars: int
) -> PaymentRequired:
    """The 402 for a refused organization, with what the payment dialog reads."""
    assert verdict.reason is not None
    balance = balance_usd(balance_microdollars)
    link = billing_url(app_url, facts.organization_id)
    return PaymentRequired(
        refusal_message(facts, verdict, balance, link),
        reason=verdict.reason,
        fields={
            "title": _TITLES[verdict.reason],
            "balance": balance,
            "buyCreditsUrl": link,
        },
        metadata={
            "organization_id": facts.organization_id,
            "trial_ends_at": iso_utc(verdict.trial_ends_at),
            "seats_used": facts.seats_used,
            # The status page's `seats.purchased` too (the verdict's one count).
            "seats_purchased": verdict.seats_purchased,
            **_failure_metadata(verdict),
        },
    )


def _failure_metadata(verdict: Verdict) -> dict[str, str]:
    """When a refused organization's payment failed and its grace ended."""
    if verdict.reason is not Reason.PAYMENT_FAILED or verdict.payment_failed_at is None:
        return {}
    assert verdict.grace_ends_at is not None
    return {
        "payment_failed_at": iso_utc(verdict.payment_failed_at),
        "grace_ends_at": iso_utc(verdict.grace_ends_at),
    }


def refusal_message(facts: OrgFacts, verdict: Verdict, balance: float, link: str) -> str:
    """Say plainly what happened and what to do about it, ending with the billing link.

    The link comes last and bare (no full stop after it): the Kilo CLI prints only this
    message, and a terminal makes a URL clickable only when nothing sticks to it.
    """
    locked = (
        f" Your ${balance:,.2f} of purchased credits stay locked until then."
        if balance >= 0.005
        else ""
    )
    if verdict.reason is Reason.TRIAL_EXPIRED:
        ended = iso_utc(verdict.trial_ends_at)[:10]
        return (
            f"Your organization's free trial ended on {ended}. An owner or billing manager"
            f" can subscribe to an annual plan to keep using Kilo Code.{locked}"
            f" Subscribe at {link}"
        )
    if verdict.reason is Reason.INSUFFICIENT_CREDITS:
        return (
            f"Your organization's credit balance is ${balance:,.2f}; models whose id ends in"
            " :free stay available meanwhile. An owner or billing manager can buy credits."
            f" Buy credits at {link}"
        )
    if verdict.reason is Reason.PAYMENT_FAILED:
        assert verdict.payment_failed_at is not None and verdict.grace_ends_at is not None
        failed = iso_utc(verdict.payment_failed_at)[:10]
        stopped = iso_utc(verdict.grace_ends_at)[:10]
        return (
            f"The card paying for your organization's subscription was declined on {failed},"
            f" and Kilo Code stopped working at the end of the grace period ({stopped})."
            " An owner or billing manager can update the card to keep using Kilo Code."
            f"{locked} Update the card at {link}"
        )
    if verdict.reason is Reason.SUBSCRIPTION_INACTIVE:
        return (
            "Your organization's subscription has ended or is not active yet. An owner or"
            f" billing manager can renew it to keep using Kilo Code.{locked}"
            f" Subscribe at {link}"
        )
    purchased = verdict.seats_purchased
    return (
        f"Your organization has {_count(facts.seats_used, 'member')} but pays for"
        f" {_count(purchased, 'seat')}. An owner or billing manager can buy more seats,"
        f" or an owner can remove members.{locked} Buy seats at {link}"
    )


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"
