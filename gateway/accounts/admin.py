"""Operator shortcuts for trying the gateway by hand: a user, an organization, a key.

In production other services write these rows; `python -m gateway create-key` writes
the same rows so a newcomer can send a first request within a minute.
"""

from __future__ import annotations

import dataclasses
import secrets

import asyncpg

from gateway.access.auth import hash_token
from gateway.common.money import MICRODOLLARS_PER_USD


@dataclasses.dataclass(frozen=True, slots=True)
class NewKey:
    user_id: str
    organization_id: str
    token: str


async def create_key(
    conn: asyncpg.Connection, email: str, organization_name: str, credits_usd: float = 0.0
) -> NewKey:
    """Ensure the user, create an organization they own (with `credits_usd` of credits
    through the ledger, as a purchase would), and issue a key bound to it."""
    async with conn.transaction():
        user_id: str = await conn.fetchval(
            """INSERT INTO users (id, email) VALUES ($1, $2)
               ON CONFLICT (email) DO UPDATE SET email = EXCLUDED.email RETURNING id""",
            "user_" + secrets.token_hex(8),
            email,
        )
        organization_id: str = await conn.fetchval(
            "INSERT INTO organizations (name) VALUES ($1) RETURNING id::text", organization_name
        )
        await conn.execute(
            "INSERT INTO organization_memberships (organization_id, user_id, role)"
            " VALUES ($1::uuid, $2, 'owner')",
            organization_id,
            user_id,
        )
        if credits_usd > 0:
            await conn.execute(
                "INSERT INTO credit_transactions (organization_id, amount_microdollars,"
                " description) VALUES ($1::uuid, $2, 'Granted by create-key')",
                organization_id,
                round(credits_usd * MICRODOLLARS_PER_USD),
            )
        token = "kilo_" + secrets.token_urlsafe(32)
        await conn.execute(
            "INSERT INTO api_keys (user_id, key_hash, organization_id) VALUES ($1, $2, $3::uuid)",
            user_id,
            hash_token(token),
            organization_id,
        )
    return NewKey(user_id, organization_id, token)
