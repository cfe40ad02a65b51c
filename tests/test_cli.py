"""`python -m gateway migrate|serve` as an operator runs them: real processes, real ports."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import asyncpg
import pytest

from bench.procs import free_port
from gateway.config import PROJECT_ROOT
from gateway.platform.migrations import applied_versions, discover

ALL_VERSIONS = [m.version for m in discover()]
COMMAND_TIMEOUT_SECONDS = 30.0
STARTUP_DEADLINE_SECONDS = 30.0
SHUTDOWN_DEADLINE_SECONDS = 10.0
# Settings the tests choose; anything the outer environment says about them is dropped.
GATEWAY_VARIABLES = (
    "DATABASE_URL",
    "OPENROUTER_BASE_URL",
    "OPENROUTER_API_KEY",
    "GATEWAY_HOST",
    "GATEWAY_PORT",
    "APP_URL",
    "TRIAL_DAYS",
    "ENTITLEMENT_CACHE_TTL_SECONDS",
    "NEGATIVE_CACHE_TTL_SECONDS",
    "ENFORCEMENT_MODE",
    "LOG_LEVEL",
    "AUTO_MIGRATE",
    "GATEWAY_CONFIG_FILE",
    "EMBEDDED_DATA_DIR",
    "PROMETHEUS_MULTIPROC_DIR",
)


@dataclass
class Finished:
    returncode: int
    stdout: str
    stderr: str


def gateway_env(**settings: str | None) -> dict[str, str]:
    """The process environment without gateway settings, plus `settings` (None unsets)."""
    env = {k: v for k, v in os.environ.items() if k not in GATEWAY_VARIABLES}
    env["OPENROUTER_API_KEY"] = "sk-or-v1-cli-test-key"
    for name, value in settings.items():
        if value is None:
            env.pop(name, None)
        else:
            env[name] = value
    return env


async def start(args: list[str], env: Mapping[str, str]) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "gateway",
        *args,
        cwd=PROJECT_ROOT,
        env=dict(env),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )


async def finish(process: asyncio.subprocess.Process, timeout_seconds: float) -> Finished:
    """Wait for the process to exit and collect its output; kill it at the deadline."""
    try:
        stdout, stderr = await asyncio.wait_for(process.communicate(), timeout_seconds)
    finally:
        await kill(process)
    assert process.returncode is not None
    return Finished(process.returncode, stdout.decode(), stderr.decode())


async def kill(process: asyncio.subprocess.Process) -> None:
    """Kill the process if it is still running, and reap it."""
    if process.returncode is None:
        process.kill()
        await process.wait()


async def run(args: list[str], env: Mapping[str, str]) -> Finished:
    """Run `python -m gateway <args>` to completion."""
    return await finish(await start(args, env), COMMAND_TIMEOUT_SECONDS)


async def versions(database_url: str) -> list[int]:
    conn = await asyncpg.connect(database_url)
    try:
        return await applied_versions(conn)
    finally:
        await conn.close()


# --- migrate --------------------------------------------------------------------------------


async def test_migrate_to_a_target_then_the_rest(empty_database_url: str) -> None:
    """`migrate --target 2` applies 1 and 2; `migrate` then applies 3 and 4; again, none."""
    env = gateway_env(DATABASE_URL=empty_database_url)

    partial = await run(["migrate", "--target", "2"], env)
    assert partial.returncode == 0, partial.stderr
    assert "applied migrations: [1, 2]" in partial.stdout
    assert await versions(empty_database_url) == [1, 2]

    rest = await run(["migrate"], env)
    assert rest.returncode == 0, rest.stderr
    assert f"applied migrations: {ALL_VERSIONS[2:]}" in rest.stdout
    assert await versions(empty_database_url) == ALL_VERSIONS

    again = await run(["migrate"], env)
    assert again.returncode == 0, again.stderr
    assert "applied migrations: none pending" in again.stdout
    assert await versions(empty_database_url) == ALL_VERSIONS


async def test_migrate_does_not_start_the_embedded_database(empty_database_url: str) -> None:
    """With DATABASE_URL set, migrate says nothing about the embedded PostgreSQL."""
    result = await run(["migrate"], gateway_env(DATABASE_URL=empty_database_url))

    assert result.returncode == 0, result.stderr
    assert "embedded" not in result.stdout + result.stderr


# --- bad configuration ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("GATEWAY_PORT", "notaport"),
        ("GATEWAY_PORT", "70000"),
        ("OPENROUTER_API_KEY", None),
        ("OPENROUTER_API_KEY", "   "),
        ("ENFORCEMENT_MODE", "loud"),
        ("OPENROUTER_BASE_URL", "ftp://example.test"),
        ("ENTITLEMENT_CACHE_TTL_SECONDS", "soon"),
        ("TRIAL_DAYS", "-1"),
    ],
    ids=lambda v: repr(v),
)
async def test_bad_setting_fails_serve_naming_the_variable(
    variable: str, value: str | None, db_url: str
) -> None:
    """`serve` with a bad or missing setting exits non-zero, naming the variable on stderr."""
    settings: dict[str, str | None] = {"DATABASE_URL": db_url, "GATEWAY_PORT": str(free_port())}
    settings[variable] = value
    env = gateway_env(**settings)

    result = await run(["serve"], env)

    assert result.returncode != 0
    assert variable in result.stderr
    assert "Traceback" not in result.stderr


# --- serve ----------------------------------------------------------------------------------


@pytest.fixture
async def served(
    empty_database_url: str, tmp_path: Path
) -> AsyncIterator[tuple[asyncio.subprocess.Process, str]]:
    """`python -m gateway serve` on a free loopback port; killed after the test if still up.

    Its spool is the test's own, never the checkout's .data/ (shared by every xdist worker,
    and holding a developer's real spooled charges)."""
    port = free_port()
    env = gateway_env(
        DATABASE_URL=empty_database_url,
        GATEWAY_HOST="127.0.0.1",
        GATEWAY_PORT=str(port),
        USAGE_SPOOL_DIR=str(tmp_path / "spool"),
    )
    process = await start(["serve"], env)
    try:
        yield process, f"http://127.0.0.1:{port}"
    finally:
        await kill(process)


async def wait_until_serving(
    process: asyncio.subprocess.Process, base_url: str, client: aiohttp.ClientSession
) -> dict[str, int]:
    """Poll /healthz and /readyz until both answer 200; fail at the deadline or on exit."""
    deadline = time.monotonic() + STARTUP_DEADLINE_SECONDS
    statuses: dict[str, int] = {}
    while True:
        assert process.returncode is None, "serve exited during startup"
        try:
            for path in ("healthz", "readyz"):
                async with client.get(f"{base_url}/{path}") as response:
                    statuses[path] = response.status
        except aiohttp.ClientConnectionError:
            statuses = {}
        if statuses == {"healthz": 200, "readyz": 200}:
            return statuses
        assert time.monotonic() < deadline, f"not serving within the deadline: {statuses}"
        await asyncio.sleep(0.05)


async def test_serve_answers_health_checks_and_stops_on_sigterm(
    served: tuple[asyncio.subprocess.Process, str],
    empty_database_url: str,
    client: aiohttp.ClientSession,
) -> None:
    """`serve` migrates, answers /healthz and /readyz 200, and exits 0 soon after SIGTERM."""
    process, base_url = served

    await wait_until_serving(process, base_url, client)
    assert await versions(empty_database_url) == ALL_VERSIONS

    process.send_signal(signal.SIGTERM)
    result = await finish(process, SHUTDOWN_DEADLINE_SECONDS)

    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    assert "sk-or-v1-cli-test-key" not in result.stdout + result.stderr


async def test_serve_refuses_unknown_tokens(
    served: tuple[asyncio.subprocess.Process, str], client: aiohttp.ClientSession
) -> None:
    """The served process is the real gateway: an unknown token gets the 401 envelope."""
    process, base_url = served
    await wait_until_serving(process, base_url, client)

    async with client.post(
        f"{base_url}/api/openrouter/chat/completions",
        json={"model": "m"},
        headers={"Authorization": "Bearer kilo_unknown"},
    ) as response:
        body = await response.json()

    assert response.status == 401
    assert body["error_type"] == "invalid_api_key"
    assert "X-Request-Id" in response.headers
