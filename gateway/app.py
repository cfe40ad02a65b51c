"""The application factory and the long-lived resources it owns.

`create_app` does no I/O: it wires routes, the middleware and one `cleanup_ctx`
generator per resource (database pool, upstream session, change listener), which
aiohttp runs at startup and unwinds in reverse at shutdown.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterable
from functools import partial

from aiohttp import web

from gateway.access import queries
from gateway.access.admission import POLICY, Policy
from gateway.access.cache import CACHE, FactsCache
from gateway.access.listener import LISTENER, ChangeListener
from gateway.access.queries import ApiKey
from gateway.access.rule import OrgFacts
from gateway.accounts import checkout as billing
from gateway.accounts import (
    invitations,
    mailer,
    management,
    organizations,
    pending_invitations,
    profile,
    reminders,
    webhooks,
)
from gateway.accounts.reports import usage_report_handler
from gateway.common.context import IN_FLIGHT
from gateway.config import CONFIG, Config
from gateway.errors import DatabaseUnavailable
from gateway.ledger.writer import LEDGER, UsageLedger
from gateway.pages import setup as setup_pages
from gateway.platform import logs, metrics
from gateway.platform.database import POOL, QUERIES, QueryLimiter, create_pool
from gateway.platform.metrics import TALLY, Tally, metrics_handler
from gateway.proxy import listings
from gateway.proxy.route import proxy_handler
from gateway.proxy.upstream import CONNECT_TIMEOUT_SECONDS, UPSTREAM, UpstreamClient
from gateway.serve.health import healthz, readyz
from gateway.serve.middleware import gateway_middleware


def create_app(config: Config) -> web.Application:
    """Build the gateway application for `config` (whose database_url must be set)."""
    if config.database_url is None:
        raise ValueError("create_app needs config.database_url; start the database first")
    app = web.Application(middlewares=[gateway_middleware], client_max_size=config.max_body_bytes)
    app[CONFIG] = config
    app[POLICY] = Policy.from_config(config)
    app[IN_FLIGHT] = set()
    app[TALLY] = Tally()
    app[QUERIES] = QueryLimiter(config.database_max_pending_queries)
    app[CACHE] = build_cache(app, config)
    app[LISTENER] = ChangeListener(
        config.database_listen_url or config.database_url,
        on_change=app[CACHE].apply_change,
        on_reset=app[CACHE].revalidate_all,
        # The database answers again: stop failing fast.
        on_connected=app[QUERIES].resume,
    )
    app[LEDGER] = UsageLedger(
        spool_dir=config.usage_spool_dir,
        batch_size=config.usage_batch_size,
        flush_interval_seconds=config.usage_flush_interval_seconds,
        max_pending=config.usage_max_pending,
        on_charged=partial(revalidate_unless_notified, app[LISTENER], app[CACHE]),
    )
    app[TALLY].follow_pending(app[LEDGER])
    app[TALLY].follow_database(queries=app[QUERIES])
    # Cleanup runs in reverse: charges are flushed before the pool closes.
    app.cleanup_ctx.extend(
        [flusher, database_pool, upstream_session, usage_ledger, change_listener]
    )
    setup_routes(app)
    # What the Kilo clients ask besides the proxy, and the billing side: each module
    # registers its own routes, resources and background tasks.
    clients = (listings, profile)
    accounts = (organizations, invitations, pending_invitations, billing, management, webhooks)
    for module in (*clients, *accounts, mailer, reminders):
        module.setup(app)
    # The pages people look at, over the same accounts functions.
    setup_pages(app)
    return app


def revalidate_unless_notified(
    listener: ChangeListener, cache: FactsCache, organization_ids: Iterable[str]
) -> None:
    """After a charge batch, read the organizations' balances again, unless the batch's
    own NOTIFY will make the listener do it: two re-reads per batch held the event loop
    twice as long, and every chunk of every stream relayed meanwhile waited."""
    if not listener.connected.is_set():
        cache.revalidate_organizations(organization_ids)


def setup_routes(app: web.Application) -> None:
    """Attach every endpoint."""
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics_handler)
    app.router.add_route("*", "/api/openrouter/{path:.*}", proxy_handler)
    app.router.add_get("/api/organizations/{organization_id}/usage", usage_report_handler)


def build_cache(app: web.Application, config: Config) -> FactsCache:
    """The facts cache, loading through the pool the `database_pool` context opens."""
    timeout = config.database_query_timeout_seconds
    limiter = app[QUERIES]

    async def load_key(key_hash: str) -> ApiKey | None:
        return await limiter.run(app[POOL], timeout, queries.fetch_api_key, key_hash)

    async def load_role(org_and_user: tuple[str, str]) -> str | None:
        return await limiter.run(app[POOL], timeout, queries.fetch_role, *org_and_user)

    async def load_user_orgs(user_id: str) -> tuple[str, ...]:
        return await limiter.run(app[POOL], timeout, queries.fetch_user_organizations, user_id)

    async def load_facts(organization_id: str) -> OrgFacts | None:
        return await limiter.run(app[POOL], timeout, queries.fetch_org_facts, organization_id)

    return FactsCache(
        load_key=load_key,
        load_role=load_role,
        load_user_orgs=load_user_orgs,
        load_facts=load_facts,
        ttl_seconds=config.entitlement_cache_ttl_seconds,
        negative_ttl_seconds=config.negative_cache_ttl_seconds,
        stale_seconds=config.stale_if_error_seconds,
        stale_on=(DatabaseUnavailable,),
        on_stale_facts=metrics.CACHE_STALE.inc,
        tally=app[TALLY],
    )


# Requests folded into the metrics at a time: about a quarter of a millisecond.
FOLD_SLICE = 128


async def flusher(app: web.Application) -> AsyncIterator[None]:
    """A few times a second, and once more at the very end: write out buffered log lines
    and count the requests answered since the last time in the metrics."""

    tally = app[TALLY]

    def flush() -> None:
        tally.fold()
        logs.flush()

    async def fold_in_slices() -> None:
        more = True
        while more:
            more = tally.fold(FOLD_SLICE)
            await asyncio.sleep(0)  # the requests that arrived meanwhile go first

    async def flush_forever() -> None:
        while True:
            await asyncio.sleep(logs.FLUSH_INTERVAL_SECONDS)
            await fold_in_slices()
            logs.flush()

    task = asyncio.create_task(flush_forever(), name="flusher")
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    flush()


async def database_pool(app: web.Application) -> AsyncIterator[None]:
    """The asyncpg pool every query borrows from."""
    config = app[CONFIG]
    assert config.database_url is not None
    app[POOL] = await create_pool(
        config.database_url,
        min_size=config.database_pool_min_size,
        max_size=config.database_pool_max_size,
        query_timeout_seconds=config.database_query_timeout_seconds,
    )
    app[TALLY].follow_database(pool=app[POOL])
    yield
    await app[POOL].close()


async def upstream_session(app: web.Application) -> AsyncIterator[None]:
    """One pool of keep-alive connections to OpenRouter for the whole process."""
    config = app[CONFIG]
    app[UPSTREAM] = UpstreamClient(
        config.openrouter_base_url,
        connect_timeout_seconds=min(CONNECT_TIMEOUT_SECONDS, config.upstream_timeout_seconds),
        head_timeout_seconds=config.upstream_timeout_seconds,
        idle_timeout_seconds=config.upstream_idle_timeout_seconds,
    )
    yield
    await app[UPSTREAM].close()


async def usage_ledger(app: web.Application) -> AsyncIterator[None]:
    """The background writer of charges; on shutdown it writes every pending charge."""
    ledger, pool = app[LEDGER], app[POOL]
    task = asyncio.create_task(ledger.run(pool), name="usage-ledger")
    yield
    task.cancel()
    # Whatever happened to the writer, pending charges must still be written or spooled.
    with contextlib.suppress(BaseException):
        await task
    await ledger.close(pool, timeout_seconds=app[CONFIG].shutdown_timeout_seconds)


async def change_listener(app: web.Application) -> AsyncIterator[None]:
    """The LISTEN task that evicts cached facts when the database says they changed."""
    task = asyncio.create_task(app[LISTENER].run(), name="change-listener")
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
