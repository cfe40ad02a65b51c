"""Throughput and latency with wrk: one run of one (target, scenario, concurrency) cell.

wrk is native, so at 64 connections it is not what limits the rate; ``wrk.lua`` sets the
method, body and headers (rotating keys for gateway-cold), times every request itself and
prints its figures as JSON. wrk runs one thread per connection, so each thread has one
request in flight and its Lua state can time it (see ``wrk.lua`` for why wrk's own
histogram is not used). The CPU wrk used is kept, to show the load generator had room.
"""

from __future__ import annotations

import json
import resource
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from bench.stats import Histogram
from bench.targets import MODEL, Target

SMALL: Final = "small"
STREAM: Final = "stream"
MIX: Final = "mix"
SCENARIOS: Final = (SMALL, STREAM, MIX)
# In the mix every fourth request streams: three quick answers, one streamed.
MIX_PERIOD: Final = 4
WRK_SCRIPT: Final = Path(__file__).with_name("wrk.lua")
WRK_TIMEOUT: Final = "10s"
_MARKER: Final = "BENCH_JSON "


class LoadGeneratorFailed(RuntimeError):
    """wrk exited badly or printed no figures."""


@dataclass(frozen=True, slots=True)
class Bodies:
    """The request bodies, in memory for the Python client and on disk for wrk."""

    small: bytes
    stream: bytes
    small_path: Path
    stream_path: Path


def write_bodies(directory: Path) -> Bodies:
    """A short chat completion request, streaming and not."""
    messages = [{"role": "user", "content": "Say hello in one short sentence."}]
    small = json.dumps({"model": MODEL, "messages": messages, "max_tokens": 32}).encode()
    stream = json.dumps(
        {"model": MODEL, "messages": messages, "max_tokens": 32, "stream": True}
    ).encode()
    small_path, stream_path = directory / "small.json", directory / "stream.json"
    small_path.write_bytes(small)
    stream_path.write_bytes(stream)
    return Bodies(small, stream, small_path, stream_path)


@dataclass(frozen=True, slots=True)
class WrkRun:
    """What one wrk run measured."""

    requests: int
    duration_seconds: float
    errors: dict[str, int]
    histogram: Histogram
    statuses: dict[int, int]
    wrk_corrected_us: dict[str, float]
    threads: int
    loadgen_cpu_seconds: float

    @property
    def rate(self) -> float:
        """Completed requests per second."""
        return self.requests / self.duration_seconds if self.duration_seconds else 0.0


def wrk_available() -> bool:
    """Whether the wrk binary is on PATH."""
    return shutil.which("wrk") is not None


@dataclass(frozen=True, slots=True)
class Cell:
    """One (target, scenario, concurrency) measurement to make with wrk."""

    target: Target
    scenario: str
    concurrency: int
    duration_seconds: int

    @property
    def threads(self) -> int:
        """One wrk thread per connection, so each thread times one request at a time."""
        return self.concurrency


def wrk_command(cell: Cell, bodies: Bodies, first_key: int) -> list[str]:
    """The wrk command line for ``cell``."""
    target = cell.target
    argv = ["wrk", "-t", str(cell.threads), "-c", str(cell.concurrency)]
    argv += ["-d", f"{cell.duration_seconds}s", "--latency", "--timeout", WRK_TIMEOUT]
    argv += ["-s", str(WRK_SCRIPT), target.chat_url, "--", cell.scenario]
    argv += [str(bodies.small_path), str(bodies.stream_path), target.token or "-"]
    argv += [str(target.keys_file or "-"), str(first_key), str(cell.threads), str(MIX_PERIOD)]
    return argv


def _children_cpu_seconds() -> float:
    """CPU time of every child this process has waited for."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _parse(stdout: str) -> dict[str, Any]:
    """The JSON figures wrk.lua's done() printed."""
    for line in stdout.splitlines():
        if line.startswith(_MARKER):
            figures: dict[str, Any] = json.loads(line[len(_MARKER) :])
            return figures
    raise LoadGeneratorFailed(f"wrk printed no figures:\n{stdout[-2000:]}")


def run_wrk(cell: Cell, bodies: Bodies, first_key: int = 0) -> WrkRun:
    """Run wrk for one cell and return its figures."""
    cpu_before = _children_cpu_seconds()
    done = subprocess.run(
        wrk_command(cell, bodies, first_key),
        capture_output=True,
        text=True,
        check=False,
        timeout=cell.duration_seconds + 60,
    )
    loadgen_cpu = _children_cpu_seconds() - cpu_before
    if done.returncode != 0:
        raise LoadGeneratorFailed(f"wrk exited {done.returncode}: {done.stderr[-2000:]}")
    figures = _parse(done.stdout)
    return WrkRun(
        requests=int(figures["requests"]),
        duration_seconds=figures["duration_us"] / 1e6,
        errors={k: int(v) for k, v in figures["errors"].items()},
        histogram={int(v): int(n) for v, n in figures["histogram"]},
        statuses={int(s): int(n) for s, n in figures["statuses"]},
        wrk_corrected_us={f"p{k}": float(v) for k, v in figures["wrk_corrected"].items()},
        threads=cell.threads,
        loadgen_cpu_seconds=loadgen_cpu,
    )
