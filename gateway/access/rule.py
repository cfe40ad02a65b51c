"""The entitlement rule: may this organization use the proxy at this instant?

A pure function of cached facts and the request time; no I/O, no clock of its own.
The gateway caches facts, never verdicts, so an organization whose trial ends at
12:00:00 is refused from 12:00:00 even when its facts were read at 11:59:59.

1. The trial ends at `free_trial_end_at`, else `created_at + trial_days`. Before that
   the organization is trialing: allowed, seats unlimited.
2. After it, `require_seats = false` exempts the organization (internal, design partners).
3. Otherwise at least one of its purchases (each Stripe subscription's newest state) must
   be active, pending_cancel or past_due with `starts_at <= now < expires_at`, monthly or
   yearly alike. If none is: `trial_expired` when it never had a purchase,
   `subscription_inactive` when it had one.
4. Seats used (members who are not billing managers) above the seats of all its paying
   purchases added up: `seats_exceeded`.

Spending is judged after access (`decide_credits`): an organization that may use the
proxy but has no credit left (balance at or below zero) is refused paid models with
`insufficient_credits`; models whose id ends in `:free` stay available.
"""

from __future__ import annotations

import dataclasses
from enum import StrEnum

# The rule's refusals are four of the gateway's reasons (TRIAL_EXPIRED,
# SUBSCRIPTION_INACTIVE, SEATS_EXCEEDED, INSUFFICIENT_CREDITS).
from gateway.errors import Reason

SECONDS_PER_DAY = 86_400
FREE_MODEL_SUFFIX = ":free"
PAYING_STATUSES = frozenset({"active", "pending_cancel", "past_due"})


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


@dataclasses.dataclass(frozen=True, slots=True)
class Verdict:
    """The rule's answer: allowed or not, why, and the trial end it was judged against."""

    allowed: bool
    standing: Standing
    reason: Reason | None
    trial_ends_at: float
    # The seats of every purchase paying at the instant judged, added up.
    seats_purchased: int = 0

    @property
    def trialing(self) -> bool:
        """True while the organization is inside its free trial (seats unlimited)."""
        return self.standing is Standing.TRIALING


def trial_end(facts: OrgFacts, trial_days: int) -> float:
    """When the organization's free trial ends, in UNIX seconds."""
    if facts.free_trial_end_at is not None:
        return facts.free_trial_end_at
    return facts.created_at + trial_days * SECONDS_PER_DAY


def is_paying(purchase: Purchase, now: float) -> bool:
    """True when the purchase is in a paying status and its period covers `now`."""
    return purchase.status in PAYING_STATUSES and purchase.starts_at <= now < purchase.expires_at


def is_live(purchase: Purchase, now: float) -> bool:
    """True while the subscription is in a paying status and its period has not ended."""
    return purchase.status in PAYING_STATUSES and now < purchase.expires_at


def paying_purchases(facts: OrgFacts, now: float) -> tuple[Purchase, ...]:
    """The purchases that pay for seats at `now`."""
    return tuple(p for p in facts.purchases if is_paying(p, now))


def paid_seats(facts: OrgFacts, now: float) -> int:
    """The seats of every purchase paying at `now`, added up (0 without one)."""
    return sum(p.seat_count for p in paying_purchases(facts, now))


def decide(facts: OrgFacts, now: float, trial_days: int) -> Verdict:
    """Apply the rule to `facts` at UNIX time `now`."""
    ends_at = trial_end(facts, trial_days)
    seats = paid_seats(facts, now)
    if now < ends_at:
        return Verdict(True, Standing.TRIALING, None, ends_at, seats)
    if not facts.require_seats:
        return Verdict(True, Standing.EXEMPT, None, ends_at, seats)
    if not facts.purchases:
        return Verdict(False, Standing.BLOCKED, Reason.TRIAL_EXPIRED, ends_at)
    if not paying_purchases(facts, now):
        return Verdict(False, Standing.BLOCKED, Reason.SUBSCRIPTION_INACTIVE, ends_at)
    if facts.seats_used > seats:
        return Verdict(False, Standing.BLOCKED, Reason.SEATS_EXCEEDED, ends_at, seats)
    return Verdict(True, Standing.SUBSCRIBED, None, ends_at, seats)


def is_free_model(model: str | None) -> bool:
    """True for models OpenRouter serves at no cost (their id ends in `:free`)."""
    return model is not None and model.endswith(FREE_MODEL_SUFFIX)


def decide_credits(verdict: Verdict, balance_microdollars: int, model_is_free: bool) -> Verdict:
    """Refuse a paid model to an allowed organization whose balance is at or below zero."""
    if not verdict.allowed or model_is_free or balance_microdollars > 0:
        return verdict
    return dataclasses.replace(verdict, allowed=False, reason=Reason.INSUFFICIENT_CREDITS)
