"""Writes the rows other backend services would write: users, orgs, members, keys, purchases."""

from __future__ import annotations

import secrets
import uuid
from datetime import UTC, datetime, timedelta

import asyncpg

from gateway.access.auth import hash_token

# What a test organization has bought unless the test says otherwise: $100.
DEFAULT_CREDITS_MICRODOLLARS = 100_000_000


def utcnow() -> datetime:
    return datetime.now(UTC)


class Seed:
    """Arranges a test's rows through a plain connection to its database."""

    def __init__(self, conn: asyncpg.Connection) -> None:
        self.conn = conn

    async def user(self, email: str | None = None) -> str:
        user_id = f"user_{uuid.uuid4().hex[:10]}"
        await self.conn.execute(
            "INSERT INTO users (id, email) VALUES ($1, $2)",
            user_id,
            email or f"{user_id}@example.test",
        )
        return user_id

    async def org(
        self,
        *,
        name: str = "Acme",
        age: timedelta = timedelta(days=1),
        free_trial_end_at: datetime | None = None,
        require_seats: bool = True,
        plan: str = "teams",
        credits_acquired_microdollars: int = DEFAULT_CREDITS_MICRODOLLARS,
        credits_used_microdollars: int = 0,
    ) -> str:
        """An organization created `age` ago (so its trial ends 30 days after that).

        It has bought `credits_acquired_microdollars` of credits (through the ledger, as
        a purchase would) so that paid models are not refused for balance unless a test
        says so.
        """
        org_id: str = await self.conn.fetchval(
            """INSERT INTO organizations (name, created_at, free_trial_end_at, require_seats, plan,
                   credits_used_microdollars)
               VALUES ($1, $2, $3, $4, $5, $6) RETURNING id::text""",
            name,
            utcnow() - age,
            free_trial_end_at,
            require_seats,
            plan,
            credits_used_microdollars,
        )
        if credits_acquired_microdollars:
            await self.credits(org_id, credits_acquired_microdollars)
        return org_id

    async def credits(
        self, org_id: str, amount_microdollars: int, *, description: str = "Credit purchase"
    ) -> None:
        """Add a ledger row, as a credit purchase does."""
        await self.conn.execute(
            """INSERT INTO credit_transactions (organization_id, amount_microdollars, description)
               VALUES ($1::uuid, $2, $3)""",
            org_id,
            amount_microdollars,
            description,
        )

    async def member(self, org_id: str, user_id: str, role: str = "member") -> None:
        await self.conn.execute(
            """INSERT INTO organization_memberships (organization_id, user_id, role)
               VALUES ($1::uuid, $2, $3)""",
            org_id,
            user_id,
            role,
        )

    async def key(self, user_id: str, org_id: str | None = None) -> str:
        """A new API key for the user; returns the bearer token (only its hash is stored)."""
        token = "kilo_" + secrets.token_urlsafe(32)
        await self.conn.execute(
            "INSERT INTO api_keys (user_id, key_hash, organization_id) VALUES ($1, $2, $3::uuid)",
            user_id,
            hash_token(token),
            org_id,
        )
        return token

    async def member_with_key(self, org_id: str, role: str = "owner") -> tuple[str, str]:
        """A new user who is a member of the org, and a token for them."""
        user_id = await self.user()
        await self.member(org_id, user_id, role)
        return user_id, await self.key(user_id)

    async def purchase(
        self,
        org_id: str,
        *,
        seat_count: int = 5,
        status: str = "active",
        billing_cycle: str = "yearly",
        starts_at: datetime | None = None,
        expires_at: datetime | None = None,
    ) -> str:
        """A seats purchase; by default active, started a day ago, ending in a year."""
        now = utcnow()
        purchase_id: str = await self.conn.fetchval(
            """INSERT INTO organization_seats_purchases (organization_id, subscription_stripe_id,
                   seat_count, subscription_status, billing_cycle, starts_at, expires_at)
               VALUES ($1::uuid, $2, $3, $4, $5, $6, $7) RETURNING id::text""",
            org_id,
            f"sub_{uuid.uuid4().hex[:14]}",
            seat_count,
            status,
            billing_cycle,
            starts_at or now - timedelta(days=1),
            expires_at or now + timedelta(days=365),
        )
        return purchase_id
