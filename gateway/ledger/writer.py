"""The `UsageLedger`: charges queued off the request path, written in batches, never lost.

The proxy records one `Charge` (`charge.py`) per metered request and moves on; the ledger
writes them in batches (every `USAGE_FLUSH_INTERVAL_SECONDS` or `USAGE_BATCH_SIZE` rows)
with `write_batch`, which charges each request exactly once. Kept apart from `charge.py`:
this is the queueing, retrying and spooling around that statement.

When PostgreSQL does not answer, charges wait in memory (bounded) and are retried; past
the bound they go to a spool file on local disk (`spool.py`), replayed once the database
answers again, or at the next start. Spooled charges still count against the
organization's balance until they are written.

No disk I/O runs on the event loop: `record` only queues, and every spool append (by its
base class, `SpillingQueue` in `spill.py`), replay, rejected-row file and rotation runs in the
ledger's one spool thread.

The writer never dies: an outage backs off and retries, a deadlock retries, and a batch
the database refuses for its content is written row by row so that only the offending
row is set aside (in a `rejected-*.jsonl` file, logged) and the rest are charged.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import functools
import itertools
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import asyncpg
import structlog
from aiohttp import web

from gateway.common.waiting import wait_until_set
from gateway.ledger.charge import (
    COST,
    ENCODE_SLICE,
    LOCK_ORDER,
    ORGANIZATION,
    Charge,
    charges_of,
    read_spool,
    worth_retrying,
    write_batch,
)
from gateway.ledger.spill import SpillingQueue, nothing
from gateway.ledger.spool import Claim, Spool, append_rejected, release_all
from gateway.platform import metrics
from gateway.platform.database import UNAVAILABLE_ERRORS

# What other modules import from here (the record and its batch insert moved to charge.py).
__all__ = ["ENCODE_SLICE", "LEDGER", "Charge", "UsageLedger", "read_spool", "write_batch"]

log = structlog.get_logger("gateway.usage")


class UsageLedger(SpillingQueue):
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
        # Charged by this process and not in the database yet: queued or spooled.
        self._unwritten_by_org: collections.Counter[str] = collections.Counter()
        self._spooled_by_us: dict[str, Charge] = {}
        self._batch_size = batch_size
        self._interval = flush_interval_seconds
        self._max_pending = max_pending
        self._on_charged = on_charged
        self._wake = asyncio.Event()
        self.spool = Spool(spool_dir)
        # Every call on the spool (and the rejected-row file) runs in this one thread, never
        # on the event loop. One worker because a Spool is not thread-safe (it holds its open
        # file and path): one thread runs the calls one at a time, in the order they were
        # made, even when the task that made one is cancelled while it runs; an asyncio.Lock
        # would be released on that cancellation and let the next call overlap it.
        self._disk = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="usage-spool"
        )
        # Moves the charges past the bound to the spool; None when no spill is under way.
        self._spill_task: asyncio.Task[None] | None = None
        # Replay at start: a crashed process may have left spool files.
        self._replay_due = True

    def record(self, charge: Charge) -> None:
        """Queue a charge; never blocks, never touches the disk, never fails the request."""
        self._pending.append(charge)
        if charge.cost_microdollars:
            self._unwritten_by_org[charge.organization_id] += charge.cost_microdollars
        if len(self._pending) >= self._batch_size:
            self._wake.set()
        if len(self._pending) > self._max_pending and self._spill_task is None:
            self._start_spill()

    def unwritten_microdollars(self, organization_id: str) -> int:
        """What this process has charged the organization and not yet written."""
        return self._unwritten_by_org.get(organization_id, 0)

    def _written(self, charges: Iterable[Charge]) -> None:
        """The charges are in the database: they no longer lower the cached balance."""
        # Summed per organization in C: a batch has hundreds of rows and a few organizations.
        ordered = sorted(charges, key=LOCK_ORDER)
        for organization_id, rows in itertools.groupby(ordered, key=ORGANIZATION):
            written = sum(map(COST, rows))
            if not written:
                continue  # never counted
            left = self._unwritten_by_org[organization_id] - written
            if left:
                self._unwritten_by_org[organization_id] = left
            else:
                del self._unwritten_by_org[organization_id]

    async def flush_once(self, pool: asyncpg.Pool) -> int:
        """Write one batch; return how many charges it took (0 when there were none).

        A batch whose outcome is unknown (error, cancellation) goes back to the front of
        the queue and is written again later: the ledger's key makes that harmless.
        """
        # Sorted once here: the statement and the balances both go by organization.
        batch = sorted(self._pop(self._batch_size), key=LOCK_ORDER)
        if not batch:
            return 0
        started = time.perf_counter()
        try:
            inserted, _charged = await self._write(pool, batch)
        except BaseException:
            self._pending.extendleft(reversed(batch))
            raise
        self._written(batch)
        metrics.USAGE_FLUSH_SECONDS.observe(time.perf_counter() - started)
        if inserted != len(batch):
            log.info("usage_duplicates_skipped", duplicates=len(batch) - inserted)
        return len(batch)

    async def _write(self, pool: asyncpg.Pool, batch: list[Charge]) -> tuple[int, int]:
        async with pool.acquire(timeout=self._interval * 40) as conn:
            inserted, charged = await write_batch(conn, batch)
        metrics.CHARGED_MICRODOLLARS.inc(charged)
        self._on_charged(set(map(ORGANIZATION, batch)))
        return inserted, charged

    async def replay_spool(self, pool: asyncpg.Pool) -> int:
        """Write every spool file no live process is writing (ours once rotated), then delete it."""
        await self._on_disk(self.spool.rotate)
        claiming = asyncio.get_running_loop().run_in_executor(self._disk, self._claim_charges)
        try:
            claims = await asyncio.shield(claiming)
        except asyncio.CancelledError:
            # The thread goes on and claims the files: let them go once it has, or they
            # stay locked (unreplayable) until the handles are collected.
            claiming.add_done_callback(self._release_abandoned)
            raise
        replayed = 0
        try:
            for claim, charges in claims:
                for start in range(0, len(charges), self._batch_size):
                    await self._write_or_set_aside(pool, charges[start : start + self._batch_size])
                await self._on_disk(claim.path.unlink)
                # Only what this process spooled was counted against balances here.
                self._written(c for c in charges if self._spooled_by_us.pop(c.request_id, None))
                replayed += len(charges)
                metrics.USAGE_REPLAYED.inc(len(charges))
                log.info("usage_spool_replayed", charges=len(charges), path=str(claim.path))
        finally:
            # In the thread's queue at once, so the locks go back even if this task is
            # cancelled again while it waits.
            await self._on_disk(functools.partial(release_all, [claim for claim, _ in claims]))
        return replayed

    def _release_abandoned(
        self, claiming: asyncio.Future[list[tuple[Claim, list[Charge]]]]
    ) -> None:
        """Release the claims of a replay cancelled while the thread was making them."""
        if not claiming.cancelled() and claiming.exception() is None:
            self._disk.submit(release_all, [claim for claim, _ in claiming.result()])

    def _claim_charges(self) -> list[tuple[Claim, list[Charge]]]:
        """The spool files claimed, with their charges (in the spool thread: reading and
        decoding a spool of thousands of charges is milliseconds of work)."""
        return [(claim, charges_of(claim.records)) for claim in self.spool.claim()]

    async def run(self, pool: asyncpg.Pool) -> None:
        """Flush forever: every interval, at once when a batch fills, backing off on trouble."""
        backoff = self._interval
        set_aside = False
        while True:
            await wait_until_set(self._wake, backoff)
            self._wake.clear()
            # A failed batch back in the queue can take it past the bound with no new charge.
            if len(self._pending) > self._max_pending and self._spill_task is None:
                self._start_spill()
            try:
                if self._replay_due:
                    await self._replay(pool)
                if set_aside:
                    set_aside = False
                    await self._set_aside_refused(pool)
                while await self.flush_once(pool) == self._batch_size:
                    pass
                backoff = self._interval
            except UNAVAILABLE_ERRORS as exc:
                metrics.DATABASE_UNAVAILABLE_ON["usage_flush"].inc()
                self._replay_due = True  # files of a process that died meanwhile, too
                backoff = min(max(backoff * 2, 0.1), 5.0)
                log.warning("usage_flush_failed", error=type(exc).__name__, pending=len(self))
            except asyncpg.PostgresError as exc:
                backoff = self._interval
                set_aside = not worth_retrying(exc)
            except Exception:
                backoff = min(max(backoff * 2, 0.1), 5.0)
                log.exception("usage_flush_error", pending=len(self))

    async def _replay(self, pool: asyncpg.Pool) -> None:
        self._replay_due = False  # a spill from now on sets it again
        try:
            await self.replay_spool(pool)
        except BaseException:
            self._replay_due = True
            raise

    async def _set_aside_refused(self, pool: asyncpg.Pool) -> None:
        """The next batch holds a row the database refuses: write row by row, keep the rest.

        When the database stops answering half-way, what is not written yet goes back to
        the front of the queue.
        """
        batch = self._pop(self._batch_size)
        for index, charge in enumerate(batch):
            try:
                await self._write_or_reject(pool, charge)
            except BaseException:
                self._pending.extendleft(reversed(batch[index:]))
                raise
            self._written([charge])

    async def _write_or_set_aside(self, pool: asyncpg.Pool, charges: list[Charge]) -> None:
        """Write the charges in one batch, or row by row if the database refuses one."""
        try:
            await self._write(pool, charges)
        except asyncpg.PostgresError as exc:
            if worth_retrying(exc):
                raise
            for charge in charges:
                await self._write_or_reject(pool, charge)

    async def _write_or_reject(self, pool: asyncpg.Pool, charge: Charge) -> None:
        """Write one charge, or set it aside (on disk, logged) if the database refuses its
        content; an outage or a retryable error raises."""
        try:
            await self._write(pool, [charge])
        except asyncpg.PostgresError as exc:
            if worth_retrying(exc):
                raise
            path = await self._on_disk(
                functools.partial(append_rejected, self.spool.directory, [charge.record()])
            )
            metrics.USAGE_REJECTED.inc()
            log.error(
                "usage_charge_rejected",
                request_id=charge.request_id,
                sqlstate=exc.sqlstate,
                path=str(path),
            )

    async def close(self, pool: asyncpg.Pool, timeout_seconds: float) -> None:
        """Write everything pending; what cannot be written in time goes to the spool."""
        deadline = time.monotonic() + timeout_seconds
        while self._pending and time.monotonic() < deadline:
            try:
                await asyncio.wait_for(self.flush_once(pool), deadline - time.monotonic())
            except (*UNAVAILABLE_ERRORS, asyncpg.PostgresError) as exc:
                log.warning("usage_final_flush_failed", error=type(exc).__name__)
                break
        if (spill := self._spill_task) is not None:
            # What it would spool is spooled below; an append it has under way finishes in
            # the spool thread regardless.
            spill.cancel()
            await asyncio.wait([spill])
        # Everything queued to the spool thread before is done after this (one thread, in
        # order), and its charges are noted as spooled or back in the queue.
        await self._on_disk(nothing)
        if self._pending:
            await self._to_spool(self._pop(len(self._pending)))
        await self._on_disk(self.spool.rotate)


LEDGER = web.AppKey("ledger", UsageLedger)
