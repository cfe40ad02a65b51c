"""Charging organizations for what they used: batched, exactly once, never lost.

The proxy records one `Charge` per metered request and moves on; the `UsageLedger`
writes them in batches off the request path (every `USAGE_FLUSH_INTERVAL_SECONDS` or
`USAGE_BATCH_SIZE` rows), one transaction per batch. Each batch inserts into `llm_usage`
with `ON CONFLICT (request_id) DO NOTHING` and adds to `credits_used_microdollars` only
what it inserted, so a batch retried after an unknown outcome never charges twice, and
several processes charging one organization leave exactly the sum.

When PostgreSQL does not answer, charges wait in memory (bounded) and are retried;
past the bound they are appended to a spool file on local disk, which is replayed once
the database answers again or at the next start. Each process spools to its own file
and holds a lock on it while alive, so a replay never reads a file still being written.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import fcntl
import json
import os
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import IO, Any

import asyncpg
import structlog

from gateway import metrics
from gateway.database import UNAVAILABLE_ERRORS

log = structlog.get_logger("gateway.usage")


@dataclasses.dataclass(frozen=True, slots=True)
class Charge:
    """One metered request, as `llm_usage` records it."""

    request_id: str
    organization_id: str
    user_id: str
    model: str | None
    prompt_tokens: int | None
    completion_tokens: int | None
    cost_microdollars: int
    streamed: bool
    status: int
    cancelled: bool = False

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, line: str) -> Charge:
        return cls(**json.loads(line))


# One statement: insert what is new, then charge each organization for exactly that.
_WRITE_BATCH_SQL = """
WITH batch AS (
    SELECT * FROM unnest($1::text[], $2::uuid[], $3::text[], $4::text[], $5::int[], $6::int[],
                         $7::bigint[], $8::bool[], $9::int[], $10::bool[])
        AS b(request_id, organization_id, user_id, model, prompt_tokens, completion_tokens,
             cost_microdollars, streamed, status, cancelled)
), inserted AS (
    INSERT INTO llm_usage (request_id, organization_id, user_id, model, prompt_tokens,
                           completion_tokens, cost_microdollars, streamed, status, cancelled)
    SELECT * FROM batch
    ON CONFLICT (request_id) DO NOTHING
    RETURNING organization_id, cost_microdollars
), per_org AS (
    SELECT organization_id, sum(cost_microdollars)::bigint AS total
    FROM inserted GROUP BY organization_id
), charged AS (
    UPDATE organizations o
    SET credits_used_microdollars = o.credits_used_microdollars + per_org.total
    FROM per_org
    WHERE o.id = per_org.organization_id AND per_org.total <> 0
    RETURNING per_org.total
)
SELECT (SELECT count(*) FROM inserted) AS inserted,
       coalesce((SELECT sum(total) FROM charged), 0)::bigint AS charged
"""


async def write_batch(conn: asyncpg.Connection, charges: list[Charge]) -> tuple[int, int]:
    """Write a batch in one transaction; return (rows new to the ledger, microdollars charged)."""
    columns = list(zip(*(dataclasses.astuple(c) for c in charges), strict=True))
    async with conn.transaction():
        row = await conn.fetchrow(_WRITE_BATCH_SQL, *columns)
    assert row is not None
    return int(row["inserted"]), int(row["charged"])


class Spool:
    """An append-only file of charges the database could not take yet, one JSON per line."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.path = directory / f"usage-{os.getpid()}-{time.time_ns()}.jsonl"
        self._file: IO[str] | None = None

    def append(self, charges: Iterable[Charge]) -> None:
        """Append and fsync: once this returns, the charges survive a crash."""
        if self._file is None:
            self.directory.mkdir(parents=True, exist_ok=True)
            self._file = self.path.open("a", encoding="utf-8")
            # Held while this process lives: replays skip files whose writer is alive.
            fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        self._file.writelines(c.to_json() + "\n" for c in charges)
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def orphans(self) -> list[Path]:
        """Spool files no live process is writing (ours included once closed)."""
        if not self.directory.is_dir():
            return []
        found = []
        for path in sorted(self.directory.glob("usage-*.jsonl")):
            if self._file is not None and path == self.path:
                continue
            with path.open("r", encoding="utf-8") as f:
                try:
                    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue
                fcntl.flock(f, fcntl.LOCK_UN)
            found.append(path)
        return found


def read_spool(path: Path) -> list[Charge]:
    """The charges in a spool file; a torn last line (crash mid-write) is skipped."""
    charges = []
    for line in path.read_text(encoding="utf-8").splitlines():
        with contextlib.suppress(ValueError, TypeError):
            charges.append(Charge.from_json(line))
    return charges


class UsageLedger:
    """Buffers charges, writes them in batches, and knows what is not written yet."""

    def __init__(
        self,
        *,
        spool_dir: Path,
        batch_size: int,
        flush_interval_seconds: float,
        max_pending: int,
        on_charged: Callable[[Iterable[str]], None] = lambda _orgs: None,
    ) -> None:
        self._pending: collections.deque[Charge] = collections.deque()
        self._pending_by_org: collections.Counter[str] = collections.Counter()
        self._batch_size = batch_size
        self._interval = flush_interval_seconds
        self._max_pending = max_pending
        self._on_charged = on_charged
        self._wake = asyncio.Event()
        self.spool = Spool(spool_dir)

    def record(self, charge: Charge) -> None:
        """Queue a charge; never blocks and never fails the request."""
        self._pending.append(charge)
        self._pending_by_org[charge.organization_id] += charge.cost_microdollars
        metrics.USAGE_PENDING.inc()
        if len(self._pending) >= self._batch_size:
            self._wake.set()
        if len(self._pending) > self._max_pending:
            self._spill()

    def unwritten_microdollars(self, organization_id: str) -> int:
        """What this process has charged the organization and not yet written."""
        return self._pending_by_org.get(organization_id, 0)

    def __len__(self) -> int:
        return len(self._pending)

    def _pop(self, count: int) -> list[Charge]:
        """Take up to `count` of the oldest charges off the queue (still counted as unwritten)."""
        return [self._pending.popleft() for _ in range(min(count, len(self._pending)))]

    def _settle(self, charges: list[Charge]) -> None:
        """The charges are safely stored (database or spool): stop counting them as unwritten."""
        for charge in charges:
            left = self._pending_by_org[charge.organization_id] - charge.cost_microdollars
            if left:
                self._pending_by_org[charge.organization_id] = left
            else:
                del self._pending_by_org[charge.organization_id]
        metrics.USAGE_PENDING.dec(len(charges))

    def _spill(self) -> None:
        """Move the oldest charges past the bound to the spool file."""
        overflow = self._pop(len(self._pending) - self._max_pending // 2)
        self.spool.append(overflow)
        self._settle(overflow)
        log.warning("usage_spooled", charges=len(overflow), path=str(self.spool.path))

    async def flush_once(self, pool: asyncpg.Pool) -> int:
        """Write one batch; return how many charges it took (0 when there were none).

        A batch whose outcome is unknown (error, cancellation) goes back to the front of
        the queue and is written again later: the ledger's key makes that harmless.
        """
        batch = self._pop(self._batch_size)
        if not batch:
            return 0
        started = time.perf_counter()
        try:
            async with pool.acquire(timeout=self._interval * 40) as conn:
                inserted, charged = await write_batch(conn, batch)
        except BaseException:
            self._pending.extendleft(reversed(batch))
            raise
        metrics.USAGE_FLUSH_SECONDS.observe(time.perf_counter() - started)
        metrics.CHARGED_MICRODOLLARS.inc(charged)
        self._settle(batch)
        self._on_charged({c.organization_id for c in batch})
        if inserted != len(batch):
            log.info("usage_duplicates_skipped", duplicates=len(batch) - inserted)
        return len(batch)

    async def replay_spool(self, pool: asyncpg.Pool) -> int:
        """Write every orphaned spool file to the database, then delete it."""
        replayed = 0
        for path in self.spool.orphans():
            charges = read_spool(path)
            for start in range(0, len(charges), self._batch_size):
                batch = charges[start : start + self._batch_size]
                async with pool.acquire() as conn:
                    _inserted, charged = await write_batch(conn, batch)
                metrics.CHARGED_MICRODOLLARS.inc(charged)
                self._on_charged({c.organization_id for c in batch})
            path.unlink()
            replayed += len(charges)
            log.info("usage_spool_replayed", charges=len(charges), path=str(path))
        return replayed

    async def run(self, pool: asyncpg.Pool) -> None:
        """Flush forever: on every interval, at once when a batch fills, backing off on outages."""
        backoff = self._interval
        spool_checked = False
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), backoff)
            self._wake.clear()
            try:
                if not spool_checked:
                    await self.replay_spool(pool)
                    spool_checked = True
                while await self.flush_once(pool) == self._batch_size:
                    pass
                backoff = self._interval
            except UNAVAILABLE_ERRORS as exc:
                spool_checked = False  # the outage may have spilled charges to disk
                backoff = min(max(backoff * 2, 0.1), 5.0)
                log.warning("usage_flush_failed", error=type(exc).__name__, pending=len(self))

    async def close(self, pool: asyncpg.Pool, timeout_seconds: float) -> None:
        """Write everything pending; what cannot be written in time goes to the spool."""
        deadline = time.monotonic() + timeout_seconds
        while self._pending and time.monotonic() < deadline:
            try:
                await asyncio.wait_for(self.flush_once(pool), deadline - time.monotonic())
            except (*UNAVAILABLE_ERRORS, asyncpg.PostgresError) as exc:
                log.warning("usage_final_flush_failed", error=type(exc).__name__)
                break
        if self._pending:
            leftover = self._pop(len(self._pending))
            self.spool.append(leftover)
            self._settle(leftover)
            log.warning("usage_spooled_at_exit", charges=len(leftover), path=str(self.spool.path))
        self.spool.close()


def charges_summary(charges: list[Charge]) -> dict[str, Any]:
    """Totals of a list of charges (for logs and tests)."""
    return {"count": len(charges), "microdollars": sum(c.cost_microdollars for c in charges)}
