"""A PostgreSQL server of our own: 127.0.0.1:port, a temporary directory, start / crash / stop.

The binaries are the ones the ``pgserver`` wheel ships (initdb, pg_ctl, postgres).
PostgreSQL refuses to run as root, so when we are root the server runs as the unprivileged
``pgserver`` user, as ``pgserver.postgres_server`` does.

The soak (``bench.soak``) and the durability tests (``tests.processes``) both use it; what
differs between them (the temporary directory's prefix, the encoding, fsync, how long a
command may take) are class attributes a subclass sets.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pwd
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path
from typing import Self

from bench.procs import free_port

with warnings.catch_warnings():
    # pgserver's platformdirs lookup warns when XDG_RUNTIME_DIR is unset.
    warnings.simplefilter("ignore")
    from pgserver._commands import POSTGRES_BIN_PATH

HOST = "127.0.0.1"
PG_SYSTEM_USER = "pgserver"


def system_user() -> str | None:
    """Who runs PostgreSQL: `pgserver` when we are root, else ourselves (None)."""
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
    """A PostgreSQL server of our own, on 127.0.0.1:`port`, that may be crashed."""

    # Where `create` makes the cluster's directory.
    TEMP_PREFIX = "gw-pg-"
    # initdb --encoding; None leaves it to initdb (the locale's).
    ENCODING: str | None = None
    # False turns fsync and full_page_writes off: for a server that is crashed, never the
    # machine under it, that is safe, and it saves seconds.
    DURABLE = True
    # The most an initdb or pg_ctl may take.
    COMMAND_TIMEOUT_SECONDS = 60.0

    def __init__(self, base_dir: Path, port: int, user: str | None) -> None:
        self.base_dir = base_dir
        self.data_dir = base_dir / "data"
        self.log_path = base_dir / "postgres.log"
        self.port = port
        self.user = user

    @classmethod
    def create(cls) -> Self:
        """initdb a new cluster in a temporary directory (not started yet)."""
        user = system_user()
        base_dir = Path(tempfile.mkdtemp(prefix=cls.TEMP_PREFIX))
        if user is not None:
            entry = pwd.getpwnam(user)
            os.chown(base_dir, entry.pw_uid, entry.pw_gid)
        cluster = cls(base_dir, free_port(), user)
        encoding = () if cls.ENCODING is None else (f"--encoding={cls.ENCODING}",)
        cluster._run(
            "initdb", "-D", str(cluster.data_dir), "--auth=trust", *encoding, "-U", "postgres"
        )
        return cluster

    def url(self, database: str = "postgres") -> str:
        """The connection URL of `database` on this server."""
        return f"postgresql://postgres@{HOST}:{self.port}/{database}"

    def _run(self, program: str, *args: str) -> None:
        result = subprocess.run(
            [str(POSTGRES_BIN_PATH / program), *args],
            cwd=self.base_dir,
            user=self.user,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=self.COMMAND_TIMEOUT_SECONDS,
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
        unsafe = "" if self.DURABLE else " -c fsync=off -c full_page_writes=off"
        options = f"-h {HOST} -p {self.port} -k {self.base_dir}{unsafe} -c max_connections=200"
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
            with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
                self.stop_blocking("immediate")
        shutil.rmtree(self.base_dir, ignore_errors=True)
