"""Charges on local disk: written when the database cannot take them, replayed once it can.

Each process appends to a file of its own and holds an exclusive lock on it while it
writes, so a replay (by this process or another) never reads a file still growing. A
replay claims a file by taking the same lock, writes its charges, then deletes it; a
crash in between leaves the file for the next replay, which the ledger's key makes
harmless.

Everything here is plain blocking file I/O (open, write, fsync, flock, directory listing),
which keeps it simple to get exactly right, and so none of it may run on the event loop:
there one fsync of thousands of charges stalled every open stream. The ledger (`usage.py`)
calls it from one worker thread. A `Spool` is not thread-safe: it keeps its open file and
that file's path, and a claim skips the file by comparing paths, so an append in one thread
while another thread claims would race. One thread at a time, then.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, Any, NamedTuple

PENDING_GLOB = "usage-*.jsonl"


class Claim(NamedTuple):
    """A spool file locked for replay, and its records; `release` gives the lock back."""

    path: Path
    handle: IO[str]
    records: list[dict[str, Any]]

    def release(self) -> None:
        self.handle.close()


class Spool:
    """The spool directory: this process's current file, and claiming the others.

    Blocking, and for one thread at a time (see the module's docstring).
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._file: IO[str] | None = None
        self.path: Path | None = None

    def append(self, records: Iterable[dict[str, Any]]) -> Path:
        """Append and fsync: once this returns, the records survive a crash. Returns the
        file they are in."""
        if self._file is None or self.path is None:
            self.directory.mkdir(parents=True, exist_ok=True)
            path = self.directory / f"usage-{os.getpid()}-{time.time_ns()}.jsonl"
            file = path.open("a", encoding="utf-8")
            fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
            self._file, self.path = file, path
        try:
            self._file.writelines(json.dumps(r, separators=(",", ":")) + "\n" for r in records)
            self._file.flush()
            os.fsync(self._file.fileno())
        except BaseException:
            # The file may end in a partial line now (a full disk): the next append goes to
            # a new file, so that the partial line stays a torn last line, which a replay
            # skips, instead of swallowing the first record appended after it.
            with contextlib.suppress(OSError):
                self.rotate()
            raise
        return self.path

    def rotate(self) -> None:
        """Close the current file (releasing its lock) so that a replay can claim it."""
        file, self._file = self._file, None
        if file is not None:
            file.close()  # even if this fails (a flush on a full disk), the file is let go

    def claim(self) -> list[Claim]:
        """Lock every file no live writer holds, and read their records.

        The caller deletes each file whose records it wrote, then releases every claim
        (`release_all`), written or not.
        """
        claims: list[Claim] = []
        try:
            for path in (
                sorted(self.directory.glob(PENDING_GLOB)) if self.directory.is_dir() else []
            ):
                handle = self._claim(path)
                if handle is not None:
                    claims.append(Claim(path, handle, []))
            return [claim._replace(records=read_records(claim.handle)) for claim in claims]
        except BaseException:
            release_all(claims)
            raise

    @contextlib.contextmanager
    def claimed(self) -> Iterator[list[tuple[Path, list[dict[str, Any]]]]]:
        """`claim` as a context manager that releases the claims on exit.

        Files whose records were written are deleted by the caller.
        """
        claims = self.claim()
        try:
            yield [(claim.path, claim.records) for claim in claims]
        finally:
            release_all(claims)

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


def release_all(claims: Iterable[Claim]) -> None:
    """Release every claim (closing a file gives its lock back)."""
    for claim in claims:
        claim.release()


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
