"""Child processes of the bench: free ports, readiness, CPU and memory, and a sure stop.

Every target runs in its own process group (its own session), so the group id names the
target's whole tree: gateway workers, nginx workers, LiteLLM's server. CPU time and peak
memory are read from ``/proc`` and summed over that group; stopping sends SIGTERM to the
group, then SIGKILL to whatever is left at the deadline.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

CLOCK_TICKS_PER_SECOND = os.sysconf("SC_CLK_TCK")
_POLL_SECONDS = 0.05
_STDERR_TAIL_BYTES = 4000


class TargetFailed(RuntimeError):
    """A child process died or never became ready; the message carries its stderr tail."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on right now (the kernel picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass(frozen=True, slots=True)
class ProcStat:
    """The few fields of ``/proc/<pid>/stat`` the bench reads."""

    pid: int
    state: str
    ppid: int
    pgrp: int
    cpu_ticks: int


def read_stat(pid: int) -> ProcStat | None:
    """Parse ``/proc/<pid>/stat``; None when the process is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # The command name is in parentheses and may itself contain spaces or parentheses.
    fields = raw[raw.rindex(")") + 2 :].split()
    utime, stime = int(fields[11]), int(fields[12])
    return ProcStat(pid, fields[0], int(fields[1]), int(fields[2]), utime + stime)


def all_stats() -> list[ProcStat]:
    """Every live process on the machine."""
    stats = (read_stat(int(name)) for name in os.listdir("/proc") if name.isdigit())
    return [s for s in stats if s is not None and s.state != "Z"]


def group_pids(pgrp: int) -> list[int]:
    """Live processes in process group ``pgrp``."""
    return [s.pid for s in all_stats() if s.pgrp == pgrp]


def tree_pids(root: int) -> list[int]:
    """``root`` and all its live descendants."""
    children: dict[int, list[int]] = {}
    for stat in all_stats():
        children.setdefault(stat.ppid, []).append(stat.pid)
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(children.get(pid, ()))
    return found


def cpu_seconds(pids: Sequence[int]) -> float:
    """User plus system CPU time used so far by ``pids``, summed."""
    stats = (read_stat(pid) for pid in pids)
    return sum(s.cpu_ticks for s in stats if s is not None) / CLOCK_TICKS_PER_SECOND


def _status_kib(pid: int, field: str) -> int:
    """A ``kB`` field of ``/proc/<pid>/status`` (VmRSS, VmHWM), 0 when unavailable."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        pass
    return 0


def peak_rss_bytes(pids: Sequence[int]) -> int:
    """Sum of the processes' peak resident sets (VmHWM)."""
    return sum(_status_kib(pid, "VmHWM") for pid in pids) * 1024


def rss_bytes(pids: Sequence[int]) -> int:
    """Sum of the processes' current resident sets (VmRSS)."""
    return sum(_status_kib(pid, "VmRSS") for pid in pids) * 1024


def command_line(pid: int) -> str:
    """The process's command line, or an empty string when it is gone."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return ""
    return raw.replace(b"\0", b" ").decode(errors="replace").strip()


def open_fds(pids: Sequence[int]) -> int:
    """File descriptors the processes hold open (sockets included)."""
    total = 0
    for pid in pids:
        with contextlib.suppress(FileNotFoundError, ProcessLookupError, PermissionError):
            total += len(os.listdir(f"/proc/{pid}/fd"))
    return total


@dataclass
class Child:
    """A started process and its group; see the module docstring."""

    name: str
    popen: subprocess.Popen[bytes]
    stderr_path: Path

    @property
    def pid(self) -> int:
        """The leader's pid, which is also the group id."""
        return self.popen.pid

    def pids(self) -> list[int]:
        """Every live process of this target."""
        return group_pids(self.pid)

    def stderr_tail(self) -> str:
        """The end of what the process wrote to stderr, for error messages."""
        try:
            data = self.stderr_path.read_bytes()
        except FileNotFoundError:
            return ""
        return data[-_STDERR_TAIL_BYTES:].decode(errors="replace")

    def check_alive(self) -> None:
        """Raise TargetFailed if the leader has exited."""
        code = self.popen.poll()
        if code is not None:
            raise TargetFailed(f"{self.name} exited with {code}:\n{self.stderr_tail()}")

    def stop(self, timeout_seconds: float = 5.0) -> None:
        """SIGTERM the group, wait up to the timeout, then SIGKILL what is left."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout_seconds
        while time.monotonic() < deadline:
            self.popen.poll()
            if not self.pids():
                break
            time.sleep(_POLL_SECONDS)
        else:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(timeout=timeout_seconds)


# Every child ever spawned, so a run can stop whatever an interruption left unregistered.
_SPAWNED: list[Child] = []


def stop_leftovers() -> None:
    """Stop every spawned child whose process group still has live processes."""
    for child in reversed(_SPAWNED):
        if child.pids():
            child.stop()
    _SPAWNED.clear()


def spawn(
    name: str,
    argv: Sequence[str],
    *,
    log_dir: Path,
    env: Mapping[str, str] | None = None,
    keep_stdout: bool = False,
    cwd: Path | None = None,
) -> Child:
    """Start ``argv`` in a new session; stdout goes to /dev/null unless ``keep_stdout``."""
    stderr_path = log_dir / f"{name}.stderr"
    stdout: IO[bytes] | int = subprocess.DEVNULL
    with contextlib.ExitStack() as files:
        if keep_stdout:
            stdout = files.enter_context((log_dir / f"{name}.stdout").open("wb"))
        stderr = files.enter_context(stderr_path.open("wb"))
        popen = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=stdout,
            stderr=stderr,
            env=None if env is None else dict(env),
            cwd=cwd,
            start_new_session=True,
        )
    child = Child(name, popen, stderr_path)
    _SPAWNED.append(child)
    return child


def http_status(url: str, timeout_seconds: float = 1.0) -> int | None:
    """The status of GET ``url``, or None when nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=timeout_seconds) as response:
            status: int = response.status
            return status
    except urllib.error.HTTPError as exc:
        return exc.code
    except (OSError, ValueError):
        return None


def wait_ready(child: Child, url: str, deadline_seconds: float) -> None:
    """Poll GET ``url`` until it answers 200; TargetFailed if the child dies or time runs out."""
    deadline = time.monotonic() + deadline_seconds
    while True:
        child.check_alive()
        status = http_status(url)
        if status == 200:
            return
        if time.monotonic() >= deadline:
            raise TargetFailed(
                f"{child.name} not ready at {url} within {deadline_seconds:.0f}s "
                f"(last status {status}):\n{child.stderr_tail()}"
            )
        time.sleep(_POLL_SECONDS)


def ready_or_stop(child: Child, url: str, deadline_seconds: float) -> None:
    """``wait_ready``, stopping the child if it never gets there (or the wait is interrupted)."""
    try:
        wait_ready(child, url, deadline_seconds)
    except BaseException:
        child.stop()
        raise


@contextlib.contextmanager
def raised_fd_limit() -> Iterator[None]:
    """Raise this process's open-file limit to the hard limit; children inherit it."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
