"""`UsageLedger` and `write_batch` against a real PostgreSQL: exact, idempotent, durable.

Each test gets its own migrated database and a pool on it; spool files go to the test's
temporary directory. The gauge of unwritten charges is process-wide, so tests compare it
before and after rather than to an absolute value.

Every test runs under blockbuster (see `tests/conftest.py`): a blocking call on the event
loop, the ledger's or the test's own, fails it. So the tests read and write files through
`asyncio.to_thread` too, and wait for a spill with `wait_spilled` (`record` returns before
the charges are on disk).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from blockbuster import BlockBuster, BlockingError
from prometheus_client import REGISTRY

from gateway.ledger.writer import ENCODE_SLICE, Charge, UsageLedger, read_spool, write_batch
from gateway.platform import metrics
from tests.factories import Seed

pytestmark = pytest.mark.usefixtures("blockbuster")

COST = 420
DEADLINE_SECONDS = 5.0
POLL_SECONDS = 0.01


@pytest.fixture
def make_ledger(tmp_path: Path) -> Callable[..., UsageLedger]:
    """Build ledgers spooling to this test's directory; keywords override the defaults."""

    def make(**overrides: Any) -> UsageLedger:
        settings: dict[str, Any] = {
            "spool_dir": tmp_path / "spool",
            "batch_size": 500,
            "flush_interval_seconds": 0.01,
            "max_pending": 10_000,
        }
        settings.update(overrides)
        ledger = UsageLedger(**settings)
        TALLY.follow_pending(ledger)
        return ledger

    return make


def charge(org_id: str, cost: int = COST, request_id: str | None = None, **fields: Any) -> Charge:
    """A charge for `org_id` with a fresh request id unless one is given."""
    values: dict[str, Any] = {
        "request_id": request_id or f"req_{uuid.uuid4().hex}",
        "organization_id": org_id,
        "user_id": "user_ledger",
        "model": "openai/gpt-4o-mini",
        "prompt_tokens": 11,
        "completion_tokens": 7,
        "cost_microdollars": cost,
        "streamed": False,
        "status": 200,
    }
    values.update(fields)
    return Charge(**values)


async def credits_used(db: asyncpg.Connection, org_id: str) -> int:
    used: int = await db.fetchval(
        "SELECT credits_used_microdollars FROM organizations WHERE id = $1::uuid", org_id
    )
    return used


async def usage_rows(db: asyncpg.Connection, org_id: str) -> int:
    count: int = await db.fetchval(
        "SELECT count(*) FROM llm_usage WHERE organization_id = $1::uuid", org_id
    )
    return count


async def eventually(
    probe: Callable[[], Awaitable[Any]], expected: Any, flusher: asyncio.Task[None] | None = None
) -> None:
    """Poll `probe` until it returns `expected`, or fail at the deadline or if `flusher` dies."""
    deadline = time.monotonic() + DEADLINE_SECONDS
    while (got := await probe()) != expected:
        if flusher is not None and flusher.done():
            raise AssertionError(f"the flusher died: {flusher.exception()!r}; still {got!r}")
        assert time.monotonic() < deadline, f"still {got!r}, expected {expected!r}"
        await asyncio.sleep(POLL_SECONDS)


async def all_written(ledger: UsageLedger, org_id: str, flusher: asyncio.Task[None]) -> None:
    """Wait until nothing the ledger charged `org_id` is unwritten: the balance drops only
    once each write is known to have committed, after the row is visible."""
    await eventually(
        lambda: asyncio.sleep(0, result=ledger.unwritten_microdollars(org_id)), 0, flusher=flusher
    )


# The ledgers these tests make, followed as an application's tally follows its ledger.
TALLY = metrics.Tally()


def pending_gauge() -> float:
    TALLY.fold()  # as /metrics does before every scrape
    value = REGISTRY.get_sample_value("gateway_usage_pending")
    assert value is not None
    return value


async def spool_files(ledger: UsageLedger) -> list[Path]:
    return await asyncio.to_thread(lambda: sorted(ledger.spool.directory.glob("usage-*.jsonl")))


async def spooled_charges(path: Path | None) -> list[Charge]:
    assert path is not None
    return await asyncio.to_thread(read_spool, path)


async def spilled_and_let_go(ledger: UsageLedger) -> None:
    """The ledger's spill is on disk and its spool file closed (unlocked): as a process that
    stopped leaves it."""
    await ledger.wait_spilled()
    await asyncio.to_thread(ledger.spool.rotate)


async def run_in_background(ledger: UsageLedger, pool: asyncpg.Pool) -> asyncio.Task[None]:
    return asyncio.create_task(ledger.run(pool))


async def stop(task: asyncio.Task[None]) -> None:
    """Cancel a flusher; one that already died has had its error reported by `eventually`."""
    if task.done():
        if not task.cancelled():
            task.exception()
        return
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


# --- write_batch --------------------------------------------------------------------------


async def test_batch_writes_rows_and_charges_exactly_the_sum(
    pool: asyncpg.Pool, db: asyncpg.Connection, seed: Seed
) -> None:
    """A batch inserts one llm_usage row per charge and adds exactly their sum to the org."""
    org = await seed.org()
    batch = [charge(org, cost) for cost in (420, 1, 999_999, 0, 7)]
    async with pool.acquire() as conn:
        assert await write_batch(conn, batch) == (5, 420 + 1 + 999_999 + 7)
    assert await credits_used(db, org) == 1_000_427
    rows = await db.fetch(
        "SELECT * FROM llm_usage WHERE organization_id = $1::uuid ORDER BY request_id", org
    )
    assert {r["request_id"] for r in rows} == {c.request_id for c in batch}
    first = next(r for r in rows if r["request_id"] == batch[0].request_id)
    assert (first["model"], first["prompt_tokens"], first["completion_tokens"]) == (
        "openai/gpt-4o-mini",
        11,
        7,
    )
    assert (first["streamed"], first["status"], first["cancelled"]) == (False, 200, False)


async def test_retried_batch_charges_nothing_more(
    pool: asyncpg.Pool, db: asyncpg.Connection, seed: Seed
) -> None:
    """Writing the same batch again (a retry after an unknown outcome) inserts and charges 0."""
    org = await seed.org()
    batch = [charge(org) for _ in range(3)]
    async with pool.acquire() as conn:
        assert await write_batch(conn, batch) == (3, 3 * COST)
        assert await write_batch(conn, batch) == (0, 0)
        # A retry that overlaps with new charges charges only the new ones.
        assert await write_batch(conn, [*batch, charge(org, 5)]) == (1, 5)
    assert await credits_used(db, org) == 3 * COST + 5
    assert await usage_rows(db, org) == 4


async def test_batch_charges_each_organization_its_own_sum(
    pool: asyncpg.Pool, db: asyncpg.Connection, seed: Seed
) -> None:
    """One batch spanning organizations charges each exactly its own charges."""
    first, second = await seed.org(), await seed.org()
    batch = [charge(first, 100), charge(second, 20), charge(first, 3), charge(second, 0)]
    async with pool.acquire() as conn:
        assert await write_batch(conn, batch) == (4, 123)
    assert (await credits_used(db, first), await credits_used(db, second)) == (103, 20)


@pytest.mark.parametrize("size", [ENCODE_SLICE, ENCODE_SLICE + 1, 3 * ENCODE_SLICE - 1])
async def test_a_batch_encoded_in_several_slices_is_written_whole(
    pool: asyncpg.Pool, db: asyncpg.Connection, seed: Seed, size: int
) -> None:
    """A batch larger than one encoding slice: every row once, the exact sum, none lost
    at a slice's edge."""
    first, second = await seed.org(), await seed.org()
    batch = [charge(first if i % 3 else second, i + 1) for i in range(size)]
    async with pool.acquire() as conn:
        assert await write_batch(conn, batch) == (size, sum(range(1, size + 1)))
    assert await usage_rows(db, first) + await usage_rows(db, second) == size
    in_first = sum(i + 1 for i in range(size) if i % 3)
    assert await credits_used(db, first) == in_first
    assert await credits_used(db, second) == sum(range(1, size + 1)) - in_first


async def test_two_ledgers_with_different_charges_for_one_org_sum_exactly(
    pool: asyncpg.Pool, db: asyncpg.Connection, seed: Seed, make_ledger: Callable[..., UsageLedger]
) -> None:
    """Two ledgers (two processes) flushing one org's charges concurrently leave exactly the sum."""
    org = await seed.org()
    ledgers = [make_ledger(batch_size=25), make_ledger(batch_size=25)]
    tasks = [await run_in_background(ledger, pool) for ledger in ledgers]
    try:
        for i in range(400):
            ledgers[i % 2].record(charge(org, cost=1 + i))
            if i % 50 == 0:
                await asyncio.sleep(0)
        for task in tasks:
            await eventually(lambda: usage_rows(db, org), 400, flusher=task)
        assert await credits_used(db, org) == sum(1 + i for i in range(400))
    finally:
        for task in tasks:
            await stop(task)


async def test_two_ledgers_with_the_same_charges_write_them_once(
    pool: asyncpg.Pool, db: asyncpg.Connection, seed: Seed, make_ledger: Callable[..., UsageLedger]
) -> None:
    """The same charges flushed by two ledgers at once (two replays of one spool) count once."""
    org = await seed.org()
    shared = [charge(org, cost=10 + i) for i in range(300)]
    for _ in range(5):
        ledgers = [make_ledger(), make_ledger()]
        for ledger in ledgers:
            for c in shared:
                ledger.record(c)
        results = await asyncio.gather(*(ledger.flush_once(pool) for ledger in ledgers))
        assert results == [300, 300]
        assert [len(ledger) for ledger in ledgers] == [0, 0]
    assert await usage_rows(db, org) == 300
    assert await credits_used(db, org) == sum(c.cost_microdollars for c in shared)


# --- What is not written yet --------------------------------------------------------------


async def test_unwritten_microdollars_until_flushed(
    pool: asyncpg.Pool, db: asyncpg.Connection, seed: Seed, make_ledger: Callable[..., UsageLedger]
) -> None:
    """Recorded charges count as unwritten, per org, until a flush writes them; then 0."""
    first, second = await seed.org(), await seed.org()
    ledger = make_ledger()
    gauge_before = pending_gauge()
    for c in (charge(first, 400), charge(first, 20), charge(second, 5), charge(second, 0)):
        ledger.record(c)
    assert ledger.unwritten_microdollars(first) == 420
    assert ledger.unwritten_microdollars(second) == 5
    assert ledger.unwritten_microdollars(str(uuid.uuid4())) == 0
    assert pending_gauge() == gauge_before + 4
    assert await ledger.flush_once(pool) == 4
    assert ledger.unwritten_microdollars(first) == ledger.unwritten_microdollars(second) == 0
    assert len(ledger) == 0
    assert pending_gauge() == gauge_before
    assert await credits_used(db, first) == 420


async def test_failed_flush_keeps_the_batch_and_retries_it_once(
    pool: asyncpg.Pool,
    dead_pool: asyncpg.Pool,
    db: asyncpg.Connection,
    seed: Seed,
    make_ledger: Callable[..., UsageLedger],
) -> None:
    """A batch the database did not take stays queued, still unwritten; a later flush writes it."""
    org = await seed.org()
    ledger = make_ledger(batch_size=2)
    batch = [charge(org, 100), charge(org, 200), charge(org, 300)]
    for c in batch:
        ledger.record(c)
    with pytest.raises(OSError):
        await ledger.flush_once(dead_pool)
    assert len(ledger) == 3
    assert ledger.unwritten_microdollars(org) == 600
    assert await ledger.flush_once(pool) == 2
    assert await ledger.flush_once(pool) == 1
    assert await ledger.flush_once(pool) == 0
    assert await credits_used(db, org) == 600
    assert await usage_rows(db, org) == 3


async def test_run_survives_an_outage_and_writes_everything(
    db_url: str, db: asyncpg.Connection, seed: Seed, make_ledger: Callable[..., UsageLedger]
) -> None:
    """The background flusher keeps retrying through refused connections, then writes all."""
    org = await seed.org()
    ledger = make_ledger()
    attempts = 0

    async def hang_up(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal attempts
        attempts += 1
        writer.close()

    # A "database" that accepts connections and drops them at once: each is one attempt.
    server = await asyncio.start_server(hang_up, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    down = await asyncpg.create_pool(
        f"postgresql://postgres@127.0.0.1:{port}/x", min_size=0, max_size=1
    )
    assert down is not None
    task = await run_in_background(ledger, down)
    try:
        for _ in range(5):
            ledger.record(charge(org))
        await eventually(lambda: asyncio.sleep(0, result=attempts >= 3), True, flusher=task)
    finally:
        await stop(task)
        await down.close()
        server.close()
        await server.wait_closed()
    assert await usage_rows(db, org) == 0
    assert ledger.unwritten_microdollars(org) == 5 * COST
    live = await asyncpg.create_pool(db_url, min_size=1, max_size=2)
    assert live is not None
    task = await run_in_background(ledger, live)
    try:
        # Unwritten drops only once the batch's transaction is known to have committed.
        await all_written(ledger, org, task)
        assert len(ledger) == 0
        assert await credits_used(db, org) == 5 * COST
    finally:
        await stop(task)
        await live.close()


# --- Fault injection: PostgreSQL refuses a batch ------------------------------------------

FAIL_FIRST_INSERT_SQL = """
CREATE SEQUENCE test_fault_seq;
CREATE FUNCTION test_fail_first_insert() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    -- nextval is not rolled back with the failed transaction: only the first try fails.
    IF nextval('test_fault_seq') = 1 THEN
        RAISE EXCEPTION 'injected transient failure' USING ERRCODE = '40P01';
    END IF;
    RETURN NEW;
END;
$$;
CREATE TRIGGER test_fail_first_insert BEFORE INSERT ON llm_usage
    FOR EACH ROW EXECUTE FUNCTION test_fail_first_insert();
"""


async def test_flusher_survives_a_transient_postgres_error(
    pool: asyncpg.Pool, db: asyncpg.Connection, seed: Seed, make_ledger: Callable[..., UsageLedger]
) -> None:
    """A batch refused once with deadlock_detected (40P01) is retried; the flusher keeps running.

    Two ledgers writing overlapping charges in different orders really do deadlock (seen in
    about half of tries); the injected error stands in for that, deterministically.
    """
    org = await seed.org()
    await db.execute(FAIL_FIRST_INSERT_SQL)
    ledger = make_ledger()
    task = await run_in_background(ledger, pool)
    try:
        ledger.record(charge(org))
        await eventually(lambda: credits_used(db, org), COST, flusher=task)
    finally:
        await stop(task)


# Refuses one request id for its content (22023, invalid_parameter_value), as a CHECK or a
# type error would; with `hiccup_id`, that row's second insert attempt meets an outage
# (57P01, admin_shutdown) once.
REFUSE_ONE_ROW_SQL = """
CREATE SEQUENCE test_hiccup_seq;
CREATE FUNCTION test_refuse_one_row() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.request_id = '{refused_id}' THEN
        RAISE EXCEPTION 'injected refusal' USING ERRCODE = '22023';
    END IF;
    IF NEW.request_id = '{hiccup_id}' AND nextval('test_hiccup_seq') = 2 THEN
        RAISE EXCEPTION 'injected outage' USING ERRCODE = '57P01';
    END IF;
    RETURN NEW;
END;
$$;
CREATE TRIGGER test_refuse_one_row BEFORE INSERT ON llm_usage
    FOR EACH ROW EXECUTE FUNCTION test_refuse_one_row();
"""


async def rejected_ids(ledger: UsageLedger) -> list[str]:
    def read() -> list[str]:
        return sorted(
            json.loads(line)["request_id"]
            for path in ledger.spool.directory.glob("rejected-*.jsonl")
            for line in path.read_text().splitlines()
        )

    return await asyncio.to_thread(read)


async def assert_only_req_b_set_aside(
    ledger: UsageLedger, db: asyncpg.Connection, org: str, task: asyncio.Task[None], charged: int
) -> None:
    """Once the flusher is done: `charged` charges written once each, req_b set aside."""
    await all_written(ledger, org, task)
    assert len(ledger) == 0
    assert await usage_rows(db, org) == charged
    assert await credits_used(db, org) == charged * COST
    assert await rejected_ids(ledger) == ["req_b"]


async def test_a_refused_row_is_set_aside_and_the_rest_of_its_batch_charged(
    pool: asyncpg.Pool, db: asyncpg.Connection, seed: Seed, make_ledger: Callable[..., UsageLedger]
) -> None:
    """One row the database refuses for good goes to the rejected file; its batch is charged."""
    org = await seed.org()
    await db.execute(REFUSE_ONE_ROW_SQL.format(refused_id="req_b", hiccup_id=""))
    ledger = make_ledger()
    for request_id in ("req_a", "req_b", "req_c"):
        ledger.record(charge(org, request_id=request_id))
    task = await run_in_background(ledger, pool)
    try:
        await assert_only_req_b_set_aside(ledger, db, org, task, charged=2)
        # The flusher goes on with later charges.
        ledger.record(charge(org, request_id="req_d"))
        await eventually(lambda: usage_rows(db, org), 3, flusher=task)
    finally:
        await stop(task)


async def test_an_outage_while_setting_aside_loses_and_rejects_nothing_else(
    pool: asyncpg.Pool, db: asyncpg.Connection, seed: Seed, make_ledger: Callable[..., UsageLedger]
) -> None:
    """Row by row after a refusal, an outage puts the unwritten rest back in the queue: only
    the refused row is set aside, and every other charge is written once."""
    org = await seed.org()
    # req_a's first attempt is in the failed batch, its second (row by row) meets the outage.
    await db.execute(REFUSE_ONE_ROW_SQL.format(refused_id="req_b", hiccup_id="req_a"))
    ledger = make_ledger()
    for request_id in ("req_a", "req_b", "req_c", "req_d"):
        ledger.record(charge(org, request_id=request_id))
    task = await run_in_background(ledger, pool)
    try:
        await assert_only_req_b_set_aside(ledger, db, org, task, charged=3)
    finally:
        await stop(task)


# --- Spool --------------------------------------------------------------------------------


async def test_past_the_bound_charges_go_to_the_spool_file(
    seed: Seed, make_ledger: Callable[..., UsageLedger]
) -> None:
    """Past `max_pending`, the oldest charges are appended to the spool as JSON lines."""
    org = await seed.org()
    ledger = make_ledger(max_pending=4)
    gauge_before = pending_gauge()
    charges = [charge(org, cost=1 + i) for i in range(5)]
    for c in charges:
        ledger.record(c)
    try:
        await ledger.wait_spilled()
        assert len(ledger) <= 4
        files = await spool_files(ledger)
        assert files == [ledger.spool.path]
        # Readable from another file handle: flushed (and fsynced) once spilled.
        lines = (await asyncio.to_thread(files[0].read_text)).splitlines()
        spooled = [Charge.from_record(json.loads(line)) for line in lines]
        assert spooled == charges[: len(spooled)]
        assert len(spooled) + len(ledger) == 5
        assert all(json.loads(line)["request_id"] for line in lines)
        assert pending_gauge() == gauge_before + len(ledger)
    finally:
        await spilled_and_let_go(ledger)


async def test_spilled_charges_still_count_against_the_balance(
    seed: Seed, make_ledger: Callable[..., UsageLedger]
) -> None:
    """Charges in the spool are charged but not written: they still lower the cached balance."""
    org = await seed.org()
    ledger = make_ledger(max_pending=2)
    for _ in range(6):
        ledger.record(charge(org))
    try:
        # Being spooled: no longer queued, not on disk yet, still counted.
        assert ledger.unwritten_microdollars(org) == 6 * COST
        await ledger.wait_spilled()
        assert await spooled_charges(ledger.spool.path)
        assert ledger.unwritten_microdollars(org) == 6 * COST
    finally:
        await spilled_and_let_go(ledger)


async def test_new_ledger_replays_the_spool_once_and_deletes_it(
    pool: asyncpg.Pool, db: asyncpg.Connection, seed: Seed, make_ledger: Callable[..., UsageLedger]
) -> None:
    """A ledger started later writes a dead ledger's spool exactly once, then deletes the file."""
    org = await seed.org()
    crashed = make_ledger(max_pending=2)
    for _ in range(9):
        crashed.record(charge(org))
    await spilled_and_let_go(crashed)  # the process that wrote it is gone
    spooled = await spooled_charges(crashed.spool.path)
    assert spooled

    successor = make_ledger(batch_size=2)
    assert await successor.replay_spool(pool) == len(spooled)
    assert await spool_files(successor) == []
    assert await usage_rows(db, org) == len(spooled)
    assert await credits_used(db, org) == len(spooled) * COST
    assert await successor.replay_spool(pool) == 0
    assert await credits_used(db, org) == len(spooled) * COST


async def test_replaying_a_spool_again_charges_nothing_twice(
    pool: asyncpg.Pool, db: asyncpg.Connection, seed: Seed, make_ledger: Callable[..., UsageLedger]
) -> None:
    """A spool replayed, then found again (crash before its deletion), charges nothing more."""
    org = await seed.org()
    crashed = make_ledger(max_pending=2)
    for _ in range(5):
        crashed.record(charge(org))
    await spilled_and_let_go(crashed)
    path = crashed.spool.path
    assert path is not None
    content = await asyncio.to_thread(path.read_bytes)
    assert await make_ledger().replay_spool(pool) > 0
    used = await credits_used(db, org)
    await asyncio.to_thread(path.write_bytes, content)
    assert await make_ledger().replay_spool(pool) > 0
    assert await credits_used(db, org) == used
    assert await spool_files(crashed) == []


async def test_spool_of_a_live_ledger_is_not_replayed_by_another(
    pool: asyncpg.Pool, db: asyncpg.Connection, seed: Seed, make_ledger: Callable[..., UsageLedger]
) -> None:
    """A spool file still held by a live ledger (another process) is left alone."""
    org = await seed.org()
    alive = make_ledger(max_pending=2)
    for _ in range(4):
        alive.record(charge(org))
    await alive.wait_spilled()
    try:
        assert await make_ledger().replay_spool(pool) == 0
        assert alive.spool.path is not None
        assert await asyncio.to_thread(alive.spool.path.exists)
        assert await usage_rows(db, org) == 0
    finally:
        await spilled_and_let_go(alive)


async def test_torn_last_line_is_skipped(
    pool: asyncpg.Pool, db: asyncpg.Connection, seed: Seed, tmp_path: Path
) -> None:
    """A spool whose last line was cut by a crash mid-write replays its whole lines only."""
    org = await seed.org()
    whole = [charge(org, cost=100), charge(org, cost=20)]
    torn = json.dumps(charge(org, cost=3).record())
    spool_dir = tmp_path / "spool"
    path = spool_dir / "usage-1-1.jsonl"

    def write_torn() -> None:
        spool_dir.mkdir()
        lines = "".join(json.dumps(c.record()) + "\n" for c in whole)
        path.write_text(lines + torn[: len(torn) // 2])

    await asyncio.to_thread(write_torn)
    assert await spooled_charges(path) == whole
    ledger = UsageLedger(
        spool_dir=spool_dir, batch_size=10, flush_interval_seconds=0.01, max_pending=10
    )
    await ledger.replay_spool(pool)
    assert await credits_used(db, org) == 120
    assert await usage_rows(db, org) == 2
    assert not await asyncio.to_thread(path.exists)


async def test_run_writes_its_own_spool_once_the_database_answers(
    pool: asyncpg.Pool, db: asyncpg.Connection, seed: Seed, make_ledger: Callable[..., UsageLedger]
) -> None:
    """Charges this ledger spilled while the database was away are written when it is back."""
    org = await seed.org()
    ledger = make_ledger(max_pending=2)
    for _ in range(6):
        ledger.record(charge(org))
    await ledger.wait_spilled()
    assert await spool_files(ledger)
    task = await run_in_background(ledger, pool)
    try:
        await eventually(lambda: usage_rows(db, org), 6, flusher=task)
        assert await credits_used(db, org) == 6 * COST
    finally:
        await stop(task)
        await spilled_and_let_go(ledger)


async def test_charges_spilled_while_the_database_answers_are_written_without_a_failure(
    pool: asyncpg.Pool, db: asyncpg.Connection, seed: Seed, make_ledger: Callable[..., UsageLedger]
) -> None:
    """A burst past the bound while the flusher runs (no write failing, as when the pool
    waits out a short outage) spills to the spool, and the flusher writes the spool too."""
    org = await seed.org()
    # The flusher sleeps long enough after each write for the burst to reach the spill
    # first (with a short interval it may take the burst to the database itself).
    ledger = make_ledger(max_pending=2, flush_interval_seconds=0.5)
    task = await run_in_background(ledger, pool)
    try:
        # Once a first charge is written, the flusher's replay at start is behind it.
        ledger.record(charge(org))
        await eventually(lambda: usage_rows(db, org), 1, flusher=task)
        for _ in range(6):
            ledger.record(charge(org))
        await ledger.wait_spilled()
        assert await spooled_charges(ledger.spool.path)
        await eventually(lambda: usage_rows(db, org), 7, flusher=task)
        assert await credits_used(db, org) == 7 * COST
        await eventually(lambda: spool_files(ledger), [], flusher=task)
        await all_written(ledger, org, task)
    finally:
        await stop(task)
        await spilled_and_let_go(ledger)


async def test_a_spool_with_a_refused_row_is_replayed_without_it(
    pool: asyncpg.Pool, db: asyncpg.Connection, seed: Seed, make_ledger: Callable[..., UsageLedger]
) -> None:
    """A refused row in a spool file is set aside; the file's other charges are written and
    the file deleted, instead of the replay failing at every start."""
    org = await seed.org()
    await db.execute(REFUSE_ONE_ROW_SQL.format(refused_id="req_b", hiccup_id=""))
    crashed = make_ledger(max_pending=0)
    for request_id in ("req_a", "req_b", "req_c"):
        crashed.record(charge(org, request_id=request_id))
    await spilled_and_let_go(crashed)
    successor = make_ledger()
    assert await successor.replay_spool(pool) == 3
    assert await credits_used(db, org) == 2 * COST
    assert await rejected_ids(successor) == ["req_b"]
    assert await spool_files(successor) == []


def usage_counters() -> tuple[float, float, float]:
    """gateway_usage_spooled_total, _replayed_total and _rejected_total, process-wide."""
    spooled, replayed, rejected = (
        REGISTRY.get_sample_value(f"gateway_usage_{name}_total") or 0.0
        for name in ("spooled", "replayed", "rejected")
    )
    return spooled, replayed, rejected


async def test_spooled_replayed_and_rejected_charges_are_counted(
    pool: asyncpg.Pool, db: asyncpg.Connection, seed: Seed, make_ledger: Callable[..., UsageLedger]
) -> None:
    """Each charge appended to the spool counts in gateway_usage_spooled_total, each one
    read back in gateway_usage_replayed_total, and a refused row in _rejected_total."""
    org = await seed.org()
    await db.execute(REFUSE_ONE_ROW_SQL.format(refused_id="req_b", hiccup_id=""))
    spooled, replayed, rejected = usage_counters()
    crashed = make_ledger(max_pending=0)
    for request_id in ("req_a", "req_b", "req_c"):
        crashed.record(charge(org, request_id=request_id))
    await spilled_and_let_go(crashed)
    written = await spooled_charges(crashed.spool.path)
    assert usage_counters() == (spooled + len(written), replayed, rejected)
    assert await make_ledger().replay_spool(pool) == len(written)
    assert usage_counters() == (spooled + len(written), replayed + len(written), rejected + 1)


async def test_close_writes_everything_pending(
    pool: asyncpg.Pool, db: asyncpg.Connection, seed: Seed, make_ledger: Callable[..., UsageLedger]
) -> None:
    """Closing with the database up writes every pending charge and leaves no spool."""
    org = await seed.org()
    ledger = make_ledger(batch_size=3)
    gauge_before = pending_gauge()
    for _ in range(10):
        ledger.record(charge(org))
    await ledger.close(pool, timeout_seconds=5)
    assert await credits_used(db, org) == 10 * COST
    assert await spool_files(ledger) == []
    assert pending_gauge() == gauge_before


async def test_close_with_the_database_down_spools_everything_for_the_next_start(
    pool: asyncpg.Pool,
    dead_pool: asyncpg.Pool,
    db: asyncpg.Connection,
    seed: Seed,
    make_ledger: Callable[..., UsageLedger],
) -> None:
    """Closing while the database is down spools every pending charge; the next start writes it."""
    org = await seed.org()
    ledger = make_ledger()
    gauge_before = pending_gauge()
    for _ in range(7):
        ledger.record(charge(org))
    await ledger.close(dead_pool, timeout_seconds=2)
    assert len(await spooled_charges(ledger.spool.path)) == 7
    assert pending_gauge() == gauge_before
    assert await make_ledger().replay_spool(pool) == 7
    assert await credits_used(db, org) == 7 * COST


# --- Off the event loop -------------------------------------------------------------------


async def all_spooled(ledger: UsageLedger) -> list[Charge]:
    """Every charge in the ledger's spool files, oldest file first."""
    return [c for path in await spool_files(ledger) for c in await spooled_charges(path)]


async def test_blockbuster_fails_blocking_calls_on_the_loop(
    blockbuster: BlockBuster, seed: Seed, make_ledger: Callable[..., UsageLedger]
) -> None:
    """The fixture is on, catches a sleep and the spool's old synchronous spill made on the
    loop, lets the spool thread block, and allows nothing in the gateway's own code."""
    with pytest.raises(BlockingError):
        time.sleep(0.01)  # noqa: ASYNC251 (the blocking call blockbuster must catch)
    ledger = make_ledger()
    record = charge(await seed.org()).record()
    # The very call record() used to make when the queue passed the bound.
    with pytest.raises(BlockingError):
        ledger.spool.append([record])
    # In a thread (no running loop there) the same call is what the ledger does.
    path = await asyncio.to_thread(ledger.spool.append, [record])
    assert await spooled_charges(path) == [Charge.from_record(record)]
    await asyncio.to_thread(ledger.spool.rotate)
    allowed = [
        filename
        for function in blockbuster.functions.values()
        for filename, _names in function.can_block_functions
    ]
    assert not [name for name in allowed if "gateway/" in name], allowed


async def test_an_outage_past_the_bound_spools_off_the_loop_and_replays_once(
    pool: asyncpg.Pool,
    dead_pool: asyncpg.Pool,
    db: asyncpg.Connection,
    seed: Seed,
    make_ledger: Callable[..., UsageLedger],
) -> None:
    """With the database down and the queue far past its bound, `record` returns without
    touching the disk (blockbuster would fail it otherwise), the spill goes to the spool
    file in the background, nothing stops counting against the balance, and once the
    database is back every charge is written exactly once."""
    org = await seed.org()
    ledger = make_ledger(batch_size=50, max_pending=100)
    charges = [charge(org, cost=1 + i) for i in range(1_000)]
    total = sum(c.cost_microdollars for c in charges)
    writer = await run_in_background(ledger, dead_pool)
    try:
        for c in charges[:300]:
            ledger.record(c)
        # Past the bound with no spill yet: it waits for the loop, never for the disk.
        assert len(ledger) == 300
        for start in range(300, len(charges), 50):
            for c in charges[start : start + 50]:
                ledger.record(c)
            await asyncio.sleep(0)  # other requests, the writer and the spill go on
        assert ledger.unwritten_microdollars(org) == total
        await ledger.wait_spilled()
        assert len(ledger) <= 100
        assert ledger.unwritten_microdollars(org) == total
    finally:
        await stop(writer)
    spooled = await all_spooled(ledger)
    assert len(spooled) + len(ledger) == len(charges)
    assert len({c.request_id for c in spooled}) == len(spooled)
    assert set(spooled) <= set(charges)
    assert await usage_rows(db, org) == 0

    writer = await run_in_background(ledger, pool)
    try:
        await all_written(ledger, org, writer)
        await eventually(lambda: spool_files(ledger), [], flusher=writer)
    finally:
        await stop(writer)
    assert len(ledger) == 0
    assert await usage_rows(db, org) == len(charges)
    assert await credits_used(db, org) == total


async def test_a_spool_that_cannot_be_written_keeps_the_charges_queued(
    pool: asyncpg.Pool,
    db: asyncpg.Connection,
    seed: Seed,
    make_ledger: Callable[..., UsageLedger],
    log_stream: Any,
    tmp_path: Path,
) -> None:
    """A failed spill (here the spool directory is a file) drops nothing: the charges go
    back to the queue, still counted, and are written once the database takes them."""
    org = await seed.org()
    not_a_directory = tmp_path / "spool-file"
    await asyncio.to_thread(not_a_directory.write_text, "")
    ledger = make_ledger(spool_dir=not_a_directory, max_pending=2)
    for _ in range(6):
        ledger.record(charge(org))
    await eventually(
        lambda: asyncio.sleep(0, result="usage_spool_failed" in log_stream.getvalue()), True
    )
    assert len(ledger) == 6
    assert ledger.unwritten_microdollars(org) == 6 * COST
    writer = await run_in_background(ledger, pool)
    try:
        await all_written(ledger, org, writer)
    finally:
        await stop(writer)
    await ledger.wait_spilled()
    assert await usage_rows(db, org) == 6
    assert await credits_used(db, org) == 6 * COST


async def test_close_during_a_slow_spill_spools_every_charge_once(
    pool: asyncpg.Pool,
    dead_pool: asyncpg.Pool,
    db: asyncpg.Connection,
    seed: Seed,
    make_ledger: Callable[..., UsageLedger],
) -> None:
    """Shutting down while the spool thread is in the middle of a slow append (its task
    cancelled under it) loses nothing and spools nothing twice."""
    org = await seed.org()
    ledger = make_ledger(max_pending=10)
    append = ledger.spool.append
    appending = asyncio.Event()
    loop = asyncio.get_running_loop()

    def slow_append(records: Any) -> Path:
        loop.call_soon_threadsafe(appending.set)
        time.sleep(0.2)  # a slow disk (in the spool thread: no loop to block there)
        return append(records)

    ledger.spool.append = slow_append  # type: ignore[method-assign]
    charges = [charge(org) for _ in range(25)]
    for c in charges:
        ledger.record(c)
    await asyncio.wait_for(appending.wait(), DEADLINE_SECONDS)
    await ledger.close(dead_pool, timeout_seconds=0.1)
    assert len(ledger) == 0
    spooled = await all_spooled(ledger)
    assert sorted(c.request_id for c in spooled) == sorted(c.request_id for c in charges)
    assert ledger.unwritten_microdollars(org) == 25 * COST

    # The same ledger replays its own spool: counted once, then written once.
    assert await ledger.replay_spool(pool) == 25
    assert ledger.unwritten_microdollars(org) == 0
    assert await credits_used(db, org) == 25 * COST
