"""No completed request lost or charged twice, with real processes failing for real.

PostgreSQL here is a server of the module's own (see `tests/processes.py`) that tests
crash with `pg_ctl stop -m immediate` and start again; gateways are `python -m gateway
serve` subprocesses that tests SIGTERM and SIGKILL. The fake OpenRouter runs in the
test's own event loop. Each test gets a freshly migrated database on that server.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest
from prometheus_client.parser import text_string_to_metric_families

from bench.fake_upstream import RunningUpstream
from gateway.ledger.writer import read_spool
from gateway.platform.migrations import migrate
from tests.factories import Seed
from tests.processes import GatewayProcess, PostgresCluster

pytestmark = pytest.mark.timeout(120)

COST = 420  # the fake upstream's default cost_usd, 0.00042, in microdollars
CHAT_PATH = "api/openrouter/chat/completions"
# Room for the flusher's backoff (at most a few seconds after these short outages).
DEADLINE_SECONDS = 6.0
EXIT_DEADLINE_SECONDS = 15.0
POLL_SECONDS = 0.02
CACHE_FOR_AN_HOUR = {"ENTITLEMENT_CACHE_TTL_SECONDS": 3600, "NEGATIVE_CACHE_TTL_SECONDS": 3600}


@dataclass(frozen=True)
class Outcome:
    """How one request through the gateway ended, as its client saw it."""

    status: int
    request_id: str | None
    body: bytes

    @property
    def completed(self) -> bool:
        """Served in full: a 200 whose stream (if it was one) reached `data: [DONE]`."""
        if self.status != 200:
            return False
        return not self.body.startswith(b"data:") or self.body.endswith(b"data: [DONE]\n\n")


@dataclass
class Scene:
    """The test's database on the crashable server, an org member, and helpers."""

    cluster: PostgresCluster
    url: str
    org_id: str
    token: str
    spool_dir: Path
    log_dir: Path
    upstream: RunningUpstream
    client: aiohttp.ClientSession
    gateways: list[GatewayProcess]

    async def gateway(self, **settings: Any) -> GatewayProcess:
        """Start a gateway on this database and wait until it is ready."""
        values: dict[str, Any] = {
            "USAGE_SPOOL_DIR": self.spool_dir,
            "USAGE_FLUSH_INTERVAL_SECONDS": 0.1,
            "SHUTDOWN_TIMEOUT_SECONDS": 10,
            **CACHE_FOR_AN_HOUR,
        }
        values.update(settings)
        process = await GatewayProcess.start(
            database_url=self.url, upstream_url=self.upstream.url, log_dir=self.log_dir, **values
        )
        self.gateways.append(process)
        await process.wait_ready(self.client)
        return process

    async def request(self, gateway: GatewayProcess, *, stream: bool = False) -> Outcome:
        """One chat completion through `gateway`, read to the end."""
        body = {"model": "openai/gpt-4o-mini", "stream": stream, "messages": []}
        try:
            async with self.client.post(
                gateway.url / CHAT_PATH,
                json=body,
                headers={"Authorization": f"Bearer {self.token}"},
            ) as response:
                return Outcome(
                    response.status, response.headers.get("X-Request-Id"), await response.read()
                )
        except aiohttp.ClientError as exc:
            return Outcome(0, None, repr(exc).encode())

    async def listening(self, gateway: GatewayProcess) -> bool:
        """Whether the gateway's change listener is connected (as a long-running one is)."""
        async with self.client.get(gateway.url / "readyz") as response:
            body = await response.json()
        return response.status == 200 and body.get("change_notifications") is True

    async def metric(self, gateway: GatewayProcess, name: str) -> float | None:
        """An unlabelled sample from the gateway's /metrics."""
        async with self.client.get(gateway.url / "metrics") as response:
            text = await response.text()
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == name and not sample.labels:
                    return float(sample.value)
        return None

    async def fetch(self, sql: str, *args: Any) -> list[asyncpg.Record]:
        """Rows from the database, on a connection of its own (the server may have crashed)."""
        conn = await asyncpg.connect(self.url)
        try:
            return await conn.fetch(sql, *args)
        finally:
            await conn.close()

    async def charged(self) -> tuple[int, int, int]:
        """(llm_usage rows, their total cost, credits_used) of the org."""
        [row] = await self.fetch(
            """SELECT (SELECT count(*) FROM llm_usage WHERE organization_id = o.id),
                      (SELECT coalesce(sum(cost_microdollars), 0)::bigint FROM llm_usage
                        WHERE organization_id = o.id),
                      o.credits_used_microdollars
               FROM organizations o WHERE o.id = $1::uuid""",
            self.org_id,
        )
        return row[0], row[1], row[2]

    async def charged_request_ids(self) -> list[str]:
        """The request ids of the org's llm_usage rows, sorted."""
        rows = await self.fetch(
            "SELECT request_id FROM llm_usage WHERE organization_id = $1::uuid ORDER BY 1",
            self.org_id,
        )
        return [r[0] for r in rows]

    def spooled_request_ids(self) -> list[str]:
        """Every charge waiting in spool files, by request id."""
        return sorted(
            c.request_id for path in self.spool_dir.glob("usage-*.jsonl") for c in read_spool(path)
        )


@pytest.fixture(scope="module")
def cluster() -> Iterator[PostgresCluster]:
    """A PostgreSQL server for this module alone, on a loopback TCP port."""
    server = PostgresCluster.create()
    try:
        server.start_blocking()
        yield server
    finally:
        server.destroy()


@pytest.fixture
async def scene(
    cluster: PostgresCluster, upstream: RunningUpstream, tmp_path: Path
) -> AsyncIterator[Scene]:
    """A new migrated database with an org and its owner; gateways are killed afterwards."""
    if not cluster.is_running():
        await cluster.start()
    name = f"gw_durable_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(cluster.url())
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    url = cluster.url(name)
    conn = await asyncpg.connect(url)
    try:
        await migrate(conn)
        seed = Seed(conn)
        org_id = await seed.org()
        _user_id, token = await seed.member_with_key(org_id)
    finally:
        await conn.close()
    gateways: list[GatewayProcess] = []
    async with aiohttp.ClientSession() as client:
        yield Scene(
            cluster,
            url,
            org_id,
            token,
            tmp_path / "spool",
            tmp_path,
            upstream,
            client,
            gateways,
        )
        for gateway in gateways:
            await gateway.stop()
    if not cluster.is_running():
        await cluster.start()
    admin = await asyncpg.connect(cluster.url())
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


async def eventually(
    probe: Callable[[], Awaitable[Any]], expected: Any, within_seconds: float = DEADLINE_SECONDS
) -> None:
    """Poll `probe` until it returns `expected`, or fail at the deadline."""
    deadline = time.monotonic() + within_seconds
    got: Any = "nothing (the database did not answer)"
    while True:
        with contextlib.suppress(OSError, asyncpg.PostgresError):
            got = await probe()
            if got == expected:
                return
        assert time.monotonic() < deadline, f"still {got!r}, expected {expected!r}"
        await asyncio.sleep(POLL_SECONDS)


async def long_streams(
    scene: Scene, gateway: GatewayProcess, count: int
) -> list[asyncio.Task[Outcome]]:
    """Start `count` streams and return once the upstream is serving all of them."""
    before = scene.upstream.recorder.in_flight
    tasks = [asyncio.create_task(scene.request(gateway, stream=True)) for _ in range(count)]
    await scene.upstream.recorder.wait_for(
        lambda r: r.in_flight >= before + count, timeout=DEADLINE_SECONDS
    )
    return tasks


def slow_streams(scene: Scene, chunks: int = 20, interval_seconds: float = 0.05) -> None:
    scene.upstream.settings.chunk_count = chunks
    scene.upstream.settings.chunk_interval_seconds = interval_seconds


# --- (a) The database goes away -----------------------------------------------------------


@pytest.mark.parametrize("moment", ["after-the-listener-noticed", "just-after-a-flush"])
async def test_cached_requests_keep_succeeding_while_the_database_is_down(
    scene: Scene, moment: str
) -> None:
    """With key, role and facts cached for an hour, requests go on while the database is down.

    Two moments of an outage: once the LISTEN connection has noticed it (a second or so in),
    and right after the org's last charges were written (as for any org that is spending).
    """
    flush_interval = 60 if moment == "after-the-listener-noticed" else 0.1
    gateway = await scene.gateway(USAGE_FLUSH_INTERVAL_SECONDS=flush_interval)
    await eventually(lambda: scene.listening(gateway), True)
    for _ in range(3):
        assert (await scene.request(gateway)).status == 200
    if moment == "just-after-a-flush":
        await eventually(lambda: scene.metric(gateway, "gateway_usage_pending"), 0.0)
    await scene.cluster.crash()
    try:
        if moment == "after-the-listener-noticed":
            await eventually(
                lambda: asyncio.sleep(0, result="listen_connection_lost" in gateway.log()), True
            )
        during = [await scene.request(gateway) for _ in range(5)]
    finally:
        await scene.cluster.start()
    served = sum(o.completed for o in during)
    gateway.send(signal.SIGTERM)
    assert await gateway.wait(EXIT_DEADLINE_SECONDS) == 0
    n = 3 + served
    assert await scene.charged() == (n, n * COST, n * COST)
    assert [o.status for o in during] == [200] * 5, [o.body[:120] for o in during]


async def test_every_request_completed_around_an_outage_is_charged_exactly_once(
    scene: Scene,
) -> None:
    """Requests before, across and after a database crash are each charged exactly once."""
    gateway = await scene.gateway()
    before = [await scene.request(gateway) for _ in range(5)]
    slow_streams(scene)
    spanning = await long_streams(scene, gateway, 6)
    await scene.cluster.crash()
    try:
        # Whatever the gateway answers these (served or 503), each is charged at most once.
        during = [await scene.request(gateway) for _ in range(3)]
        across = await asyncio.gather(*spanning)
    finally:
        await scene.cluster.start()
    scene.upstream.settings.chunk_interval_seconds = 0
    after = [await scene.request(gateway, stream=i % 2 == 0) for i in range(5)]

    assert all(o.completed for o in before + across + after)
    outcomes = before + during + across + after
    completed = sorted(o.request_id for o in outcomes if o.completed and o.request_id)
    n = len(completed)
    await eventually(scene.charged, (n, n * COST, n * COST))
    assert await scene.charged_request_ids() == completed
    gateway.send(signal.SIGTERM)
    assert await gateway.wait(EXIT_DEADLINE_SECONDS) == 0
    assert await scene.charged() == (n, n * COST, n * COST)


async def test_charges_spilled_during_an_outage_are_written_once_it_ends(scene: Scene) -> None:
    """Past USAGE_MAX_PENDING charges go to the spool, and all are written once the db is back."""
    gateway = await scene.gateway(USAGE_MAX_PENDING=4)
    slow_streams(scene)
    streams = await long_streams(scene, gateway, 10)
    await scene.cluster.crash()
    try:
        outcomes = await asyncio.gather(*streams)
        assert all(o.completed for o in outcomes), [o.status for o in outcomes]
        # The spill runs in the gateway's spool thread, a moment after the charges queue.
        await eventually(lambda: asyncio.sleep(0, result=bool(scene.spooled_request_ids())), True)
    finally:
        await scene.cluster.start()
    completed = sorted(o.request_id for o in outcomes if o.request_id)
    try:
        await eventually(scene.charged, (10, 10 * COST, 10 * COST))
    except AssertionError as exc:
        left = len(scene.spooled_request_ids())
        raise AssertionError(
            f"{exc}; {left} charges only in the live gateway's spool; {gateway.describe()}"
        ) from None
    assert await scene.charged_request_ids() == completed


# --- (c) SIGTERM under load ---------------------------------------------------------------


async def test_sigterm_drains_streams_and_writes_every_charge_before_exit(scene: Scene) -> None:
    """SIGTERM with 20 streams in flight: all finish with [DONE], exit 0, all charged once."""
    # Nothing is flushed in the background: only the shutdown can write these charges.
    gateway = await scene.gateway(USAGE_FLUSH_INTERVAL_SECONDS=60)
    slow_streams(scene, chunks=20, interval_seconds=0.05)
    streams = await long_streams(scene, gateway, 20)
    gateway.send(signal.SIGTERM)
    outcomes = await asyncio.gather(*streams)
    assert [o.status for o in outcomes] == [200] * 20
    assert all(o.body.endswith(b"data: [DONE]\n\n") for o in outcomes)
    assert await gateway.wait(EXIT_DEADLINE_SECONDS) == 0, gateway.log()[-3000:]
    # Written before the process exited: no waiting here.
    assert await scene.charged() == (20, 20 * COST, 20 * COST)
    assert await scene.charged_request_ids() == sorted(o.request_id for o in outcomes)
    assert scene.spooled_request_ids() == []


# --- (d) The gateway is killed with charges in its spool ----------------------------------


async def test_spool_of_a_killed_gateway_is_replayed_at_the_next_start(scene: Scene) -> None:
    """SIGKILL with charges in the spool: the next gateway writes each of them exactly once."""
    killed = await scene.gateway(USAGE_MAX_PENDING=2)
    slow_streams(scene)
    streams = await long_streams(scene, killed, 10)
    await scene.cluster.crash()
    try:
        outcomes = await asyncio.gather(*streams)
        assert all(o.completed for o in outcomes)

        async def settled() -> bool:
            """The spill (in the gateway's spool thread, a moment after the charges queue)
            is over: every charge is on disk or queued, no more than the bound queued."""
            pending = await scene.metric(killed, "gateway_usage_pending")
            spooled = len(scene.spooled_request_ids())
            return pending is not None and pending <= 2 and spooled + pending == 10

        await eventually(settled, True)
        spooled = scene.spooled_request_ids()
        assert len(spooled) >= 5, spooled
        killed.send(signal.SIGKILL)
        assert await killed.wait(EXIT_DEADLINE_SECONDS) == -signal.SIGKILL
    finally:
        await scene.cluster.start()
    assert set(spooled) <= {o.request_id for o in outcomes}
    assert len(set(spooled)) == len(spooled)
    successor = await scene.gateway()
    k = len(spooled)
    await eventually(scene.charged, (k, k * COST, k * COST))
    assert await scene.charged_request_ids() == spooled
    await eventually(lambda: asyncio.sleep(0, result=scene.spooled_request_ids()), [])
    # Served after the replay, and still nothing counted twice at the successor's exit.
    assert (await scene.request(successor)).status == 200
    successor.send(signal.SIGTERM)
    assert await successor.wait(EXIT_DEADLINE_SECONDS) == 0
    assert await scene.charged() == (k + 1, (k + 1) * COST, (k + 1) * COST)


# --- (e) Two processes, one organization --------------------------------------------------


async def test_two_gateway_processes_charging_one_org_sum_exactly(scene: Scene) -> None:
    """100 requests spread over two processes charge the org exactly 100 x the cost."""
    gateways = [await scene.gateway(), await scene.gateway()]
    limit = asyncio.Semaphore(20)

    async def one(i: int) -> Outcome:
        async with limit:
            return await scene.request(gateways[i % 2], stream=i % 3 == 0)

    outcomes = await asyncio.gather(*(one(i) for i in range(100)))
    assert all(o.completed for o in outcomes), [o.status for o in outcomes]
    await eventually(scene.charged, (100, 100 * COST, 100 * COST))
    assert await scene.charged_request_ids() == sorted(o.request_id for o in outcomes)
    for gateway in gateways:
        gateway.send(signal.SIGTERM)
    for gateway in gateways:
        assert await gateway.wait(EXIT_DEADLINE_SECONDS) == 0
    assert await scene.charged() == (100, 100 * COST, 100 * COST)
