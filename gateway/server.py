"""Running the gateway: find the database, migrate it, serve on one or more processes."""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import multiprocessing
import os
import shutil
import signal
import tempfile
from typing import Any

import structlog

from gateway.app import create_app
from gateway.config import Config
from gateway.platform import migrations
from gateway.platform.database import connect, start_embedded
from gateway.platform.logs import setup_logging
from gateway.platform.metrics import MULTIPROCESS_DIR_VARIABLE
from gateway.serve.runner import serve_until_signalled

log = structlog.get_logger("gateway.server")


def with_database(config: Config) -> tuple[Config, Any]:
    """`config` with a database URL, starting the embedded PostgreSQL when none is set.

    Returns the embedded server's handle (None for a real DATABASE_URL); keep it alive
    for as long as the database is needed.
    """
    if config.database_url is not None:
        return config, None
    server = start_embedded(config.embedded_data_dir)
    log.warning(
        "embedded_database",
        message="DATABASE_URL is not set: using the embedded PostgreSQL",
        data_dir=str(config.embedded_data_dir),
    )
    return dataclasses.replace(config, database_url=server.get_uri()), server


async def apply_migrations(config: Config, target: int | None = None) -> list[int]:
    """Apply pending migrations to the configured database."""
    assert config.database_url is not None
    async with connect(config.database_url) as conn:
        return await migrations.migrate(
            conn, target=target, enterprise_organization_ids=config.enterprise_organization_ids
        )


def use_uvloop() -> None:
    """Run on uvloop when it is installed: it shaves the event loop's share of each request."""
    try:
        import uvloop
    except ImportError:
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


def tune_garbage_collector() -> None:
    """Collect young objects less often, and never rescan what start-up built.

    Each request allocates a few hundred short-lived objects; with the default
    threshold (700) the collector runs every couple of requests and walks the charges
    waiting to be written. Reference counting frees almost all of it anyway.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 20, 100)


def run_worker(config: Config, reuse_port: bool) -> None:
    """Serve until SIGTERM or SIGINT, then drain in-flight requests and exit."""
    setup_logging(config.log_level)
    use_uvloop()
    tune_garbage_collector()
    log.info(
        "serving",
        host=config.host,
        port=config.port,
        pid=os.getpid(),
        enforcement_mode=config.enforcement_mode.value,
    )
    asyncio.run(
        serve_until_signalled(
            create_app(config),
            config.host,
            config.port,
            reuse_port=reuse_port,
            shutdown_timeout=config.shutdown_timeout_seconds,
        )
    )


def serve(config: Config, workers: int) -> int:
    """Run the gateway on `workers` processes sharing the port; return the exit status."""
    config, embedded = with_database(config)
    if config.auto_migrate:
        applied = asyncio.run(apply_migrations(config))
        log.info("migrations_checked", applied=applied)
    if workers == 1:
        run_worker(config, reuse_port=False)
        return 0
    return _run_workers(config, workers, embedded)


def _run_workers(config: Config, workers: int, embedded: Any) -> int:
    """Start `workers` processes on one port (SO_REUSEPORT) and pass signals on to them."""
    # Workers write their metrics to files here, and /metrics on any worker sums them.
    metrics_dir = tempfile.mkdtemp(prefix="gateway-metrics-")
    os.environ[MULTIPROCESS_DIR_VARIABLE] = metrics_dir
    context = multiprocessing.get_context("spawn")
    processes = [
        context.Process(target=run_worker, args=(config, True), name=f"gateway-worker-{i}")
        for i in range(workers)
    ]
    for process in processes:
        process.start()

    def forward(signum: int, _frame: object) -> None:
        for process in processes:
            if process.pid is not None and process.is_alive():
                os.kill(process.pid, signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    for process in processes:
        process.join()
    del embedded  # the embedded database outlives every worker
    shutil.rmtree(metrics_dir, ignore_errors=True)
    return max((p.exitcode or 0) for p in processes)
