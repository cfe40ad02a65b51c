"""PostgreSQL for the gateway targets, migrated by the gateway's own CLI and seeded at once.

Without ``--database-url`` the bench starts the embedded PostgreSQL (``pgserver``, the
same server the gateway starts for ``EMBEDDED_DATA_DIR``) in its temp dir; with it, the
bench creates a scratch database on that server and drops it at the end. Either way one
SQL statement seeds every organization, owner and key the run needs.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import subprocess
import sys
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import asyncpg
from yarl import URL

from bench.procs import TargetFailed

# One statement: N organizations (trialing from now, with ample credits), each with one
# owner and one key bound to it. The token is "kilo_" + the user id; only its hash is kept.
SEED_SQL = """
WITH numbers AS MATERIALIZED (
    SELECT i, gen_random_uuid() AS organization_id, 'bench_' || $2 || '_' || i AS user_id
    FROM generate_series(0, $1 - 1) AS i
), new_users AS (
    INSERT INTO users (id, email) SELECT user_id, user_id || '@bench.invalid' FROM numbers
), new_organizations AS (
    INSERT INTO organizations (id, name, credits_acquired_microdollars)
    SELECT organization_id, 'bench organization ' || i, $3 FROM numbers
), new_memberships AS (
    INSERT INTO organization_memberships (organization_id, user_id, role)
    SELECT organization_id, user_id, 'owner' FROM numbers
)
INSERT INTO api_keys (user_id, key_hash, organization_id)
SELECT user_id, encode(sha256(convert_to('kilo_' || user_id, 'UTF8')), 'hex'), organization_id
FROM numbers
"""
# A million dollars each: metering charges every request, and no run should exhaust it.
SEED_CREDITS_MICRODOLLARS = 10**12


@dataclass(frozen=True, slots=True)
class BenchDatabase:
    """Where the gateway's database is, and its server's pid when it runs here."""

    url: str
    postmaster_pid: int | None


def _with_database(server_url: str, name: str) -> str:
    """The URL of database ``name`` on the server ``server_url`` names (query kept)."""
    url = URL(server_url)
    return str(url.with_path("/" + name).with_query(url.query))


async def _admin(server_url: str, statement: str) -> None:
    """Run one administrative statement (CREATE/DROP DATABASE) on the server."""
    conn = await asyncpg.connect(server_url)
    try:
        await conn.execute(statement)
    finally:
        await conn.close()


@contextlib.contextmanager
def embedded_database(data_dir: Path) -> Iterator[BenchDatabase]:
    """Start pgserver's PostgreSQL under ``data_dir``; stop it and delete the data after."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pgserver warns when XDG_RUNTIME_DIR is unset
        import pgserver

        server = pgserver.get_server(data_dir, cleanup_mode="delete")
    try:
        pid_file = data_dir / "postmaster.pid"
        pid = int(pid_file.read_text().split()[0]) if pid_file.exists() else None
        yield BenchDatabase(server.get_uri(), pid)
    finally:
        server.cleanup()


@contextlib.contextmanager
def scratch_database(server_url: str) -> Iterator[BenchDatabase]:
    """Create a fresh database on ``server_url`` for this run; drop it after."""
    name = "gateway_bench_" + secrets.token_hex(4)
    asyncio.run(_admin(server_url, f'CREATE DATABASE "{name}"'))
    try:
        yield BenchDatabase(_with_database(server_url, name), None)
    finally:
        asyncio.run(_admin(server_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


def migrate(database_url: str, env: dict[str, str], log_dir: Path) -> None:
    """Apply the gateway's migrations with ``python -m gateway migrate``."""
    log_path = log_dir / "migrate.log"
    with log_path.open("wb") as log:
        done = subprocess.run(
            [sys.executable, "-m", "gateway", "migrate"],
            env={**env, "DATABASE_URL": database_url},
            stdout=log,
            stderr=subprocess.STDOUT,
            check=False,
            timeout=120,
        )
    if done.returncode != 0:
        raise TargetFailed(f"gateway migrate failed:\n{log_path.read_text()[-4000:]}")


async def _seed(database_url: str, count: int, salt: str) -> None:
    """Insert ``count`` organizations, owners and keys in one statement."""
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute(SEED_SQL, count, salt, SEED_CREDITS_MICRODOLLARS)
    finally:
        await conn.close()


def seed(database_url: str, count: int) -> list[str]:
    """Seed ``count`` organizations; return their bearer tokens, index 0 first."""
    salt = secrets.token_hex(4)
    asyncio.run(_seed(database_url, count, salt))
    return [f"kilo_bench_{salt}_{i}" for i in range(count)]
