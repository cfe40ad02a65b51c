"""``python -m bench``: measure the gateway against direct, the aiohttp floor and peers.

Parses the flags (``--help`` lists them all), runs every phase, prints the tables and
writes the results. SIGTERM is turned into an exit so every started process is stopped.
"""

from __future__ import annotations

import signal
import sys
import time
from datetime import UTC, datetime
from types import FrameType

from bench.environment import progress
from bench.load import wrk_available
from bench.options import THROUGHPUT, parse_options
from bench.report import assemble, save
from bench.runner import Run, execute
from bench.table import full_report


def _exit_on_sigterm(signum: int, _frame: FrameType | None) -> None:
    """Leave through ``finally`` blocks, which stop the targets; a second signal waits."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    raise SystemExit(128 + signum)


def _interrupted(_signum: int, _frame: FrameType | None) -> None:
    """Ctrl-C: like SIGTERM, but reported as an interruption."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    """Run the bench; 0 when it ran, 2 without wrk (when needed), 130 when interrupted."""
    options = parse_options(argv)
    if THROUGHPUT in options.phases and not wrk_available():
        print("bench: wrk is not installed (Debian: apt-get install wrk)", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    # Interruptible even when started with SIGINT ignored (a background job of a script).
    signal.signal(signal.SIGINT, _interrupted)
    started_at, clock = datetime.now(UTC), time.monotonic()
    run = Run(options)
    progress(f"bench: {'quick' if options.quick else 'full'} run, targets {options.targets}")
    try:
        execute(run)
    except KeyboardInterrupt:
        print("bench: interrupted; every process it started has been stopped", file=sys.stderr)
        return 130
    doc = assemble(run, started_at, time.monotonic() - clock)
    tables = full_report(doc)
    print(tables)
    for line in save(doc, tables, options.results_dir, started_at, options.chart):
        print(line)
    print(f"wall time: {time.monotonic() - clock:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
