"""Schema migrations: the plain SQL files in `sql/`, applied in order, each once.

A wheel ships `sql/` inside the package as `gateway.sql`; `SQL_DIR` is wherever this
installation has it (see `gateway.plans.shipped_dir`).

Each file `NNN_name.sql` runs in its own transaction and is recorded in
`schema_migrations`. The whole run holds a PostgreSQL advisory lock, so replicas that
start together do not race: the second waits, then finds nothing left to do.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from pathlib import Path

import asyncpg
import structlog

from gateway.plans import shipped_dir

SQL_DIR = shipped_dir("gateway.sql")
# An arbitrary constant that names "the gateway's migrations" among advisory locks.
MIGRATION_LOCK_ID = 7_246_311_001
_FILE_NAME = re.compile(r"^(\d{3})_([a-z0-9_]+)\.sql$")

log = structlog.get_logger("gateway.migrations")


@dataclasses.dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str
    path: Path


def discover(sql_dir: Path = SQL_DIR) -> list[Migration]:
    """List the migrations in `sql_dir`, ordered by version; versions must be unique."""
    found: dict[int, Migration] = {}
    for path in sorted(sql_dir.glob("*.sql")):
        match = _FILE_NAME.match(path.name)
        if match is None:
            raise ValueError(f"migration file {path.name} is not named NNN_name.sql")
        version = int(match.group(1))
        if version in found:
            raise ValueError(f"two migrations share version {version}")
        found[version] = Migration(version, match.group(2), path)
    return [found[v] for v in sorted(found)]


async def migrate(
    conn: asyncpg.Connection,
    *,
    target: int | None = None,
    enterprise_organization_ids: Sequence[str] = (),
    sql_dir: Path = SQL_DIR,
) -> list[int]:
    """Apply pending migrations up to `target` (all when None); return the versions applied."""
    await conn.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK_ID)
    try:
        await conn.execute(
            """CREATE TABLE IF NOT EXISTS schema_migrations (
                   version integer PRIMARY KEY,
                   name text NOT NULL,
                   applied_at timestamptz NOT NULL DEFAULT now())"""
        )
        applied = {r["version"] for r in await conn.fetch("SELECT version FROM schema_migrations")}
        done: list[int] = []
        for migration in discover(sql_dir):
            if target is not None and migration.version > target:
                break
            if migration.version in applied:
                continue
            await _apply(conn, migration, enterprise_organization_ids)
            done.append(migration.version)
        return done
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK_ID)


async def _apply(
    conn: asyncpg.Connection, migration: Migration, enterprise_organization_ids: Sequence[str]
) -> None:
    """Run one migration file and record it, atomically."""
    async with conn.transaction():
        # Migrations that need configuration read it from transaction-local settings.
        await conn.execute(
            "SELECT set_config('gateway.enterprise_organization_ids', $1, true)",
            ",".join(enterprise_organization_ids),
        )
        await conn.execute(migration.path.read_text())
        await conn.execute(
            "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)",
            migration.version,
            migration.name,
        )
    log.info("migration_applied", version=migration.version, name=migration.name)


async def applied_versions(conn: asyncpg.Connection) -> list[int]:
    """The versions recorded in `schema_migrations`, ascending."""
    rows = await conn.fetch("SELECT version FROM schema_migrations ORDER BY version")
    return [r["version"] for r in rows]
