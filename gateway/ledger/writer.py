"""Charging organizations for what they used: batched, exactly once, never lost.

The proxy records one `Charge` per metered request and moves on; the `UsageLedger`
writes them in batches off the request path (every `USAGE_FLUSH_INTERVAL_SECONDS` or
`USAGE_BATCH_SIZE` rows), one transaction per batch. Each batch inserts into `llm_usage`
only the rows whose `request_id` is new and adds to `credits_used_microdollars` only what
it inserted, so a batch retried after an unknown outcome never charges twice, and
several processes charging one organization leave exactly the sum.

When PostgreSQL does not answer, charges wait in memory (bounded) and are retried;
past the bound they are appended to a spool file on local disk (`spool.py`), which is
replayed once the database answers again, or at the next start. Spooled charges still
count against the organization's balance until they are written.

No disk I/O runs on the event loop: `record` is on the request path and only queues, and
every spool append (JSON encoding, write, fsync), replay, rejected-row file and rotation
runs in the ledger's one spool thread. During an outage an fsync of thousands of charges
on the loop had every open stream wait for the disk.

The writer never dies: an outage backs off and retries, a deadlock retries, and a batch
the database refuses for its content is written row by row so that only the offending
row is set aside (in a `rejected-*.jsonl` file, logged) and the rest are charged.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import functools
import itertools
import json
import operator
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

import asyncpg
import structlog
from aiohttp import web

from gateway.common.money import MICRODOLLARS_PER_USD
from gateway.ledger.spool import Claim, Spool, append_rejected, read_records, release_all
from gateway.platform import metrics
from gateway.platform.database import UNAVAILABLE_ERRORS

log = structlog.get_logger("gateway.usage")

INT4_MAX = 2**31 - 1
# No single request costs more than this; a larger figure from the upstream is an error,
# charged at this ceiling (and logged) rather than overflowing the ledger.
MAX_COST_MICRODOLLARS = 10_000 * MICRODOLLARS_PER_USD
MAX_MODEL_LENGTH = 300
# Charges encoded at a time before other work on the event loop may run.
ENCODE_SLICE = 128
# Errors worth retrying as they are: serialization failures and deadlocks.
_RETRY_SQLSTATE_CLASS = "40"
# After a spool append failed (a full disk, a permission), wait this long before trying
# again: the charges are back in the queue meanwhile, nothing is dropped.
SPILL_RETRY_SECONDS = 1.0

_T = TypeVar("_T")


class Charge(NamedTuple):
    """One metered request, as `llm_usage` records it (a tuple: one is made per request,
    and a batch turns into the statement's columns with one `zip`)."""

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

    @classmethod
    def make(
        cls,
        request_id: str,
        organization_id: str,
        user_id: str,
        model: str | None,
        prompt_tokens: int | None,
        completion_tokens: int | None,
        cost_microdollars: int,
        streamed: bool,
        status: int,
        cancelled: bool,
    ) -> Charge:
        """A charge whose every field fits its column, whatever the upstream reported."""
        if not 0 <= cost_microdollars <= MAX_COST_MICRODOLLARS:
            if cost_microdollars > MAX_COST_MICRODOLLARS:
                log.warning("usage_cost_capped", request_id=request_id, reported=cost_microdollars)
            cost_microdollars = min(max(cost_microdollars, 0), MAX_COST_MICRODOLLARS)
        if model is not None and (len(model) > MAX_MODEL_LENGTH or "\x00" in model):
            model = model.replace("\x00", "")[:MAX_MODEL_LENGTH]
        if prompt_tokens is not None and not 0 <= prompt_tokens <= INT4_MAX:
            prompt_tokens = _clamp_tokens(prompt_tokens)
        if completion_tokens is not None and not 0 <= completion_tokens <= INT4_MAX:
            completion_tokens = _clamp_tokens(completion_tokens)
        if not 0 <= status <= 999:
            status = min(max(status, 0), 999)
        # Positional: this runs once per metered request.
        return cls(
            request_id,
            organization_id,
            user_id,
            model,
            prompt_tokens,
            completion_tokens,
            cost_microdollars,
            streamed,
            status,
            cancelled,
        )

    def record(self) -> dict[str, Any]:
        """The charge as a plain record (for the spool)."""
        return self._asdict()

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> Charge:
        return cls(**record)


def _worth_retrying(exc: asyncpg.PostgresError) -> bool:
    """An error that says nothing about the rows: an outage, a deadlock, a serialization
    failure. Any other error refuses the rows, and retrying them as they are cannot help."""
    return isinstance(exc, UNAVAILABLE_ERRORS) or (exc.sqlstate or "").startswith(
        _RETRY_SQLSTATE_CLASS
    )


def _clamp_tokens(count: int) -> int:
    return min(max(count, 0), INT4_MAX)


def read_spool(path: Path) -> list[Charge]:
    """The charges in a spool file (a torn last line is skipped). Blocking: not for the
    event loop (the ledger replays through its spool thread)."""
    with path.open("r", encoding="utf-8") as f:
        return _charges(read_records(f))


def _charges(records: list[dict[str, Any]]) -> list[Charge]:
    charges = []
    for record in records:
        with contextlib.suppress(TypeError):
            charges.append(Charge.from_record(record))
    return charges


# One statement: insert the batch, then charge each organization for exactly what it
# inserted. The batch arrives as one JSON array of rows (Charge's fields, in order):
# encoding ten arrays element by element cost the gateway about 3 us per row, JSON 0.5.
# `{on_conflict}` is empty for the first attempt (see `write_batch`).
_WRITE_BATCH_TEMPLATE = """
WITH batch AS (
    SELECT r->>0 AS request_id, (r->>1)::uuid AS organization_id, r->>2 AS user_id,
           r->>3 AS model, (r->>4)::int AS prompt_tokens, (r->>5)::int AS completion_tokens,
           (r->>6)::bigint AS cost_microdollars, (r->>7)::bool AS streamed,
           (r->>8)::int AS status, (r->>9)::bool AS cancelled, position
    FROM jsonb_array_elements($1::jsonb) WITH ORDINALITY AS rows(r, position)
), inserted AS (
    INSERT INTO llm_usage (request_id, organization_id, user_id, model, prompt_tokens,
                           completion_tokens, cost_microdollars, streamed, status, cancelled)
    SELECT request_id, organization_id, user_id, model, prompt_tokens, completion_tokens,
           cost_microdollars, streamed, status, cancelled
    FROM batch ORDER BY position
    {on_conflict}
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
_INSERT_BATCH_SQL = _WRITE_BATCH_TEMPLATE.format(on_conflict="")
_INSERT_NEW_OF_BATCH_SQL = _WRITE_BATCH_TEMPLATE.format(
    on_conflict="ON CONFLICT (request_id) DO NOTHING"
)


# Rows go in a fixed order, organization then request (see `write_batch`).
_LOCK_ORDER = operator.itemgetter(1, 0)
_ORGANIZATION = operator.itemgetter(1)
_COST = operator.itemgetter(6)


async def write_batch(conn: asyncpg.Connection, charges: list[Charge]) -> tuple[int, int]:
    """Write a batch atomically; return (rows new to the ledger, microdollars charged).

    Rows go in a fixed order (organization, then request) so that two processes writing
    overlapping batches take their locks in the same order instead of deadlocking.
    """
    ordered = sorted(charges, key=_LOCK_ORDER)
    payload = await _encode_in_slices(ordered)
    # One statement is one transaction: no BEGIN and COMMIT round trips around it.
    try:
        # A plain insert costs PostgreSQL about 6 us a row, one with ON CONFLICT 9: the
        # speculative insertion it needs is paid for every row, conflict or not.
        row = await conn.fetchrow(_INSERT_BATCH_SQL, payload)
    except asyncpg.UniqueViolationError:
        # Some rows are in already (a batch retried after an unknown outcome, a spool
        # replayed again): the failed statement changed nothing; skip the rows written.
        row = await conn.fetchrow(_INSERT_NEW_OF_BATCH_SQL, payload)
    assert row is not None
    return int(row["inserted"]), int(row["charged"])


async def _encode_in_slices(rows: list[Charge]) -> str:
    """The rows as one JSON array, encoded a slice at a time.

    A batch of 500 encoded at once held the event loop for about half a millisecond, and
    every request and stream chunk arriving meanwhile waited; between slices they go first.
    """
    parts = []
    for start in range(0, len(rows), ENCODE_SLICE):
        if start:
            await asyncio.sleep(0)
        parts.append(json.dumps(rows[start : start + ENCODE_SLICE])[1:-1])
    return f"[{','.join(parts)}]"


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
        metrics.follow_pending(self)

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

    def __len__(self) -> int:
        return len(self._pending)

    def _pop(self, count: int) -> list[Charge]:
        """Take up to `count` of the oldest charges off the queue (still unwritten)."""
        return [self._pending.popleft() for _ in range(min(count, len(self._pending)))]

    def _written(self, charges: Iterable[Charge]) -> None:
        """The charges are in the database: they no longer lower the cached balance."""
        # Summed per organization in C: a batch has hundreds of rows and a few organizations.
        ordered = sorted(charges, key=_LOCK_ORDER)
        for organization_id, rows in itertools.groupby(ordered, key=_ORGANIZATION):
            written = sum(map(_COST, rows))
            if not written:
                continue  # never counted
            left = self._unwritten_by_org[organization_id] - written
            if left:
                self._unwritten_by_org[organization_id] = left
            else:
                del self._unwritten_by_org[organization_id]

    def _start_spill(self) -> None:
        """Have the charges past the bound spooled by a task of their own, off the request.

        Not by the writer (`run`): during an outage it may wait out a pool's timeout for
        many seconds, and the queue would grow without bound meanwhile.
        """
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # a caller without a loop: `run` or `close` spills them
        self._spill_task = loop.create_task(self._spill(), name="usage-spill")

    async def _spill(self) -> None:
        """Move the oldest charges past the bound to the spool file, until under it.

        While the spool thread writes, requests go on queueing charges: on a slow disk the
        queue exceeds the bound for the length of an fsync or so, and the next round takes
        those too. Charges are never dropped to keep the bound.
        """
        try:
            while len(self._pending) > self._max_pending:
                try:
                    await self._to_spool(self._pop(len(self._pending) - self._max_pending // 2))
                except Exception:
                    # Back in the queue already (see `_spooled`); the writer may still get
                    # them to the database.
                    log.exception("usage_spool_failed", pending=len(self))
                    await asyncio.sleep(SPILL_RETRY_SECONDS)
        finally:
            self._spill_task = None

    async def _to_spool(self, charges: list[Charge]) -> None:
        """Append the charges to the spool file (encoded and fsynced in the spool thread)."""
        future = asyncio.get_running_loop().run_in_executor(
            self._disk, self.spool.append, map(Charge.record, charges)
        )
        # The bookkeeping is the future's, not this task's: it runs once the thread is
        # done even if this task was cancelled meanwhile, so each charge ends up either
        # noted as spooled or queued again, never lost between the two. It also runs before
        # this task resumes (callbacks run in the order they were added, shield's last).
        future.add_done_callback(functools.partial(self._spooled, charges))
        await asyncio.shield(future)

    def _spooled(self, charges: list[Charge], future: asyncio.Future[Path]) -> None:
        """The spool thread is done with `charges`: note them as spooled, or queue them
        again (at the front, still unwritten) if the append failed."""
        if future.cancelled() or future.exception() is not None:
            # Some may be in the file anyway: written twice is harmless, the ledger's key
            # skips the second, and only charges noted here are counted off at replay.
            self._pending.extendleft(reversed(charges))
            return
        self._spooled_by_us.update((c.request_id, c) for c in charges)
        # Spilled charges are written back as soon as the database takes a batch again,
        # even when no write failed meanwhile (a pool waiting out the outage).
        self._replay_due = True
        log.warning("usage_spooled", charges=len(charges), path=str(future.result()))

    async def wait_spilled(self) -> None:
        """Wait until no spill is under way and the spool thread is done with what it had
        (for tests and tools: `record` returns before its spill is on disk)."""
        while (spill := self._spill_task) is not None:
            await asyncio.wait([spill])
        await self._on_disk(_nothing)

    async def _on_disk(self, call: Callable[[], _T]) -> _T:
        """Run a blocking spool call in the spool thread. Cancelling the caller does not
        stop the call (a thread cannot be interrupted): it still runs, in its turn."""
        future = asyncio.get_running_loop().run_in_executor(self._disk, call)
        return await asyncio.shield(future)

    async def flush_once(self, pool: asyncpg.Pool) -> int:
        """Write one batch; return how many charges it took (0 when there were none).

        A batch whose outcome is unknown (error, cancellation) goes back to the front of
        the queue and is written again later: the ledger's key makes that harmless.
        """
        # Sorted once here: the statement and the balances both go by organization.
        batch = sorted(self._pop(self._batch_size), key=_LOCK_ORDER)
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
        self._on_charged(set(map(_ORGANIZATION, batch)))
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
        return [(claim, _charges(claim.records)) for claim in self.spool.claim()]

    async def run(self, pool: asyncpg.Pool) -> None:
        """Flush forever: every interval, at once when a batch fills, backing off on trouble."""
        backoff = self._interval
        set_aside = False
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), backoff)
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
                self._replay_due = True  # files of a process that died meanwhile, too
                backoff = min(max(backoff * 2, 0.1), 5.0)
                log.warning("usage_flush_failed", error=type(exc).__name__, pending=len(self))
            except asyncpg.PostgresError as exc:
                backoff = self._interval
                set_aside = not _worth_retrying(exc)
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
            if _worth_retrying(exc):
                raise
            for charge in charges:
                await self._write_or_reject(pool, charge)

    async def _write_or_reject(self, pool: asyncpg.Pool, charge: Charge) -> None:
        """Write one charge, or set it aside (on disk, logged) if the database refuses its
        content; an outage or a retryable error raises."""
        try:
            await self._write(pool, [charge])
        except asyncpg.PostgresError as exc:
            if _worth_retrying(exc):
                raise
            path = await self._on_disk(
                functools.partial(append_rejected, self.spool.directory, [charge.record()])
            )
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
        await self._on_disk(_nothing)
        if self._pending:
            await self._to_spool(self._pop(len(self._pending)))
        await self._on_disk(self.spool.rotate)


def _nothing() -> None:
    pass


LEDGER = web.AppKey("ledger", UsageLedger)
