"""Fixtures that compose: a PostgreSQL server, a fresh database per test, the fake
OpenRouter, a configuration, and a gateway serving on a real port.

The database is the embedded PostgreSQL from `pgserver`, or the server named by
`TEST_DATABASE_URL`. Each test gets its own database, cloned from a migrated template.
Under pytest-xdist every worker is its own session: it starts its own embedded server,
and on a shared `TEST_DATABASE_URL` builds its own template (named after the worker).
"""

from __future__ import annotations

import asyncio
import io
import os
import tempfile
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest
from aiohttp import web
from blockbuster import BlockBuster, BlockBusterFunction
from yarl import URL

from bench.fake_upstream import RunningUpstream, start_upstream
from gateway import config as gateway_config
from gateway.app import create_app
from gateway.platform.logs import setup_logging
from gateway.platform.migrations import migrate
from gateway.serve.runner import runner_for
from tests.factories import Seed
from tests.fake_stripe import (
    RunningFakeStripe,
    start_fake_stripe,
    start_fake_stripe_set_up,
    stripe_env,
)

# One per pytest-xdist worker (its id, "gw0", "gw1", ..., is unset when not distributed):
# workers sharing a TEST_DATABASE_URL server must not drop each other's template.
_XDIST_WORKER = os.environ.get("PYTEST_XDIST_WORKER")
TEMPLATE_DB = f"gateway_test_template_{_XDIST_WORKER}" if _XDIST_WORKER else "gateway_test_template"
UPSTREAM_TEST_KEY = "sk-or-v1-test-upstream-key-never-shown-0123456789"


def database_url(server_url: str, name: str) -> str:
    """The URL of database `name` on the server `server_url` points at."""
    url = URL(server_url)
    # with_path drops the query, which holds the socket directory for pgserver.
    return str(url.with_path("/" + name).with_query(url.query))


@pytest.fixture(scope="session")
def pg_server_url() -> Iterator[str]:
    """A running PostgreSQL server: TEST_DATABASE_URL's, or an embedded one for the session."""
    if os.environ.get("TEST_DATABASE_URL"):
        yield os.environ["TEST_DATABASE_URL"]
        return
    import pgserver

    data_dir = tempfile.mkdtemp(prefix="gw-pg-")
    server = pgserver.get_server(data_dir, cleanup_mode="delete")
    yield server.get_uri()
    server.cleanup()


@pytest.fixture(scope="session")
def template_database(pg_server_url: str) -> str:
    """A database with every migration applied, cloned by each test."""

    async def build() -> None:
        admin = await asyncpg.connect(pg_server_url)
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{TEMPLATE_DB}" WITH (FORCE)')
            await admin.execute(f'CREATE DATABASE "{TEMPLATE_DB}"')
        finally:
            await admin.close()
        conn = await asyncpg.connect(database_url(pg_server_url, TEMPLATE_DB))
        try:
            await migrate(conn)
        finally:
            await conn.close()

    asyncio.run(build())
    return TEMPLATE_DB


@pytest.fixture
async def empty_database_url(pg_server_url: str) -> AsyncIterator[str]:
    """A new database with no tables at all (for migration tests)."""
    async with _scratch_database(pg_server_url, template=None) as url:
        yield url


@pytest.fixture
async def db_url(pg_server_url: str, template_database: str) -> AsyncIterator[str]:
    """A new, fully migrated database for this test alone."""
    async with _scratch_database(pg_server_url, template=template_database) as url:
        yield url


class _scratch_database:
    """Create a uniquely named database on entry, drop it on exit."""

    def __init__(self, server_url: str, template: str | None) -> None:
        self._server_url = server_url
        self._template = template
        self._name = f"gw_test_{uuid.uuid4().hex[:12]}"

    async def __aenter__(self) -> str:
        template = f' TEMPLATE "{self._template}"' if self._template else ""
        await self._admin(f'CREATE DATABASE "{self._name}"{template}')
        return database_url(self._server_url, self._name)

    async def __aexit__(self, *_exc: object) -> None:
        await self._admin(f'DROP DATABASE IF EXISTS "{self._name}" WITH (FORCE)')

    async def _admin(self, sql: str) -> None:
        conn = await asyncpg.connect(self._server_url)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()


@pytest.fixture
async def db(db_url: str) -> AsyncIterator[asyncpg.Connection]:
    """A plain connection to this test's database, for arranging and inspecting rows."""
    conn = await asyncpg.connect(db_url)
    yield conn
    await conn.close()


@pytest.fixture
def seed(db: asyncpg.Connection) -> Seed:
    """Helpers that write users, organizations, keys and purchases."""
    return Seed(db)


@pytest.fixture
async def token(seed: Seed) -> str:
    """A token of the owner of a new, trialing organization."""
    org_id = await seed.org()
    _user_id, token = await seed.member_with_key(org_id)
    return token


@pytest.fixture
async def upstream() -> AsyncIterator[RunningUpstream]:
    """The fake OpenRouter, on a real port."""
    running = await start_upstream()
    yield running
    await running.close()


@pytest.fixture
def log_stream() -> io.StringIO:
    """Everything the gateway logs during the test, as JSON lines."""
    stream = io.StringIO()
    setup_logging("debug", stream)
    return stream


@pytest.fixture
def make_config(
    db_url: str, upstream: RunningUpstream, tmp_path: Path
) -> Callable[..., gateway_config.Config]:
    """Build a configuration for this test's database and upstream; keywords override env."""

    def make(**env: Any) -> gateway_config.Config:
        values = {
            "DATABASE_URL": db_url,
            "OPENROUTER_BASE_URL": upstream.url,
            "OPENROUTER_API_KEY": UPSTREAM_TEST_KEY,
            "APP_URL": "https://app.example.test",
            "GATEWAY_PORT": "0",
            "UPSTREAM_TIMEOUT_SECONDS": "5",
            # Never the working tree's .data/: a test must not replay real spooled charges.
            "USAGE_SPOOL_DIR": str(tmp_path / "usage-spool"),
        }
        values.update({k: str(v) for k, v in env.items()})
        return gateway_config.from_env(values)

    return make


class RunningGateway:
    """A gateway application served on a real loopback port."""

    def __init__(self, app: web.Application, runner: web.AppRunner, url: URL) -> None:
        self.app = app
        self.runner = runner
        self.url = url

    async def close(self) -> None:
        await self.runner.cleanup()


async def start_gateway(config: gateway_config.Config, **runner_kwargs: Any) -> RunningGateway:
    """Serve `create_app(config)` exactly as `serve` does, on an ephemeral port (keywords:
    the runner's settings, as `keepalive_timeout`)."""
    app = create_app(config)
    runner = runner_for(app, **{"shutdown_timeout": 1.0, **runner_kwargs})
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    return RunningGateway(app, runner, URL(f"http://127.0.0.1:{port}"))


@pytest.fixture
async def gateway_factory(
    make_config: Callable[..., gateway_config.Config], log_stream: io.StringIO
) -> AsyncIterator[Callable[..., Any]]:
    """Start gateways with configuration overrides; all are stopped after the test."""
    started: list[RunningGateway] = []

    async def start(**env: Any) -> RunningGateway:
        gateway = await start_gateway(make_config(**env))
        started.append(gateway)
        return gateway

    yield start
    for gateway in reversed(started):
        await gateway.close()


@pytest.fixture
async def gateway(gateway_factory: Callable[..., Any]) -> RunningGateway:
    """A gateway in enforce mode with default settings."""
    running: RunningGateway = await gateway_factory()
    return running


@pytest.fixture
async def client() -> AsyncIterator[aiohttp.ClientSession]:
    """An HTTP client, as the Kilo Code extension would be."""
    async with aiohttp.ClientSession() as session:
        yield session


# Blocking calls on the event loop that are harmless, each allowed in one function only:
# (blockbuster's name of the call, file, function). No function of gateway/ is here, and
# none may be: an allowance covers everything called below the function named, so one on
# a gateway function would hide that function's blocking from every test.
_MAY_BLOCK = [
    # asyncpg parses its connection arguments on every connect, looking for ~/.pgpass and
    # ~/.postgresql/ (TLS key and certificates): a few stats in the home directory per
    # connection, and a pool connects a handful of times.
    ("os.stat", "asyncpg/connect_utils.py", "_parse_connect_dsn_and_args"),
    ("os.path.abspath", "asyncpg/connect_utils.py", "_parse_connect_dsn_and_args"),
    # prometheus_client's process collector reads /proc/self (memory, not a disk) when a
    # test reads the registry, as /metrics does.
    ("io.BufferedReader.read", "prometheus_client/process_collector.py", "collect"),
    ("os.listdir", "prometheus_client/process_collector.py", "collect"),
    # `make_config` builds a Config inside a test's loop, reading config/defaults.toml and
    # the catalog; the gateway itself reads them once, before its loop starts (__main__).
    # Only this test helper's call is allowed: gateway.config read on a loop elsewhere fails.
    ("io.BufferedReader.read", "tests/conftest.py", "make"),
    # pytest-timeout prints every thread's stack from its SIGALRM handler, which runs on
    # the loop of a test that hung: without this the dump itself fails, stackless.
    ("io.TextIOWrapper.write", "pytest_timeout.py", "timeout_sigalrm"),
]


@pytest.fixture
def blockbuster() -> Iterator[BlockBuster]:
    """Fail the test on a blocking call made on the event loop: file I/O, fsync, sleep, a
    blocking socket, an acquired threading lock (see blockbuster's list).

    Every module's calls are checked, the gateway's, the tests' and the libraries', but for
    the few in `_MAY_BLOCK`. Modules opt in with `pytestmark =
    pytest.mark.usefixtures("blockbuster")`, which sets this up before the test's other
    function-scoped fixtures and tears it down after them, so a gateway's start and
    shutdown (its ledger's final spool) are checked too. Session- and module-scoped
    fixtures (starting PostgreSQL, the migrated template) are set up earlier, so never
    under it; calls made without a running loop (sync fixtures, threads) are not checked.
    """
    checker = BlockBuster()
    # Not on blockbuster's list, and the very call that stalled every stream: an fsync of
    # the spool on the loop.
    for name in ("os.fsync", "os.fdatasync"):
        checker.functions[name] = BlockBusterFunction(None, name)
    for call, filename, function in _MAY_BLOCK:
        checker.functions[call].can_block_in(filename, function)
    checker.activate()
    try:
        yield checker
    finally:
        checker.deactivate()


# Nothing listens here: a pool on it fails like a database that is down.
UNREACHABLE_DSN = "postgresql://postgres@127.0.0.1:1/nowhere"


@pytest.fixture
async def pool(db_url: str) -> AsyncIterator[asyncpg.Pool]:
    """A pool on this test's database, as the gateway's ledger uses."""
    created = await asyncpg.create_pool(db_url, min_size=1, max_size=4)
    assert created is not None
    yield created
    await created.close()


@pytest.fixture
async def dead_pool() -> AsyncIterator[asyncpg.Pool]:
    """A pool whose every connection attempt is refused (the database is down)."""
    created = await asyncpg.create_pool(UNREACHABLE_DSN, min_size=0, max_size=1)
    assert created is not None
    yield created
    await created.close()


@pytest.fixture
async def stripe_server(request: pytest.FixtureRequest) -> AsyncIterator[RunningFakeStripe]:
    """The test Stripe server: empty, or as `stripe-setup` leaves it (products, prices, the
    portal configuration) for tests marked `stripe_set_up`."""
    set_up = request.node.get_closest_marker("stripe_set_up") is not None
    running = await (start_fake_stripe_set_up() if set_up else start_fake_stripe())
    yield running
    await running.close()


@pytest.fixture
async def billing_gateway(
    gateway_factory: Callable[..., Any], stripe_server: RunningFakeStripe
) -> RunningGateway:
    """A gateway whose Stripe (key, webhook secret, API base) is the test server."""
    gateway: RunningGateway = await gateway_factory(**stripe_env(stripe_server))
    return gateway
