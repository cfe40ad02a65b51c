"""The ledger's queue of unwritten charges, and spilling it to the spool off the loop.

`SpillingQueue` is the base of the `UsageLedger` (`writer.py`): the queue and the moving
of the charges past its bound to the spool file (`spool.py`), in a task of its own so
that the request path never waits for it. Kept apart from the writer because it is the
part that touches the disk, and none of that may run on the event loop: every spool call
runs in the ledger's one spool thread (`_on_disk`). During an outage an fsync of
thousands of charges on the loop had every open stream wait for the disk.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import functools
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import structlog

from gateway.ledger.charge import Charge
from gateway.ledger.spool import Spool
from gateway.platform import metrics

log = structlog.get_logger("gateway.usage")

# After a spool append failed (a full disk, a permission), wait this long before trying
# again: the charges are back in the queue meanwhile, nothing is dropped.
SPILL_RETRY_SECONDS = 1.0

_T = TypeVar("_T")


class SpillingQueue:
    """Charges not written yet, and their way to the spool (the `UsageLedger` sets these
    attributes up)."""

    spool: Spool
    _pending: collections.deque[Charge]
    _spooled_by_us: dict[str, Charge]
    _max_pending: int
    _disk: concurrent.futures.ThreadPoolExecutor
    _spill_task: asyncio.Task[None] | None
    _replay_due: bool

    def __len__(self) -> int:
        return len(self._pending)

    def _pop(self, count: int) -> list[Charge]:
        """Take up to `count` of the oldest charges off the queue (still unwritten)."""
        return [self._pending.popleft() for _ in range(min(count, len(self._pending)))]

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
        metrics.USAGE_SPOOLED.inc(len(charges))
        # Spilled charges are written back as soon as the database takes a batch again,
        # even when no write failed meanwhile (a pool waiting out the outage).
        self._replay_due = True
        log.warning("usage_spooled", charges=len(charges), path=str(future.result()))

    async def wait_spilled(self) -> None:
        """Wait until no spill is under way and the spool thread is done with what it had
        (for tests and tools: `record` returns before its spill is on disk)."""
        while (spill := self._spill_task) is not None:
            await asyncio.wait([spill])
        await self._on_disk(nothing)

    async def _on_disk(self, call: Callable[[], _T]) -> _T:
        """Run a blocking spool call in the spool thread. Cancelling the caller does not
        stop the call (a thread cannot be interrupted): it still runs, in its turn."""
        future = asyncio.get_running_loop().run_in_executor(self._disk, call)
        return await asyncio.shield(future)


def nothing() -> None:
    """Does nothing: in the spool thread, it returns once all queued before it is done."""
