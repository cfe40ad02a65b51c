"""Whether a request may go upstream: membership, the entitlement rule, and credits.

Authentication happens first, in the proxy; this module takes the authenticated key,
finds the caller's organization and role, fetches the organization's facts (cached)
and applies the rule in the configured enforcement mode.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Awaitable, Callable

from multidict import CIMultiDictProxy

from gateway.access.auth import Caller, authorize
from gateway.access.cache import FactsCache
from gateway.access.queries import ApiKey
from gateway.access.refusals import check, needs_model
from gateway.access.rule import OrgFacts
from gateway.common.context import RequestContext
from gateway.config import Config, EnforcementMode
from gateway.errors import Forbidden, PaymentRequired, Reason
from gateway.platform import metrics

# Methods that only read (model lists): they need a valid key, not an entitled organization.
READ_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


@dataclasses.dataclass(frozen=True, slots=True)
class Admission:
    """A request let through: for whom, and the reason shadow mode would have refused it."""

    caller: Caller | None
    would_block: str | None = None


async def admit(
    *,
    method: str,
    headers: CIMultiDictProxy[str],
    key: ApiKey,
    cache: FactsCache,
    config: Config,
    ctx: RequestContext,
    unwritten_microdollars: Callable[[str], int],
    requested_model: Callable[[], Awaitable[str | None]] | None,
) -> Admission:
    """Let the request through, or raise the 400/403/402 that refuses it.

    `requested_model` (metered requests) reads the body for the model it names; it is
    awaited only when the rule lets the organization through and its credits are used
    up, so that every other verdict is given before the body is read.
    """
    if method in READ_METHODS:
        return Admission(None)
    caller = await authorize(headers, key, cache)
    ctx.organization_id = caller.organization_id
    if config.enforcement_mode is EnforcementMode.OFF:
        return Admission(caller)
    facts = await organization_facts(cache, caller.organization_id)
    unwritten = unwritten_microdollars(caller.organization_id)
    judge = functools.partial(
        check,
        facts,
        time.time(),
        trial_days=config.trial_days,
        mode=config.enforcement_mode,
        app_url=config.app_url,
        unwritten_microdollars=unwritten,
    )
    try:
        outcome = judge()
        if (
            requested_model is not None
            and outcome.would_block is None
            and needs_model(facts, unwritten)
        ):
            model = await requested_model()
            outcome = judge(requested_model=lambda: model)
    except PaymentRequired as exc:
        ctx.verdict = "blocked"
        metrics.BLOCKED.labels(exc.reason, EnforcementMode.ENFORCE.value).inc()
        raise
    if outcome.would_block is None:
        ctx.verdict = "allowed"
        return Admission(caller)
    reason = outcome.would_block.value
    ctx.verdict, ctx.reason = "would_block", reason
    metrics.BLOCKED.labels(reason, config.enforcement_mode.value).inc()
    return Admission(caller, reason)


async def organization_facts(cache: FactsCache, organization_id: str) -> OrgFacts:
    """The organization's facts, from the cache or the database (counted either way)."""
    facts = await cache.facts.get(organization_id)
    if facts is None:
        raise Forbidden("You are not a member of this organization.", reason=Reason.NOT_A_MEMBER)
    return facts
