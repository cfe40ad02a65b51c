"""Whether an identified caller's request may go upstream: the rule, credits, the mode.

`admit` is pure: the caller (`auth.identify`), the organization's facts and the instant
in, an `Admission` out, or the 402 that refuses the request in enforce mode. The proxy
fetches the facts, asks again with the model when only the model can settle the credit
check, and records the verdict (`record_verdict`, `record_refusal`).
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

from aiohttp import web

from gateway.access.auth import Caller
from gateway.access.cache import FactsCache
from gateway.access.refusals import UNREAD, Unread, check, needs_model
from gateway.access.rule import OrgFacts
from gateway.common.context import RequestContext
from gateway.config import Config, EnforcementMode
from gateway.errors import Forbidden, PaymentRequired, Reason
from gateway.platform import metrics

# Methods that only read (model lists): they need a valid key, not an entitled organization.
READ_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


@dataclasses.dataclass(frozen=True, slots=True)
class Policy:
    """The settings the rule is applied with."""

    trial_days: int
    mode: EnforcementMode
    app_url: str
    grace_days: int

    @classmethod
    def from_config(cls, config: Config) -> Policy:
        return cls(
            config.trial_days,
            config.enforcement_mode,
            config.app_url,
            config.past_due_grace_days,
        )


POLICY = web.AppKey("policy", Policy)


class Admission(NamedTuple):
    """A request let through: for whom, and the reason shadow mode would have refused it.

    `needs_model` says the verdict is not settled yet: the credits are used up, and only
    the model the body names (free or not) decides; ask again with it.
    """

    caller: Caller
    would_block: str | None = None
    needs_model: bool = False


def admit(
    caller: Caller,
    facts: OrgFacts,
    now: float,
    policy: Policy,
    *,
    unwritten_microdollars: int = 0,
    model: str | Unread | None = UNREAD,
) -> Admission:
    """Let the caller through now, or raise the 402 that refuses them (enforce mode).

    The balance is the database's less `unwritten_microdollars` (charged by this process,
    not written yet). With `model` left `UNREAD` a used-up balance gives an Admission that
    `needs_model` instead of a verdict, so that every other verdict is given before the
    body is read.
    """
    if policy.mode is EnforcementMode.OFF:
        return Admission(caller)
    outcome = check(
        facts,
        now,
        trial_days=policy.trial_days,
        grace_days=policy.grace_days,
        mode=policy.mode,
        app_url=policy.app_url,
        unwritten_microdollars=unwritten_microdollars,
        model=model,
    )
    if outcome.would_block is None:
        if isinstance(model, Unread) and needs_model(facts, unwritten_microdollars):
            return Admission(caller, needs_model=True)
        return Admission(caller)
    return Admission(caller, outcome.would_block.value)


def record_verdict(ctx: RequestContext, admission: Admission, mode: EnforcementMode) -> None:
    """Put a let-through request's verdict in its log line and the blocked counter."""
    if mode is EnforcementMode.OFF:
        return
    if admission.would_block is None:
        ctx.verdict = "allowed"
        return
    ctx.verdict, ctx.reason = "would_block", admission.would_block
    metrics.BLOCKED.labels(admission.would_block, mode.value).inc()


def record_refusal(ctx: RequestContext, refusal: PaymentRequired) -> None:
    """Put a refused request's verdict in its log line and the blocked counter."""
    ctx.verdict = "blocked"
    metrics.BLOCKED.labels(refusal.reason, EnforcementMode.ENFORCE.value).inc()


async def organization_facts(cache: FactsCache, organization_id: str) -> OrgFacts:
    """The organization's facts, from the cache or the database (counted either way)."""
    facts = await cache.facts.get(organization_id)
    if facts is None:
        raise Forbidden("You are not a member of this organization.", reason=Reason.NOT_A_MEMBER)
    return facts
