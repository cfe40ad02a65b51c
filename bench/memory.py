"""The memory test: many streams held open at once, through fresh processes.

A separate fake upstream streams slowly (``--memory-seconds`` per stream), so every stream
is open at the same time; each target is started fresh so its peak RSS (VmHWM, summed
over its processes) is this test's and nothing else's. The file descriptors and, for the
gateway, ``gateway_active_streams`` are read again after the streams end: what does not
come back down is a leak.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import client, targets
from bench.environment import Prepared
from bench.load import Bodies
from bench.measure import scrape
from bench.procs import TargetFailed, open_fds, peak_rss_bytes, rss_bytes
from bench.targets import GatewayOptions, Skipped, Target

CHUNKS = 10
# Long enough for handlers to finish and counters to settle after the last stream.
SETTLE_SECONDS = 0.5


@dataclass(frozen=True, slots=True)
class MemoryPlan:
    """How many streams, how long each lasts, and the gateway's worker count."""

    streams: int
    stream_seconds: float
    workers: int
    wanted: tuple[str, ...] = (targets.DIRECT, targets.GATEWAY, targets.FLOOR)
    baseline_tree: Path | None = None  # for gateway-baseline

    @property
    def ramp_seconds(self) -> float:
        """Streams start spread over this long, well inside one stream's life."""
        return min(1.0, self.stream_seconds / 3)


def _footprint(target: Target) -> dict[str, Any]:
    """RSS, peak RSS and open descriptors of the target's processes now."""
    pids = target.child.pids()
    figures: dict[str, Any] = {
        "rss_bytes": rss_bytes(pids),
        "peak_rss_bytes": peak_rss_bytes(pids),
        "open_fds": open_fds(pids),
    }
    if target.metrics_url:
        figures["active_streams"] = scrape(target.metrics_url).active_streams
    return figures


def measure(target: Target, plan: MemoryPlan, token: str, bodies: Bodies) -> dict[str, Any]:
    """Hold ``plan.streams`` streams through ``target``; its footprint before and after."""
    tokens: client.TokenSource = lambda: token  # noqa: E731
    client.run_async(client.sequential(target.chat_url, tokens, bodies.small, 0.2, 0))
    before = _footprint(target)
    hold = client.run_async(
        client.hold_streams(target.chat_url, tokens, bodies.stream, plan.streams, plan.ramp_seconds)
    )
    during_peak = peak_rss_bytes(target.child.pids())
    time.sleep(SETTLE_SECONDS)
    after = _footprint(target)
    return {
        "target": target.name,
        "streams": plan.streams,
        "completed": hold.completed,
        "peak_open": hold.peak_open,
        "errors": dict(hold.errors),
        "statuses": {str(k): v for k, v in hold.statuses.items()},
        "seconds": hold.seconds,
        "peak_rss_bytes": during_peak,
        "before": before,
        "after": after,
    }


def memory_phase(
    plan: MemoryPlan, prep: Prepared, tmp: Path, log_dir: Path, bodies: Bodies
) -> list[dict[str, Any]]:
    """Start a slow upstream and fresh targets; hold the streams through each in turn."""
    token, database_url = prep.token, prep.database_url
    results = []
    with contextlib.ExitStack() as stack:
        upstream = targets.start_upstream(
            "memory-upstream", log_dir, chunks=CHUNKS, interval_seconds=plan.stream_seconds / CHUNKS
        )
        stack.callback(upstream.child.stop)
        results.append(measure(targets.direct_target(upstream, token), plan, token, bodies))
        starters: dict[str, Callable[[], Target | Skipped]] = {
            targets.FLOOR: lambda: targets.start_floor(upstream, log_dir, token, "memory-floor"),
            targets.GATEWAY: lambda: targets.start_gateway(
                GatewayOptions("memory-gateway", plan.workers, token=token),
                upstream,
                database_url or "",
                tmp,
                log_dir,
            ),
            targets.GATEWAY_BASELINE: lambda: targets.start_gateway_baseline(
                GatewayOptions(
                    "memory-gateway-baseline", plan.workers, token=token, tree=plan.baseline_tree
                ),
                upstream,
                database_url or "",
                tmp,
                log_dir,
            ),
        }
        for name, start in starters.items():
            needs_database = name in targets.GATEWAY_TARGETS
            if name not in plan.wanted or (needs_database and database_url is None):
                continue
            try:
                target = start()
            except TargetFailed as exc:
                results.append({"target": name, "failed": str(exc)})
                continue
            if isinstance(target, Skipped):
                results.append({"target": name, "failed": target.reason})
                continue
            stack.callback(target.child.stop)
            target.name = name
            results.append(measure(target, plan, token, bodies))
            target.child.stop()
    return results
