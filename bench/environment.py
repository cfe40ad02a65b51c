"""What every target shares: the fake upstream, the database and the seeded keys.

The database is started (or a scratch one created) only when a gateway target runs; it
is migrated by the gateway's own CLI and seeded with ``--cold-orgs`` + 1 organizations:
the first one's key is the warm gateway's, the rest are gateway-cold's rotation.
"""

from __future__ import annotations

import contextlib
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from bench import database, targets
from bench.keys import KeyRotation
from bench.options import Options
from bench.targets import Upstream


@dataclass
class Prepared:
    """The shared pieces: the upstream, the database and the seeded keys."""

    upstream: Upstream
    token: str
    database_url: str | None = None
    postmaster_pid: int | None = None
    cold_keys_file: Path | None = None
    rotation: KeyRotation | None = None


_STARTED = time.monotonic()


def progress(message: str) -> None:
    """One line of progress on stderr (the tables on stdout stay clean), with elapsed time."""
    print(f"[{time.monotonic() - _STARTED:6.1f}s] {message}", file=sys.stderr, flush=True)


def prepare(opts: Options, stack: contextlib.ExitStack, tmp: Path, log_dir: Path) -> Prepared:
    """Start the fake upstream and, when a gateway will run, the seeded database."""
    upstream = targets.start_upstream(
        "upstream", log_dir, chunks=opts.chunks, interval_seconds=opts.interval_ms / 1000
    )
    stack.callback(upstream.child.stop)
    gateways = set(targets.GATEWAY_TARGETS) & set(opts.targets)
    if opts.baseline_tree is None:
        gateways.discard(targets.GATEWAY_BASELINE)
    if not gateways:
        return Prepared(upstream, "kilo_bench_no_gateway")
    db = stack.enter_context(
        database.scratch_database(opts.database_url)
        if opts.database_url
        else database.embedded_database(tmp / "postgres")
    )
    database.migrate(db.url, targets.gateway_env(upstream, db.url, 0, tmp), log_dir)
    tokens = database.seed(db.url, opts.cold_orgs + 1)
    progress(f"  database migrated, {len(tokens):,} organizations seeded")
    keys_file = tmp / "cold-keys.txt"
    keys_file.write_text("\n".join(tokens[1:]) + "\n")
    return Prepared(
        upstream, tokens[0], db.url, db.postmaster_pid, keys_file, KeyRotation(tokens[1:])
    )
