"""Real processes the durability tests control: a PostgreSQL they can stop, crash and
restart, and `python -m gateway serve` processes they can signal.

The PostgreSQL is the one the `pgserver` wheel ships (initdb, pg_ctl, postgres), on a
loopback TCP port in a temporary directory. PostgreSQL refuses to run as root, so when
the tests are root the server runs as the unprivileged `pgserver` user, as
`pgserver.postgres_server` does.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import aiohttp
from yarl import URL

from gateway.config import PROJECT_ROOT, load_defaults

with warnings.catch_warnings():
    # pgserver's platformdirs lookup warns when XDG_RUNTIME_DIR is unset.
    warnings.simplefilter("ignore")
    from pgserver._commands import POSTGRES_BIN_PATH

PG_SYSTEM_USER = "pgserver"
PG_COMMAND_TIMEOUT_SECONDS = 30.0
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


def free_port() -> int:
    """A loopback TCP port nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def _system_user() -> str | None:
    """Who runs PostgreSQL: `pgserver` when we are root, else ourselves."""
    if os.geteuid() != 0:
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from pgserver.utils import (
            ensure_folder_permissions,
            ensure_prefix_permissions,
            ensure_user_exists,
        )
    ensure_user_exists(PG_SYSTEM_USER)
    # The binaries and libraries must be readable and executable by that user.
    ensure_prefix_permissions(POSTGRES_BIN_PATH)
    ensure_folder_permissions(POSTGRES_BIN_PATH, 0o055)
    ensure_folder_permissions(POSTGRES_BIN_PATH.parent / "lib", 0o044)
    return PG_SYSTEM_USER


class PostgresCluster:
    """A PostgreSQL server of our own, on 127.0.0.1:`port`, that tests may crash."""

    def __init__(self, base_dir: Path, port: int, user: str | None) -> None:
        self.base_dir = base_dir
        self.data_dir = base_dir / "data"
        self.log_path = base_dir / "postgres.log"
        self.port = port
        self._user = user

    @classmethod
    def create(cls) -> PostgresCluster:
        """initdb a new cluster in a temporary directory (not started yet)."""
        user = _system_user()
        base_dir = Path(tempfile.mkdtemp(prefix="gw-durability-pg-"))
        if user is not None:
            entry = pwd.getpwnam(user)
            os.chown(base_dir, entry.pw_uid, entry.pw_gid)
        cluster = cls(base_dir, free_port(), user)
        cluster._run(
            "initdb",
            "-D",
            str(cluster.data_dir),
            "--auth=trust",
            "--encoding=utf8",
            "-U",
            "postgres",
        )
        return cluster

    def url(self, database: str = "postgres") -> str:
        """The connection URL of `database` on this server."""
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def _run(self, program: str, *args: str) -> None:
        result = subprocess.run(
            [str(POSTGRES_BIN_PATH / program), *args],
            cwd=self.base_dir,
            user=self._user,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=PG_COMMAND_TIMEOUT_SECONDS,
            check=False,
        )
        if result.returncode != 0:
            log = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
            raise RuntimeError(
                f"{program} {' '.join(args)} failed ({result.returncode}):\n"
                f"{result.stdout.decode(errors='replace')}{result.stderr.decode(errors='replace')}"
                f"\n--- postgres log ---\n{log[-3000:]}"
            )

    def _pg_ctl(self, *args: str) -> None:
        self._run("pg_ctl", "-D", str(self.data_dir), "-w", *args)

    def is_running(self) -> bool:
        """Whether the postmaster is up (its pid file names a live process)."""
        pid_file = self.data_dir / "postmaster.pid"
        try:
            pid = int(pid_file.read_text().split()[0])
        except (FileNotFoundError, IndexError, ValueError):
            return False
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True

    def start_blocking(self) -> None:
        """Start the server and return once it accepts connections."""
        # fsync off: the tests crash PostgreSQL, never the machine, and it saves seconds.
        options = (
            f"-h 127.0.0.1 -p {self.port} -k {self.base_dir} -c fsync=off"
            " -c full_page_writes=off -c max_connections=200"
        )
        self._pg_ctl("-o", options, "-l", str(self.log_path), "start")

    def stop_blocking(self, mode: str = "fast") -> None:
        """Stop the server; `immediate` is a crash: no checkpoint, clients cut off."""
        self._pg_ctl("-m", mode, "stop")

    async def start(self) -> None:
        """Start the server without blocking the event loop."""
        await asyncio.to_thread(self.start_blocking)

    async def crash(self) -> None:
        """`pg_ctl stop -m immediate`, without blocking the event loop."""
        await asyncio.to_thread(self.stop_blocking, "immediate")

    def destroy(self) -> None:
        """Stop the server if it runs and delete its directory."""
        if self.is_running():
            with contextlib.suppress(RuntimeError):
                self.stop_blocking("immediate")
        shutil.rmtree(self.base_dir, ignore_errors=True)


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

    async def wait_ready(self, client: aiohttp.ClientSession) -> None:
        """Poll /readyz until it answers 200; fail if the process exits or time runs out."""
        deadline = time.monotonic() + GATEWAY_READY_DEADLINE_SECONDS
        while True:
            if self.process.returncode is not None:
                raise AssertionError(f"gateway exited during startup:\n{self.log()[-3000:]}")
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
