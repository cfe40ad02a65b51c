"""Real processes the durability tests control: a PostgreSQL they can stop, crash and
restart, and `python -m gateway serve` processes they can signal.

The PostgreSQL is `bench.postgres.PostgresCluster` (the `pgserver` wheel's binaries, on a
loopback TCP port in a temporary directory, run as the `pgserver` user when we are root),
set up for tests; `free_port` is `bench.procs.free_port`.

The fault tests also share what they read off a running gateway (metrics, readiness, its
file descriptors and memory in /proc), `poll_until` for waiting with a deadline, and
`BrokenJsonUpstream`, an upstream that never finishes a JSON body.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import struct
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import asyncpg
from prometheus_client.parser import text_string_to_metric_families
from yarl import URL

from bench import postgres
from bench.procs import free_port as free_port
from gateway.config import PROJECT_ROOT, load_defaults
from gateway.platform.migrations import migrate

GATEWAY_READY_DEADLINE_SECONDS = 20.0
POLL_SECONDS = 0.02
# Everything the gateway reads from its environment; the tests set what they need.
GATEWAY_VARIABLES = frozenset(load_defaults()["env"]) | {
    "DATABASE_URL",
    "OPENROUTER_API_KEY",
    "GATEWAY_CONFIG_FILE",
    "PROMETHEUS_MULTIPROC_DIR",
}
UPSTREAM_KEY = "sk-or-v1-durability-test-key-0123456789"
T = TypeVar("T")


class PostgresCluster(postgres.PostgresCluster):
    """`bench.postgres.PostgresCluster` as the tests want it: UTF-8, and no fsync (the tests
    crash PostgreSQL, never the machine, and it saves seconds)."""

    TEMP_PREFIX = "gw-durability-pg-"
    ENCODING = "utf8"
    DURABLE = False
    COMMAND_TIMEOUT_SECONDS = 30.0


@contextlib.asynccontextmanager
async def migrated_database(cluster: PostgresCluster, prefix: str) -> AsyncIterator[str]:
    """A new, migrated database on `cluster` (its URL), dropped on exit.

    The cluster is started first if a test left it stopped, and again before the drop.
    """
    if not cluster.is_running():
        await cluster.start()
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    await _admin(cluster, f'CREATE DATABASE "{name}"')
    try:
        conn = await asyncpg.connect(cluster.url(name))
        try:
            await migrate(conn)
        finally:
            await conn.close()
        yield cluster.url(name)
    finally:
        if not cluster.is_running():
            await cluster.start()
        await _admin(cluster, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


async def _admin(cluster: PostgresCluster, sql: str) -> None:
    conn = await asyncpg.connect(cluster.url())
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


def gateway_env(settings: Mapping[str, Any]) -> dict[str, str]:
    """This process's environment without any gateway setting, plus `settings`."""
    env = {k: v for k, v in os.environ.items() if k not in GATEWAY_VARIABLES}
    env.update({k: str(v) for k, v in settings.items()})
    return env


class GatewayProcess:
    """`python -m gateway serve` (one worker) on a free loopback port, logging to a file."""

    def __init__(self, process: asyncio.subprocess.Process, url: URL, log_path: Path) -> None:
        self.process = process
        self.url = url
        self.log_path = log_path

    @classmethod
    async def start(
        cls, *, database_url: str, upstream_url: str, log_dir: Path, **settings: Any
    ) -> GatewayProcess:
        """Start a gateway; keywords are environment settings (USAGE_SPOOL_DIR=...)."""
        port = free_port()
        env = gateway_env(
            {
                "DATABASE_URL": database_url,
                "OPENROUTER_BASE_URL": upstream_url,
                "OPENROUTER_API_KEY": UPSTREAM_KEY,
                "GATEWAY_HOST": "127.0.0.1",
                "GATEWAY_PORT": port,
                "APP_URL": "https://app.example.test",
                "AUTO_MIGRATE": "false",
                "LOG_LEVEL": "warning",
                **settings,
            }
        )
        log_path = log_dir / f"gateway-{port}.log"
        with log_path.open("wb") as log:
            process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "gateway",
                "serve",
                cwd=PROJECT_ROOT,
                env=env,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        return cls(process, URL(f"http://127.0.0.1:{port}"), log_path)

    @property
    def pid(self) -> int:
        return self.process.pid

    def log(self) -> str:
        """Everything the process has written so far."""
        return self.log_path.read_text(errors="replace")

    def describe(self) -> str:
        """Whether the process still runs, and the end of its log (for failure messages)."""
        state = (
            "running" if self.process.returncode is None else f"exited {self.process.returncode}"
        )
        return f"gateway pid {self.pid} at {self.url}: {state}; log tail:\n{self.log()[-2000:]}"

    async def wait_ready(self, client: aiohttp.ClientSession) -> None:
        """Poll /readyz until it answers 200; fail if the process exits or time runs out."""
        deadline = time.monotonic() + GATEWAY_READY_DEADLINE_SECONDS
        while True:
            if self.process.returncode is not None:
                raise AssertionError(
                    f"gateway exited ({self.process.returncode}) during startup:\n"
                    f"{self.log()[-3000:]}"
                )
            with contextlib.suppress(aiohttp.ClientConnectionError):
                async with client.get(self.url / "readyz") as response:
                    if response.status == 200:
                        return
            if time.monotonic() > deadline:
                raise AssertionError(f"gateway not ready in time:\n{self.log()[-3000:]}")
            await asyncio.sleep(POLL_SECONDS)

    def send(self, signum: signal.Signals) -> None:
        """Send a signal to the gateway process (by its pid)."""
        if self.process.returncode is None:
            self.process.send_signal(signum)

    async def wait(self, timeout_seconds: float) -> int:
        """Wait for the process to exit; return its exit status."""
        return await asyncio.wait_for(self.process.wait(), timeout_seconds)

    async def stop(self) -> None:
        """Kill the process if it still runs, and reap it."""
        if self.process.returncode is None:
            self.process.kill()
        await self.process.wait()


# --- What the fault tests read off a running gateway, and how they wait ---------------------


async def poll_until(
    probe: Callable[[], Awaitable[T]],
    done: Callable[[T], bool],
    *,
    within_seconds: float,
    interval_seconds: float = POLL_SECONDS,
) -> T:
    """Call `probe` until `done(value)`; return that value, or fail at the deadline.

    Connection errors count as "not yet" (a restarting server refuses for a while).
    """
    deadline = time.monotonic() + within_seconds
    last: Any = "nothing (every probe failed)"
    while True:
        with contextlib.suppress(OSError, aiohttp.ClientError):
            last = await probe()
            if done(last):
                return last
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {within_seconds} s; last value: {last!r}")
        await asyncio.sleep(interval_seconds)


def process_rss_bytes(pid: int) -> int:
    """The resident set size of process `pid`, from /proc."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for process {pid}")


def process_open_fds(pid: int) -> int:
    """How many file descriptors process `pid` holds open, from /proc."""
    return len(os.listdir(f"/proc/{pid}/fd"))


async def read_metric(client: aiohttp.ClientSession, base_url: URL, name: str) -> float | None:
    """An unlabelled sample from a gateway's /metrics, or None when it is not exported."""
    async with client.get(base_url / "metrics") as response:
        text = await response.text()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and not sample.labels:
                return float(sample.value)
    return None


async def read_readiness(client: aiohttp.ClientSession, base_url: URL) -> tuple[int, Any]:
    """A gateway's /readyz: its status and JSON body."""
    async with client.get(base_url / "readyz") as response:
        return response.status, await response.json()


async def connection_refused(url: URL) -> bool:
    """Whether a TCP connection to `url`'s host and port is refused right now."""
    try:
        _reader, writer = await asyncio.open_connection(url.host, url.port)
    except ConnectionRefusedError:
        return True
    writer.close()
    await writer.wait_closed()
    return False


class BrokenJsonUpstream:
    """A loopback HTTP server that starts a plain JSON response and never finishes it.

    Each connection gets one response: the headers and the first half of a chat
    completion body (framed by Content-Length, or chunked). Then the server either closes
    the connection (`hold_open=False`: the upstream died mid-body; with `reset`, abruptly,
    with a TCP RST) or waits until its peer closes it (`hold_open=True`: a slow body),
    noting when that happened.
    """

    BODY = (
        b'{"id":"gen-broken","object":"chat.completion","model":"openai/gpt-4o-mini",'
        b'"choices":[{"index":0,"message":{"role":"assistant","content":"tok0 tok1 tok2 "},'
        b'"finish_reason":"stop"}],"usage":{"prompt_tokens":11,"completion_tokens":7,'
        b'"total_tokens":18,"cost":0.00042}}'
    )

    def __init__(self, *, chunked: bool, hold_open: bool, reset: bool = False) -> None:
        self._chunked = chunked
        self._hold_open = hold_open
        self._reset = reset
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self.received = 0
        self.peer_closed_at: list[float] = []

    @property
    def url(self) -> str:
        """The base URL to give the gateway as OPENROUTER_BASE_URL."""
        assert self._server is not None
        port = self._server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}/api/v1"

    async def start(self) -> BrokenJsonUpstream:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self

    async def close(self) -> None:
        assert self._server is not None
        self._server.close()
        for writer in list(self._writers):
            writer.close()
        await self._server.wait_closed()

    def _head_and_partial_body(self) -> bytes:
        half = self.BODY[: len(self.BODY) // 2]
        status = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
        if self._chunked:
            return status + b"Transfer-Encoding: chunked\r\n\r\n%x\r\n%s\r\n" % (len(half), half)
        return status + b"Content-Length: %d\r\n\r\n%s" % (len(self.BODY), half)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n"):
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            await reader.readexactly(length)
            self.received += 1
            writer.write(self._head_and_partial_body())
            await writer.drain()
            if self._hold_open:
                while await reader.read(65536):
                    pass
                self.peer_closed_at.append(time.monotonic())
            elif self._reset:
                sock = writer.get_extra_info("socket")
                # Linger on, for zero seconds: close() sends RST instead of FIN.
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                writer.transport.abort()
        except (OSError, asyncio.IncompleteReadError):
            self.peer_closed_at.append(time.monotonic())
        finally:
            self._writers.discard(writer)
            writer.close()
