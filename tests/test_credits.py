"""Credits end to end: a real gateway meters, charges and refuses on a real PostgreSQL.

Grouped by behaviour: exact charges, how requests that end badly are recorded, the 402 at
zero balance and the free-model exemption, the process-local balance, NOTIFY, locked
credits, the ledger trigger, the metrics, and charges the ledger must not choke on.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest
from multidict import CIMultiDictProxy
from prometheus_client.parser import text_string_to_metric_families

from bench.fake_upstream import MID_STREAM_ERROR_MODEL, RunningUpstream
from gateway import config as gateway_config
from gateway.config import ConfigError
from gateway.ledger.writer import LEDGER
from tests.conftest import RunningGateway
from tests.factories import Seed

CHAT_PATH = "/api/openrouter/chat/completions"
PAID_MODEL = "openai/gpt-4o-mini"
FREE_MODEL = "meta-llama/llama-3.3-70b-instruct:free"
COST = 420  # the fake upstream's default cost_usd, 0.00042, in microdollars
APP_URL = "https://app.example.test"
DEADLINE_SECONDS = 5.0
NOTIFY_DEADLINE_SECONDS = 1.0
# With USAGE_FLUSH_INTERVAL_SECONDS=0.01 a charge is written within milliseconds.
FLUSHED_SOON_SECONDS = 2.0
POLL_SECONDS = 0.01
EXPIRED = timedelta(days=31)
CACHE_FOR_AN_HOUR = {"ENTITLEMENT_CACHE_TTL_SECONDS": 3600, "NEGATIVE_CACHE_TTL_SECONDS": 3600}
NEVER_FLUSH = {"USAGE_FLUSH_INTERVAL_SECONDS": 60}
PAYMENT_ERROR_KEYS = {"code", "message", "title", "balance", "buyCreditsUrl", "metadata"}

Start = Callable[..., Awaitable[RunningGateway]]


@dataclass(frozen=True)
class Member:
    org_id: str
    user_id: str
    token: str


@dataclass(frozen=True)
class Reply:
    status: int
    headers: CIMultiDictProxy[str]
    body: bytes

    @property
    def request_id(self) -> str:
        return self.headers["X-Request-Id"]

    def json(self) -> Any:
        return json.loads(self.body)


@pytest.fixture
def start(gateway_factory: Start, tmp_path: Path) -> Start:
    """Start gateways whose spool is this test's own directory; keywords are settings."""

    async def start_gateway(**env: Any) -> RunningGateway:
        return await gateway_factory(USAGE_SPOOL_DIR=tmp_path / "spool", **env)

    return start_gateway


async def member(seed: Seed, role: str = "owner", **org: Any) -> Member:
    """A new organization (keywords as `Seed.org`) and a member of it with a token."""
    org_id = await seed.org(**org)
    user_id, token = await seed.member_with_key(org_id, role)
    return Member(org_id, user_id, token)


def chat_body(model: str = PAID_MODEL, stream: bool = False) -> dict[str, Any]:
    return {"model": model, "stream": stream, "messages": [{"role": "user", "content": "hi"}]}


async def post(
    client: aiohttp.ClientSession,
    gateway: RunningGateway,
    token: str,
    body: Any = None,
    path: str = CHAT_PATH,
) -> Reply:
    """POST to the gateway and read the whole response (raw bytes when `body` is bytes)."""
    body = chat_body() if body is None else body
    kwargs: dict[str, Any] = {"data": body} if isinstance(body, bytes) else {"json": body}
    async with client.post(
        str(gateway.url) + path,
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
        **kwargs,
    ) as response:
        return Reply(response.status, response.headers, await response.read())


async def status_of(client: aiohttp.ClientSession, gateway: RunningGateway, token: str) -> int:
    """The status of one paid chat completion."""
    return (await post(client, gateway, token)).status


async def eventually(
    probe: Callable[[], Awaitable[Any]], expected: Any, within_seconds: float = DEADLINE_SECONDS
) -> float:
    """Poll `probe` until it returns `expected`; return how long it took, or fail."""
    started = time.monotonic()
    while (got := await probe()) != expected:
        elapsed = time.monotonic() - started
        assert elapsed < within_seconds, f"still {got!r}, not {expected!r}, after {elapsed:.2f}s"
        await asyncio.sleep(POLL_SECONDS)
    return time.monotonic() - started


async def credits(db: asyncpg.Connection, org_id: str) -> tuple[int, int]:
    """(credits_acquired_microdollars, credits_used_microdollars) of the organization."""
    row = await db.fetchrow(
        """SELECT credits_acquired_microdollars, credits_used_microdollars
           FROM organizations WHERE id = $1::uuid""",
        org_id,
    )
    assert row is not None
    return row[0], row[1]


async def used(db: asyncpg.Connection, org_id: str) -> int:
    return (await credits(db, org_id))[1]


async def usage_row(
    db: asyncpg.Connection, request_id: str, within_seconds: float = DEADLINE_SECONDS
) -> asyncpg.Record:
    """The llm_usage row of the request, once the ledger has flushed it."""
    deadline = time.monotonic() + within_seconds
    while True:
        row = await db.fetchrow("SELECT * FROM llm_usage WHERE request_id = $1", request_id)
        if row is not None:
            return row
        assert time.monotonic() < deadline, f"no llm_usage row for {request_id}"
        await asyncio.sleep(POLL_SECONDS)


async def row_count(db: asyncpg.Connection, org_id: str) -> int:
    count: int = await db.fetchval(
        "SELECT count(*) FROM llm_usage WHERE organization_id = $1::uuid", org_id
    )
    return count


def assert_payment_required(reply: Reply, reason: str) -> dict[str, Any]:
    """The reply is the 402 envelope for `reason`, with what the payment dialog reads."""
    assert reply.status == 402, reply.body
    envelope = reply.json()
    assert envelope["error_type"] == reason
    error: dict[str, Any] = envelope["error"]
    assert set(error) == PAYMENT_ERROR_KEYS
    assert error["code"] == 402
    assert error["metadata"]["reason"] == reason
    assert isinstance(error["title"], str) and error["title"]
    assert isinstance(error["message"], str) and error["message"]
    assert (
        error["buyCreditsUrl"]
        == f"{APP_URL}/organizations/{error['metadata']['organization_id']}/billing"
    )
    return error


async def listening(client: aiohttp.ClientSession, gateway: RunningGateway) -> bool:
    """Whether the gateway's change listener is connected (so NOTIFY reaches it)."""
    async with client.get(gateway.url / "readyz") as response:
        body = await response.json()
    return response.status == 200 and body.get("change_notifications") is True


async def metric_values(client: aiohttp.ClientSession, gateway: RunningGateway) -> dict[str, float]:
    """Every sample the gateway's /metrics exports, by sample name (unlabelled ones)."""
    async with client.get(gateway.url / "metrics") as response:
        text = await response.text()
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if not sample.labels:
                values[sample.name] = sample.value
    return values


# --- Exact charges ------------------------------------------------------------------------


async def test_non_streamed_request_is_charged_exactly(
    start: Start, client: aiohttp.ClientSession, db: asyncpg.Connection, seed: Seed
) -> None:
    """A JSON completion costing $0.00042 is one llm_usage row of 420 µ$ and 420 µ$ used."""
    gateway = await start()
    who = await member(seed)
    acquired_before, used_before = await credits(db, who.org_id)
    reply = await post(client, gateway, who.token)
    assert reply.status == 200
    row = await usage_row(db, reply.request_id)
    assert dict(row) | {"created_at": None} == {
        "request_id": reply.request_id,
        "organization_id": row["organization_id"],
        "user_id": who.user_id,
        "model": PAID_MODEL,
        "prompt_tokens": 11,
        "completion_tokens": 7,
        "cost_microdollars": COST,
        "streamed": False,
        "status": 200,
        "cancelled": False,
        "created_at": None,
    }
    assert str(row["organization_id"]) == who.org_id
    await eventually(lambda: used(db, who.org_id), used_before + COST)
    assert await credits(db, who.org_id) == (acquired_before, used_before + COST)


async def test_streamed_request_is_charged_exactly(
    start: Start, client: aiohttp.ClientSession, db: asyncpg.Connection, seed: Seed
) -> None:
    """A streamed completion is charged the usage of its last chunk, recorded streamed=true."""
    gateway = await start()
    who = await member(seed)
    reply = await post(client, gateway, who.token, chat_body(stream=True))
    assert reply.status == 200
    assert reply.body.endswith(b"data: [DONE]\n\n")
    row = await usage_row(db, reply.request_id)
    assert (row["model"], row["prompt_tokens"], row["completion_tokens"]) == (PAID_MODEL, 11, 7)
    assert (row["cost_microdollars"], row["streamed"], row["status"]) == (COST, True, 200)
    assert row["cancelled"] is False
    await eventually(lambda: used(db, who.org_id), COST)


async def test_text_completions_are_metered_too(
    start: Start, client: aiohttp.ClientSession, db: asyncpg.Connection, seed: Seed
) -> None:
    """`completions` (text) is metered like chat, streamed or not."""
    gateway = await start()
    who = await member(seed)
    body = {"model": PAID_MODEL, "prompt": "hi"}
    plain = await post(client, gateway, who.token, body, path="/api/openrouter/completions")
    streamed = await post(
        client, gateway, who.token, {**body, "stream": True}, path="/api/openrouter/v1/completions"
    )
    assert (plain.status, streamed.status) == (200, 200)
    assert (await usage_row(db, plain.request_id))["streamed"] is False
    assert (await usage_row(db, streamed.request_id))["streamed"] is True
    await eventually(lambda: used(db, who.org_id), 2 * COST)


async def test_requests_that_are_not_completions_are_not_charged(
    start: Start, client: aiohttp.ClientSession, db: asyncpg.Connection, seed: Seed
) -> None:
    """Model lists and other endpoints pass through without an llm_usage row or a charge."""
    gateway = await start(USAGE_FLUSH_INTERVAL_SECONDS=0.01)
    who = await member(seed)
    headers = {"Authorization": f"Bearer {who.token}"}
    async with client.get(str(gateway.url) + "/api/openrouter/models", headers=headers) as r:
        assert r.status == 200
    other = await post(
        client, gateway, who.token, {"input": "x"}, path="/api/openrouter/embeddings"
    )
    assert other.status == 200
    # A completion afterwards is the marker: once it is written, the others would be too.
    marker = await post(client, gateway, who.token)
    await usage_row(db, marker.request_id)
    assert await row_count(db, who.org_id) == 1
    assert await used(db, who.org_id) == COST


async def test_metered_paths_choose_what_is_charged(
    start: Start, client: aiohttp.ClientSession, db: asyncpg.Connection, seed: Seed
) -> None:
    """METERED_PATHS=chat/completions: text completions pass through uncharged, chat is
    charged (the bench's gateway-unmetered sets it empty)."""
    gateway = await start(METERED_PATHS="chat/completions", USAGE_FLUSH_INTERVAL_SECONDS=0.01)
    who = await member(seed)
    text = await post(
        client,
        gateway,
        who.token,
        {"model": PAID_MODEL, "prompt": "hi"},
        path="/api/openrouter/completions",
    )
    assert text.status == 200
    marker = await post(client, gateway, who.token)  # once written, the other would be too
    await usage_row(db, marker.request_id)
    assert await row_count(db, who.org_id) == 1
    assert await used(db, who.org_id) == COST


def test_metered_paths_none_meters_nothing() -> None:
    config = gateway_config.from_env({"OPENROUTER_API_KEY": "k", "METERED_PATHS": "none"})
    assert config.metered_paths == ()


@pytest.mark.parametrize("value", ["embeddings", "chat/completions,models"])
def test_metered_paths_name_only_paths_that_report_usage(value: str) -> None:
    with pytest.raises(ConfigError, match="METERED_PATHS"):
        gateway_config.from_env({"OPENROUTER_API_KEY": "k", "METERED_PATHS": value})


# --- Requests that end badly --------------------------------------------------------------


async def test_upstream_error_status_is_recorded_at_no_cost(
    start: Start,
    upstream: RunningUpstream,
    client: aiohttp.ClientSession,
    db: asyncpg.Connection,
    seed: Seed,
) -> None:
    """An upstream 500 reaches the client and is recorded with status 500 and cost 0."""
    upstream.settings.fail_status = 500
    gateway = await start()
    who = await member(seed)
    reply = await post(client, gateway, who.token)
    assert reply.status == 500
    row = await usage_row(db, reply.request_id)
    assert (row["status"], row["cost_microdollars"], row["cancelled"]) == (500, 0, False)
    assert await used(db, who.org_id) == 0


async def test_unreachable_upstream_is_recorded_at_no_cost(
    start: Start, client: aiohttp.ClientSession, db: asyncpg.Connection, seed: Seed
) -> None:
    """When OpenRouter cannot be reached the client gets 502, recorded with status 502, cost 0."""
    gateway = await start(OPENROUTER_BASE_URL="http://127.0.0.1:1/api/v1")
    who = await member(seed)
    reply = await post(client, gateway, who.token)
    assert reply.status == 502
    row = await usage_row(db, reply.request_id)
    assert (row["status"], row["cost_microdollars"], row["model"]) == (502, 0, PAID_MODEL)


async def test_abandoned_stream_without_usage_is_recorded_cancelled_at_no_cost(
    start: Start,
    upstream: RunningUpstream,
    client: aiohttp.ClientSession,
    db: asyncpg.Connection,
    seed: Seed,
) -> None:
    """A client that reads one chunk and leaves: one row, cost 0, cancelled=true."""
    upstream.settings.chunk_count = 200
    upstream.settings.chunk_interval_seconds = 0.02
    upstream.settings.send_usage = False
    gateway = await start()
    who = await member(seed)
    response = await client.post(
        str(gateway.url) + CHAT_PATH,
        json=chat_body(stream=True),
        headers={"Authorization": f"Bearer {who.token}"},
    )
    request_id = response.headers["X-Request-Id"]
    while not (await response.content.readline()).startswith(b"data: {"):
        pass
    response.close()
    await upstream.recorder.wait_for(lambda r: r.cancelled == 1, timeout=DEADLINE_SECONDS)
    row = await usage_row(db, request_id)
    assert (row["cost_microdollars"], row["cancelled"], row["streamed"]) == (0, True, True)
    assert row["model"] == PAID_MODEL
    assert await used(db, who.org_id) == 0


async def test_client_leaving_before_the_upstream_answers_is_recorded_cancelled(
    start: Start,
    upstream: RunningUpstream,
    client: aiohttp.ClientSession,
    db: asyncpg.Connection,
    seed: Seed,
) -> None:
    """A client that gives up before the first byte: one row, status 499, cancelled, cost 0."""
    upstream.settings.delay_seconds = 5
    gateway = await start()
    who = await member(seed)

    async def give_up() -> None:
        async with client.post(
            str(gateway.url) + CHAT_PATH,
            json=chat_body(),
            headers={"Authorization": f"Bearer {who.token}"},
        ) as response:
            await response.read()

    with pytest.raises(TimeoutError):
        await asyncio.wait_for(give_up(), timeout=0.3)
    await upstream.recorder.wait_for(lambda r: r.cancelled == 1, timeout=DEADLINE_SECONDS)

    async def rows() -> list[tuple[int, int, bool]]:
        records = await db.fetch(
            """SELECT status, cost_microdollars, cancelled FROM llm_usage
               WHERE organization_id = $1::uuid""",
            who.org_id,
        )
        return [tuple(r) for r in records]

    await eventually(rows, [(499, 0, True)])


async def test_upstream_dying_mid_stream_is_recorded_at_no_cost(
    start: Start,
    upstream: RunningUpstream,
    client: aiohttp.ClientSession,
    db: asyncpg.Connection,
    seed: Seed,
) -> None:
    """A stream the upstream broke off (no usage sent) is recorded at cost 0, not cancelled."""
    upstream.settings.die_after_chunks = 1
    gateway = await start()
    who = await member(seed)
    async with client.post(
        str(gateway.url) + CHAT_PATH,
        json=chat_body(stream=True),
        headers={"Authorization": f"Bearer {who.token}"},
    ) as response:
        request_id = response.headers["X-Request-Id"]
        with pytest.raises(aiohttp.ClientPayloadError):
            await response.read()
    row = await usage_row(db, request_id)
    assert (row["cost_microdollars"], row["cancelled"], row["status"]) == (0, False, 200)


async def test_mid_stream_error_event_is_recorded_at_no_cost(
    start: Start, client: aiohttp.ClientSession, db: asyncpg.Connection, seed: Seed
) -> None:
    """A stream that ends with an in-band error event and no usage costs nothing."""
    gateway = await start()
    who = await member(seed)
    reply = await post(client, gateway, who.token, chat_body(MID_STREAM_ERROR_MODEL, stream=True))
    assert b'"error"' in reply.body
    row = await usage_row(db, reply.request_id)
    assert (row["cost_microdollars"], row["model"]) == (0, MID_STREAM_ERROR_MODEL)


# --- 402 at zero balance, and free models -------------------------------------------------


@pytest.mark.parametrize(
    ("acquired", "spent", "balance"),
    [(0, 0, 0.0), (1_000_000, 1_000_000, 0.0), (1_000_000, 3_500_000, -2.5)],
    ids=["never-bought", "spent-exactly", "overdrawn"],
)
async def test_paid_model_at_zero_balance_is_402_insufficient_credits(
    start: Start,
    upstream: RunningUpstream,
    client: aiohttp.ClientSession,
    db: asyncpg.Connection,
    seed: Seed,
    acquired: int,
    spent: int,
    balance: float,
) -> None:
    """Balance at or below zero: a paid model gets 402 insufficient_credits, never goes upstream."""
    gateway = await start()
    who = await member(
        seed, credits_acquired_microdollars=acquired, credits_used_microdollars=spent
    )
    received = upstream.recorder.received
    reply = await post(client, gateway, who.token, chat_body(stream=True))
    error = assert_payment_required(reply, "insufficient_credits")
    assert error["balance"] == balance
    assert error["title"] == "Your organization is out of credits"
    assert ":free" in error["message"]
    assert error["metadata"]["organization_id"] == who.org_id
    assert upstream.recorder.received == received
    assert await credits(db, who.org_id) == (acquired, spent)
    assert await row_count(db, who.org_id) == 0


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
async def test_free_model_at_zero_balance_passes_and_costs_nothing(
    start: Start, client: aiohttp.ClientSession, db: asyncpg.Connection, seed: Seed, stream: bool
) -> None:
    """A `:free` model is served at zero balance and recorded at cost 0 (the upstream said 420)."""
    gateway = await start()
    who = await member(seed, credits_acquired_microdollars=0)
    reply = await post(client, gateway, who.token, chat_body(FREE_MODEL, stream=stream))
    assert reply.status == 200
    row = await usage_row(db, reply.request_id)
    assert (row["model"], row["cost_microdollars"], row["prompt_tokens"]) == (FREE_MODEL, 0, 11)
    assert await credits(db, who.org_id) == (0, 0)


async def test_free_model_named_first_in_a_duplicate_key_is_still_charged(
    start: Start,
    upstream: RunningUpstream,
    client: aiohttp.ClientSession,
    db: asyncpg.Connection,
    seed: Seed,
) -> None:
    """`{"model":"x:free","model":"<paid>"}` runs the paid model upstream, so it is charged."""
    gateway = await start()
    who = await member(seed)
    body = (
        b'{"model":"' + FREE_MODEL.encode() + b'","messages":[{"role":"user","content":"hi"}],'
        b'"model":"' + PAID_MODEL.encode() + b'"}'
    )
    reply = await post(client, gateway, who.token, body)
    assert reply.status == 200
    assert upstream.recorder.last.json()["model"] == PAID_MODEL
    assert reply.json()["model"] == PAID_MODEL
    row = await usage_row(db, reply.request_id)
    assert row["cost_microdollars"] == COST


# --- The process-local balance ------------------------------------------------------------


async def test_fast_spender_is_stopped_by_its_own_process_before_any_flush(
    start: Start, client: aiohttp.ClientSession, db: asyncpg.Connection, seed: Seed
) -> None:
    """With facts cached for an hour and nothing flushed, credit for two requests buys two."""
    gateway = await start(**CACHE_FOR_AN_HOUR, **NEVER_FLUSH)
    who = await member(seed, credits_acquired_microdollars=2 * COST)
    first = await post(client, gateway, who.token)
    second = await post(client, gateway, who.token)
    assert (first.status, second.status) == (200, 200)
    third = await post(client, gateway, who.token)
    error = assert_payment_required(third, "insufficient_credits")
    assert error["balance"] == 0.0
    # The database has not been told yet: only this process's own tally stopped it.
    assert await credits(db, who.org_id) == (2 * COST, 0)
    assert gateway.app[LEDGER].unwritten_microdollars(who.org_id) == 2 * COST
    free = await post(client, gateway, who.token, chat_body(FREE_MODEL))
    assert free.status == 200


async def test_fast_spender_stops_after_the_balance_is_crossed(
    start: Start, client: aiohttp.ClientSession, seed: Seed
) -> None:
    """A balance not a multiple of the cost lets the request that crosses zero through, no more."""
    gateway = await start(**CACHE_FOR_AN_HOUR, **NEVER_FLUSH)
    who = await member(seed, credits_acquired_microdollars=1000)
    statuses = [(await post(client, gateway, who.token)).status for _ in range(4)]
    # 1000 → 580 → 160 → -260: three requests start with credit left, the fourth is refused.
    assert statuses == [200, 200, 200, 402]


# --- NOTIFY -------------------------------------------------------------------------------


async def test_bought_credits_reach_every_gateway_within_a_second(
    start: Start, client: aiohttp.ClientSession, seed: Seed
) -> None:
    """A new ledger row turns 402 into 200 on every process within 1 s, despite an hour's cache."""
    gateways = [await start(**CACHE_FOR_AN_HOUR), await start(**CACHE_FOR_AN_HOUR)]
    who = await member(seed, credits_acquired_microdollars=0)
    for gateway in gateways:
        await eventually(lambda g=gateway: listening(client, g), True)
        assert (await post(client, gateway, who.token)).status == 402
    await seed.credits(who.org_id, 1_000_000)
    for gateway in gateways:
        took = await eventually(
            lambda g=gateway: status_of(client, g, who.token),
            200,
            within_seconds=NOTIFY_DEADLINE_SECONDS,
        )
        assert took < NOTIFY_DEADLINE_SECONDS


# --- Locked credits -----------------------------------------------------------------------


async def test_locked_credits_are_shown_then_spendable_again_after_subscribing(
    start: Start,
    upstream: RunningUpstream,
    client: aiohttp.ClientSession,
    db: asyncpg.Connection,
    seed: Seed,
) -> None:
    """An expired org's $25 stay untouched behind a 402, then pay for requests once subscribed."""
    gateway = await start(**CACHE_FOR_AN_HOUR)
    who = await member(seed, age=EXPIRED, credits_acquired_microdollars=25_000_000)
    await eventually(lambda: listening(client, gateway), True)
    received = upstream.recorder.received
    for _ in range(3):
        error = assert_payment_required(await post(client, gateway, who.token), "trial_expired")
        assert error["balance"] == 25.0
        assert "$25.00" in error["message"]
    assert upstream.recorder.received == received
    assert await credits(db, who.org_id) == (25_000_000, 0)
    assert await row_count(db, who.org_id) == 0

    await seed.purchase(who.org_id)
    await eventually(
        lambda: status_of(client, gateway, who.token), 200, within_seconds=NOTIFY_DEADLINE_SECONDS
    )
    await eventually(lambda: used(db, who.org_id), COST)
    assert await credits(db, who.org_id) == (25_000_000, COST)


@pytest.mark.parametrize("state", ["subscription_inactive", "seats_exceeded"])
async def test_blocked_org_sees_its_locked_balance_and_is_not_charged(
    start: Start, client: aiohttp.ClientSession, db: asyncpg.Connection, seed: Seed, state: str
) -> None:
    """Whatever blocks the org, the 402 shows the balance and nothing is charged or recorded."""
    gateway = await start()
    who = await member(seed, age=EXPIRED, credits_acquired_microdollars=25_000_000)
    if state == "subscription_inactive":
        await seed.purchase(who.org_id, status="ended")
    else:
        await seed.purchase(who.org_id, seat_count=1)
        await seed.member_with_key(who.org_id, "member")
    error = assert_payment_required(await post(client, gateway, who.token), state)
    assert error["balance"] == 25.0
    assert await credits(db, who.org_id) == (25_000_000, 0)
    assert await row_count(db, who.org_id) == 0


# --- The credit ledger and its trigger ----------------------------------------------------


async def test_creating_an_organization_grants_nothing(db: asyncpg.Connection) -> None:
    """A plain INSERT INTO organizations starts at 0 acquired, 0 used, and no ledger rows."""
    org_id = await db.fetchval("INSERT INTO organizations (name) VALUES ('New') RETURNING id::text")
    assert await credits(db, org_id) == (0, 0)
    ledger_rows = await db.fetchval(
        "SELECT count(*) FROM credit_transactions WHERE organization_id = $1::uuid", org_id
    )
    assert ledger_rows == 0


async def test_acquired_credits_always_equal_the_ledger_sum(
    db: asyncpg.Connection, seed: Seed
) -> None:
    """Inserts, updates (amount and organization) and deletes keep acquired == sum(ledger)."""
    first = await seed.org(credits_acquired_microdollars=0)
    second = await seed.org(credits_acquired_microdollars=0)

    async def check() -> None:
        for org_id in (first, second):
            total = await db.fetchval(
                """SELECT coalesce(sum(amount_microdollars), 0) FROM credit_transactions
                   WHERE organization_id = $1::uuid""",
                org_id,
            )
            assert (await credits(db, org_id))[0] == total

    insert = """INSERT INTO credit_transactions (organization_id, amount_microdollars, is_free,
                    stripe_payment_id) VALUES ($1::uuid, $2, $3, $4) RETURNING id"""
    a = await db.fetchval(insert, first, 5_000_000, False, "pi_1")
    b = await db.fetchval(insert, first, 2_000_000, True, None)
    await db.fetchval(insert, second, 7, False, "pi_2")
    await check()
    assert (await credits(db, first))[0] == 7_000_000
    await db.execute("UPDATE credit_transactions SET amount_microdollars = 3 WHERE id = $1", a)
    await check()
    await db.execute(
        "UPDATE credit_transactions SET organization_id = $2::uuid WHERE id = $1", b, second
    )
    await check()
    assert (await credits(db, first), await credits(db, second)) == ((3, 0), (2_000_007, 0))
    await db.execute("DELETE FROM credit_transactions WHERE id = $1", a)
    await check()
    async with db.transaction():
        await db.fetchval(insert, first, -1, False, None)
        await db.fetchval(insert, first, 10, False, None)
    await check()
    assert (await credits(db, first))[0] == 9
    with pytest.raises(asyncpg.UniqueViolationError):
        await db.fetchval(insert, first, 100, False, "pi_2")
    await check()


# --- Metrics ------------------------------------------------------------------------------


async def test_usage_metrics_are_exported_and_move(
    start: Start, client: aiohttp.ClientSession, db: asyncpg.Connection, seed: Seed
) -> None:
    """Charged microdollars, pending charges and flush time show up and change with traffic."""
    gateway = await start(USAGE_BATCH_SIZE=2, **NEVER_FLUSH)
    who = await member(seed)
    before = await metric_values(client, gateway)
    for name in (
        "gateway_charged_microdollars_total",
        "gateway_usage_pending",
        "gateway_usage_flush_seconds_count",
    ):
        assert name in before, name
    assert (await post(client, gateway, who.token)).status == 200
    after_one = await metric_values(client, gateway)
    assert after_one["gateway_usage_pending"] == before["gateway_usage_pending"] + 1
    assert (
        after_one["gateway_charged_microdollars_total"]
        == (before["gateway_charged_microdollars_total"])
    )
    # The second charge fills the batch of two: it is written at once.
    assert (await post(client, gateway, who.token)).status == 200
    await eventually(lambda: used(db, who.org_id), 2 * COST)

    async def settled() -> bool:
        now = await metric_values(client, gateway)
        return (
            now["gateway_usage_pending"] == before["gateway_usage_pending"]
            and now["gateway_charged_microdollars_total"]
            == before["gateway_charged_microdollars_total"] + 2 * COST
            and now["gateway_usage_flush_seconds_count"]
            >= before["gateway_usage_flush_seconds_count"] + 1
        )

    await eventually(settled, True)


# --- Charges the ledger must not choke on -------------------------------------------------


async def test_a_model_id_with_a_nul_byte_does_not_stop_charging(
    start: Start, client: aiohttp.ClientSession, db: asyncpg.Connection, seed: Seed
) -> None:
    """A model id holding a NUL byte (PostgreSQL text rejects it) holds back no one's charges."""
    gateway = await start(USAGE_FLUSH_INTERVAL_SECONDS=0.01)
    hostile, other = await member(seed), await member(seed)
    refused = await post(client, gateway, hostile.token, b'{"model":"a\x00b","messages":[]}')
    assert refused.status == 400  # the upstream refuses the raw control character
    honest = await post(client, gateway, other.token)
    assert honest.status == 200
    await usage_row(db, honest.request_id, within_seconds=FLUSHED_SOON_SECONDS)
    assert await used(db, other.org_id) == COST


@pytest.mark.parametrize(
    ("setting", "value"),
    [("cost_usd", 1e300), ("prompt_tokens", 2**31)],
    ids=["cost-beyond-bigint", "tokens-beyond-integer"],
)
async def test_upstream_figures_out_of_range_do_not_stop_charging(
    start: Start,
    upstream: RunningUpstream,
    client: aiohttp.ClientSession,
    db: asyncpg.Connection,
    seed: Seed,
    setting: str,
    value: Any,
) -> None:
    """Usage figures too large for the ledger's columns never hold back other orgs' charges."""
    gateway = await start(USAGE_FLUSH_INTERVAL_SECONDS=0.01)
    odd_org, other = await member(seed), await member(seed)
    setattr(upstream.settings, setting, value)
    odd = await post(client, gateway, odd_org.token)
    assert odd.status == 200
    setattr(upstream.settings, setting, getattr(type(upstream.settings)(), setting))
    honest = await post(client, gateway, other.token)
    assert honest.status == 200
    row = await usage_row(db, honest.request_id, within_seconds=FLUSHED_SOON_SECONDS)
    assert row["cost_microdollars"] == COST
