"""The named queries the proxy path runs; each returns plain data the cache can hold."""

from __future__ import annotations

import dataclasses
from typing import Any, TypeAlias

import asyncpg

from gateway.access.rule import OrgFacts, Purchase

# A connection, pooled or not; the pool itself also runs one-off queries.
Queryable: TypeAlias = asyncpg.Connection | asyncpg.pool.PoolConnectionProxy | asyncpg.Pool


@dataclasses.dataclass(frozen=True, slots=True)
class ApiKey:
    """A live (not revoked) API key: whose it is and the organization it is bound to."""

    id: str
    user_id: str
    organization_id: str | None


_KEY_SQL = """
SELECT id::text, user_id, organization_id::text
FROM api_keys
WHERE key_hash = $1 AND revoked_at IS NULL
"""

_ROLE_SQL = """
SELECT role FROM organization_memberships WHERE organization_id = $1::uuid AND user_id = $2
"""

# Two rows are enough to tell "exactly one organization" from "several".
_USER_ORGS_SQL = """
SELECT organization_id::text FROM organization_memberships
WHERE user_id = $1 ORDER BY organization_id LIMIT 2
"""

# Each subscription's newest row is its state now; an organization may have several live
# subscriptions, and the rule adds up what they pay for. One statement, one snapshot.
_FACTS_SQL = """
SELECT o.id::text AS id, o.created_at, o.free_trial_end_at, o.require_seats, o.plan,
       o.credits_acquired_microdollars, o.credits_used_microdollars,
       (SELECT count(*) FROM organization_memberships m
         WHERE m.organization_id = o.id AND m.role <> 'billing_manager') AS seats_used,
       array(
           SELECT ROW(p.subscription_status, p.seat_count, p.starts_at, p.expires_at,
                      p.billing_cycle, p.subscription_stripe_id, p.stripe_status,
                      p.payment_failed_at)
           FROM (
               SELECT DISTINCT ON (subscription_stripe_id) *
               FROM organization_seats_purchases
               WHERE organization_id = o.id
               ORDER BY subscription_stripe_id, created_at DESC, id DESC
           ) p
           ORDER BY p.created_at DESC, p.id DESC
       ) AS purchases
FROM organizations o
WHERE o.id = $1::uuid
"""


async def fetch_api_key(conn: Queryable, key_hash: str) -> ApiKey | None:
    """The live key with this hash, or None."""
    row = await conn.fetchrow(_KEY_SQL, key_hash)
    return None if row is None else ApiKey(row[0], row[1], row[2])


async def fetch_role(conn: Queryable, organization_id: str, user_id: str) -> str | None:
    """The user's role in the organization, or None when not a member."""
    role: str | None = await conn.fetchval(_ROLE_SQL, organization_id, user_id)
    return role


async def fetch_user_organizations(conn: Queryable, user_id: str) -> tuple[str, ...]:
    """Up to two organizations the user belongs to (enough to know if there is only one)."""
    return tuple(r[0] for r in await conn.fetch(_USER_ORGS_SQL, user_id))


async def fetch_org_facts(conn: Queryable, organization_id: str) -> OrgFacts | None:
    """Everything the rule needs about the organization, or None when it does not exist."""
    row = await conn.fetchrow(_FACTS_SQL, organization_id)
    if row is None:
        return None
    trial_end = row["free_trial_end_at"]
    return OrgFacts(
        organization_id=row["id"],
        created_at=row["created_at"].timestamp(),
        free_trial_end_at=None if trial_end is None else trial_end.timestamp(),
        require_seats=row["require_seats"],
        seats_used=row["seats_used"],
        purchases=tuple(_purchase(p) for p in row["purchases"]),
        plan=row["plan"],
        credits_acquired_microdollars=row["credits_acquired_microdollars"],
        credits_used_microdollars=row["credits_used_microdollars"],
    )


def _purchase(fields: tuple[Any, ...]) -> Purchase:
    """One subscription's row, in the order `_FACTS_SQL` builds it."""
    status, seat_count, starts_at, expires_at, billing_cycle, subscription_id, stripe, failed = (
        fields
    )
    return Purchase(
        status=status,
        seat_count=seat_count,
        starts_at=starts_at.timestamp(),
        expires_at=expires_at.timestamp(),
        billing_cycle=billing_cycle,
        subscription_id=subscription_id,
        stripe_status=stripe,
        payment_failed_at=None if failed is None else failed.timestamp(),
    )
