"""Charges on local disk: written when the database cannot take them, replayed once it can.

Each process appends to a file of its own and holds an exclusive lock on it while it
writes, so a replay (by this process or another) never reads a file still growing. A
replay claims a file by taking the same lock, writes its charges, then deletes it; a
crash in between leaves the file for the next replay, which the ledger's key makes
harmless.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, Any

PENDING_GLOB = "usage-*.jsonl"


class Spool:
    """The spool directory: this process's current file, and claiming the others."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._file: IO[str] | None = None
        self.path: Path | None = None

    def append(self, records: Iterable[dict[str, Any]]) -> None:
        """Append and fsync: once this returns, the records survive a crash."""
        if self._file is None:
            self.directory.mkdir(parents=True, exist_ok=True)
            self.path = self.directory / f"usage-{os.getpid()}-{time.time_ns()}.jsonl"
            self._file = self.path.open("a", encoding="utf-8")
            fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        self._file.writelines(json.dumps(r, separators=(",", ":")) + "\n" for r in records)
        self._file.flush()
        os.fsync(self._file.fileno())

    def rotate(self) -> None:
        """Close the current file (releasing its lock) so that a replay can claim it."""
        if self._file is not None:
            self._file.close()
            self._file = None

    @contextlib.contextmanager
    def claimed(self) -> Iterator[list[tuple[Path, list[dict[str, Any]]]]]:
        """Lock every file no live writer holds, and yield their records.

        Files whose records were written are deleted by the caller through `done`.
        """
        claims: list[tuple[Path, IO[str]]] = []
        try:
            for path in (
                sorted(self.directory.glob(PENDING_GLOB)) if self.directory.is_dir() else []
            ):
                handle = self._claim(path)
                if handle is not None:
                    claims.append((path, handle))
            yield [(path, read_records(handle)) for path, handle in claims]
        finally:
            for _path, handle in claims:
                handle.close()

    def _claim(self, path: Path) -> IO[str] | None:
        if self._file is not None and path == self.path:
            return None  # ours, still open: rotate() first
        try:
            handle = path.open("r", encoding="utf-8")
        except FileNotFoundError:
            return None  # replayed by another process a moment ago
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            return None
        if not path.exists():  # deleted between open and lock
            handle.close()
            return None
        return handle


def read_records(handle: IO[str]) -> list[dict[str, Any]]:
    """The records in a spool file; a torn last line (crash mid-write) is skipped."""
    records = []
    for line in handle.read().splitlines():
        with contextlib.suppress(ValueError):
            record = json.loads(line)
            if isinstance(record, dict):
                records.append(record)
    return records


def append_rejected(directory: Path, records: Iterable[dict[str, Any]]) -> Path:
    """Keep records the database refused for good (never replayed automatically)."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"rejected-{os.getpid()}.jsonl"
    with path.open("a", encoding="utf-8") as f:
        f.writelines(json.dumps(r, separators=(",", ":")) + "\n" for r in records)
        f.flush()
        os.fsync(f.fileno())
    return path
