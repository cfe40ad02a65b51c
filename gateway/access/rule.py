"""The entitlement rule: may this organization use the proxy at this instant?

A pure function of cached facts and the request time; no I/O, no clock of its own.
The gateway caches facts, never verdicts, so an organization whose trial ends at
12:00:00 is refused from 12:00:00 even when its facts were read at 11:59:59.

1. The trial ends at `free_trial_end_at`, else `created_at + trial_days`. Before that
   the organization is trialing: allowed, seats unlimited.
2. After it, `require_seats = false` exempts the organization (internal, design partners).
3. Otherwise at least one of its purchases (each Stripe subscription's newest state) must
   pay at `now`: active or pending_cancel with `starts_at <= now < expires_at`, monthly
   or yearly alike, or past_due within its grace (below). If none does:
   `trial_expired` when it never had a purchase, `payment_failed` when one is past_due
   past its grace, else `subscription_inactive`.
4. Seats used (members who are not billing managers) above the seats of all its paying
   purchases added up: `seats_exceeded`.

A past_due purchase (a payment failed and Stripe is retrying it) pays from `starts_at`
until `payment_failed_at + grace_days`, whatever its `expires_at`: the grace holds after
the period's end passes while Stripe retries (a renewal that fails leaves the old
period's row, or a new period Stripe already moved to), and a failed renewal never buys
the new period. Without a recorded failure instant the grace counts from `starts_at`
(Stripe charges at the start of a period). `invoice.paid` makes it active again.

Spending is judged after access (`decide_credits`): an organization that may use the
proxy but has no credit left (balance at or below zero) is refused paid models with
`insufficient_credits`; models whose id ends in `:free` stay available.
"""

from __future__ import annotations

import dataclasses
from enum import StrEnum
from typing import NamedTuple

# The rule's refusals are five of the gateway's reasons (TRIAL_EXPIRED, PAYMENT_FAILED,
# SUBSCRIPTION_INACTIVE, SEATS_EXCEEDED, INSUFFICIENT_CREDITS).
from gateway.errors import Reason

SECONDS_PER_DAY = 86_400
FREE_MODEL_SUFFIX = ":free"
PAST_DUE = "past_due"
PAYING_STATUSES = frozenset({"active", "pending_cancel", PAST_DUE})


class Standing(StrEnum):
    TRIALING = "trialing"
    EXEMPT = "exempt"
    SUBSCRIBED = "subscribed"
    BLOCKED = "blocked"


@dataclasses.dataclass(frozen=True, slots=True)
class Purchase:
    """One subscription's newest seats purchase; times are UNIX seconds."""

    status: str
    seat_count: int
    starts_at: float
    expires_at: float
    billing_cycle: str = "monthly"
    subscription_id: str = ""
    # Stripe's own status (`trialing`, `active`, ...); None for rows written before it was kept.
    stripe_status: str | None = None
    # While past_due: when the payment first failed (the grace counts from it).
    payment_failed_at: float | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class OrgFacts:
    """What the rule needs to know about one organization; times are UNIX seconds."""

    organization_id: str
    created_at: float
    free_trial_end_at: float | None
    require_seats: bool
    seats_used: int
    # The newest state of each of the organization's subscriptions, newest first.
    purchases: tuple[Purchase, ...] = ()
    plan: str = "teams"
    credits_acquired_microdollars: int = 0
    credits_used_microdollars: int = 0

    @property
    def balance_microdollars(self) -> int:
        """Credits bought minus credits spent."""
        return self.credits_acquired_microdollars - self.credits_used_microdollars


class Verdict(NamedTuple):
    """The rule's answer: allowed or not, why, and the trial end it was judged against.

    A named tuple, not a frozen dataclass: one is made for every proxied request, and a
    frozen dataclass costs about 1.5 us to build where a tuple costs a tenth of that."""

    allowed: bool
    standing: Standing
    reason: Reason | None
    trial_ends_at: float
    # The seats of every purchase paying at the instant judged, added up: the one count
    # of purchased seats (the 402's `metadata.seats_purchased`, the status page's
    # `seats.purchased`, the invitation cap); 0 once a subscription lapsed or ended.
    seats_purchased: int = 0
    # A payment that failed and is not paid yet (a past_due purchase): when it failed and
    # when its grace ends, whether or not that has passed.
    payment_failed_at: float | None = None
    grace_ends_at: float | None = None
    # Some purchase pays at the instant judged (even one of 0 seats).
    paying: bool = False

    @property
    def trialing(self) -> bool:
        """True while the organization is inside its free trial (seats unlimited)."""
        return self.standing is Standing.TRIALING


def trial_end(facts: OrgFacts, trial_days: int) -> float:
    """When the organization's free trial ends, in UNIX seconds."""
    if facts.free_trial_end_at is not None:
        return facts.free_trial_end_at
    return facts.created_at + trial_days * SECONDS_PER_DAY


def failed_at(purchase: Purchase) -> float:
    """When a past_due purchase's payment failed: as recorded, else its period's start."""
    if purchase.payment_failed_at is not None:
        return purchase.payment_failed_at
    return purchase.starts_at


def grace_ends_at(payment_failed_at: float, grace_days: int) -> float:
    """When access ends after a payment failed at `payment_failed_at`, unless it is paid."""
    return payment_failed_at + grace_days * SECONDS_PER_DAY


def grace_end(purchase: Purchase, grace_days: int) -> float:
    """When a past_due purchase stops paying: its failure plus the grace."""
    return grace_ends_at(failed_at(purchase), grace_days)


def is_paying(purchase: Purchase, now: float, grace_days: int) -> bool:
    """True when the purchase pays for `now`: within its period, or past_due within grace."""
    if purchase.status == PAST_DUE:
        return purchase.starts_at <= now < grace_end(purchase, grace_days)
    return purchase.status in PAYING_STATUSES and purchase.starts_at <= now < purchase.expires_at


def is_live(purchase: Purchase, now: float) -> bool:
    """True while the subscription goes on at Stripe: paying and its period not over, or
    past_due (Stripe retries the payment until it is paid or the subscription ends)."""
    return purchase.status == PAST_DUE or (
        purchase.status in PAYING_STATUSES and now < purchase.expires_at
    )


def newest_live(facts: OrgFacts, now: float) -> Purchase | None:
    """The organization's newest live subscription (the one a second checkout would
    double, the one its pages show and change), or None."""
    return next((p for p in facts.purchases if is_live(p, now)), None)


def decide(facts: OrgFacts, now: float, trial_days: int, grace_days: int) -> Verdict:
    """Apply the rule to `facts` at UNIX time `now` (past_due pays for `grace_days`).

    Runs on every proxied request: one pass over the purchases, and none for the common
    organization that has none (a trial)."""
    ends_at = trial_end(facts, trial_days)
    if not facts.purchases:
        if now < ends_at:
            return Verdict(True, Standing.TRIALING, None, ends_at)
        if not facts.require_seats:
            return Verdict(True, Standing.EXEMPT, None, ends_at)
        return Verdict(False, Standing.BLOCKED, Reason.TRIAL_EXPIRED, ends_at)
    seats, paying, failing = 0, False, None
    for purchase in facts.purchases:
        if is_paying(purchase, now, grace_days):
            seats += purchase.seat_count
            paying = True
        if purchase.status == PAST_DUE and (
            failing is None or failed_at(purchase) < failed_at(failing)
        ):
            failing = purchase
    failed = grace = None
    if failing is not None:
        failed, grace = failed_at(failing), grace_end(failing, grace_days)

    def verdict(allowed: bool, standing: Standing, reason: Reason | None) -> Verdict:
        return Verdict(allowed, standing, reason, ends_at, seats, failed, grace, paying)

    if now < ends_at:
        return verdict(True, Standing.TRIALING, None)
    if not facts.require_seats:
        return verdict(True, Standing.EXEMPT, None)
    if not paying:
        return verdict(
            False,
            Standing.BLOCKED,
            Reason.PAYMENT_FAILED if failing else Reason.SUBSCRIPTION_INACTIVE,
        )
    if facts.seats_used > seats:
        return verdict(False, Standing.BLOCKED, Reason.SEATS_EXCEEDED)
    return verdict(True, Standing.SUBSCRIBED, None)


def is_free_model(model: str | None) -> bool:
    """True for models OpenRouter serves at no cost (their id ends in `:free`)."""
    return model is not None and model.endswith(FREE_MODEL_SUFFIX)


def decide_credits(verdict: Verdict, balance_microdollars: int, model_is_free: bool) -> Verdict:
    """Refuse a paid model to an allowed organization whose balance is at or below zero."""
    if not verdict.allowed or model_is_free or balance_microdollars > 0:
        return verdict
    return verdict._replace(allowed=False, reason=Reason.INSUFFICIENT_CREDITS)
