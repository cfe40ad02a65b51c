"""One bench run: database, targets, interleaved rounds of every cell, then the memory and
slow-uploads tests (each phase only when ``--phases`` has it).

Targets are measured in rounds: each round runs every (scenario, concurrency) cell once
for every target, in an order that rotates from cell to cell and round to round, so drift
(other load, CPU frequency, caches) falls on all targets alike. The client timings at
concurrency 1 are interleaved the same way. Every started process is stopped, and the
temp dir removed, however the run ends.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from bench import client, targets
from bench.environment import Prepared, prepare, progress
from bench.load import SMALL, STREAM, Bodies, Cell, run_wrk, write_bodies
from bench.measure import CellResult, probe
from bench.memory import MemoryPlan, memory_phase
from bench.options import MEMORY, SLOW_UPLOADS, THROUGHPUT, Options
from bench.procs import (
    TargetFailed,
    command_line,
    peak_rss_bytes,
    raised_fd_limit,
    rss_bytes,
    stop_leftovers,
)
from bench.slow_uploads import UploadPlan, slow_uploads_phase
from bench.targets import GatewayOptions, Skipped, Target

T = TypeVar("T")
CLIENT_SCENARIOS = (SMALL, STREAM)
WARMUP_SECONDS = 0.2


@dataclass
class Run:
    """What the run found, filled in phase by phase."""

    options: Options
    target_info: dict[str, dict[str, Any]] = field(default_factory=dict)
    cells: dict[tuple[str, str, int], CellResult] = field(default_factory=dict)
    client: dict[tuple[str, str], client.ClientSamples] = field(default_factory=dict)
    memory: list[dict[str, Any]] = field(default_factory=list)
    slow_uploads: list[dict[str, Any]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def rotated(items: Sequence[T], by: int) -> list[T]:
    """``items`` starting at index ``by`` (mod length)."""
    shift = by % len(items) if items else 0
    return [*items[shift:], *items[:shift]]


def _starters(
    run: Run, prep: Prepared, tmp: Path, log_dir: Path
) -> dict[str, Callable[[], Target | Skipped]]:
    """How to start each target but direct."""
    opts, up, token = run.options, prep.upstream, prep.token
    keep = opts.keep_logs is not None  # else stdout, the request log, goes to /dev/null
    db_url = prep.database_url or ""

    def gateway(name: str, **kwargs: Any) -> Target:
        """Start one gateway target with the run's worker count."""
        gateway_options = GatewayOptions(name, opts.workers, keep_stdout=keep, **kwargs)
        return targets.start_gateway(gateway_options, up, db_url, tmp, log_dir)

    return {
        targets.FLOOR: lambda: targets.start_floor(up, log_dir, token),
        targets.GATEWAY: lambda: gateway(targets.GATEWAY, token=token),
        targets.GATEWAY_BASELINE: lambda: targets.start_gateway_baseline(
            GatewayOptions(
                targets.GATEWAY_BASELINE,
                opts.workers,
                token=token,
                keep_stdout=keep,
                tree=opts.baseline_tree,
            ),
            up,
            db_url,
            tmp,
            log_dir,
        ),
        targets.GATEWAY_UNMETERED: lambda: gateway(
            targets.GATEWAY_UNMETERED, token=token, env={"METERED_PATHS": "none"}
        ),
        targets.GATEWAY_COLD: lambda: gateway(targets.GATEWAY_COLD, keys_file=prep.cold_keys_file),
        targets.NGINX: lambda: targets.start_nginx(up, opts.workers, tmp, log_dir, token),
        targets.LITELLM: lambda: targets.start_litellm(
            opts.litellm_venv, up, opts.workers, tmp, log_dir, token
        ),
    }


def _start_all(
    starters: dict[str, Callable[[], Target | Skipped]],
) -> dict[str, Target | Skipped | BaseException]:
    """Start the targets side by side (startup is mostly waiting); collect every outcome."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, len(starters))) as pool:
        futures = {name: pool.submit(start) for name, start in starters.items()}
        concurrent.futures.wait(futures.values())
    outcomes: dict[str, Target | Skipped | BaseException] = {}
    for name, future in futures.items():
        error = future.exception()
        outcomes[name] = error if error is not None else future.result()
    return outcomes


def start_targets(
    run: Run, stack: contextlib.ExitStack, prep: Prepared, tmp: Path, log_dir: Path
) -> list[Target]:
    """Start every chosen target; each stops with ``stack``. Failures become skips."""
    chosen = [targets.direct_target(prep.upstream, prep.token)]
    run.target_info[targets.DIRECT] = {"status": "ran"}
    starters = _starters(run, prep, tmp, log_dir)
    no_baseline = run.options.baseline_tree is None
    for name in list(starters):
        quick_litellm = name == targets.LITELLM and run.options.quick
        if name == targets.GATEWAY_BASELINE and no_baseline:
            reason = "no --baseline-tree given"  # listed, but no warning: it is opt-in
        elif name in run.options.targets:
            continue
        else:
            reason = "not run with --quick" if quick_litellm else "not in --targets"
        run.target_info[name] = {"status": "skipped", "reason": reason}
        del starters[name]
    outcomes = _start_all(starters)
    # Register every started process for stopping before raising anything.
    for outcome in outcomes.values():
        if isinstance(outcome, Target):
            stack.callback(outcome.child.stop)
    for name, outcome in outcomes.items():
        if isinstance(outcome, TargetFailed):
            outcome = Skipped(name, f"failed to start: {outcome}")
        if isinstance(outcome, BaseException):
            raise outcome
        if isinstance(outcome, Skipped):
            run.target_info[name] = {"status": "skipped", "reason": outcome.reason}
            run.warnings.append(f"{name} skipped: {outcome.reason.splitlines()[0]}")
            continue
        run.target_info[name] = {"status": "ran", **outcome.info}
        chosen.append(outcome)
        progress(f"  {name} ready (pid {outcome.child.pid})")
    return chosen


def token_source(target: Target, prep: Prepared) -> client.TokenSource:
    """Where the Python client gets each request's key: rotating for gateway-cold."""
    if target.keys_file is not None and prep.rotation is not None:
        return prep.rotation.next_token
    return lambda: prep.token


def warm_up(run: Run, chosen: list[Target], prep: Prepared, bodies: Bodies) -> list[Target]:
    """Send each target a few untimed requests; drop any that does not answer 200."""
    kept = []
    for target in chosen:
        samples = client.run_async(
            client.sequential(
                target.chat_url, token_source(target, prep), bodies.small, WARMUP_SECONDS, 0
            )
        )
        bad = {status: n for status, n in samples.statuses.items() if status != 200}
        if bad or samples.errors or not samples.statuses:
            reason = f"warm-up answered {bad} with {samples.errors} client errors"
            run.target_info[target.name] = {"status": "failed", "reason": reason}
            run.warnings.append(f"{target.name} dropped: {reason}")
            continue
        kept.append(target)
    return kept


def measure_cell(run: Run, prep: Prepared, bodies: Bodies, cell: Cell) -> None:
    """One wrk run of one cell, with the target's CPU and counters around it."""
    target = cell.target
    first_key = prep.rotation.cursor if target.keys_file and prep.rotation else 0
    before = probe(target, prep.postmaster_pid)
    result = run_wrk(cell, bodies, first_key)
    after = probe(target, prep.postmaster_pid)
    if target.keys_file and prep.rotation:
        # Requests in flight when wrk stopped took keys too.
        prep.rotation.advance(result.requests + cell.concurrency)
    key = (target.name, cell.scenario, cell.concurrency)
    run.cells.setdefault(key, CellResult(*key)).add(result, before, after)
    errors = sum(result.errors.values())
    progress(
        f"    {cell.scenario:6} c={cell.concurrency:<3} {target.name:14} "
        f"{result.rate:9,.0f} req/s" + (f"  {errors} errors" if errors else "")
    )


def measure_client(run: Run, prep: Prepared, bodies: Bodies, target: Target, scenario: str) -> None:
    """Sequential requests from the Python client: latency, first byte, chunk gaps."""
    body = bodies.stream if scenario == STREAM else bodies.small
    samples = client.run_async(
        client.sequential(
            target.chat_url,
            token_source(target, prep),
            body,
            run.options.client_seconds,
            run.options.chunks,
        )
    )
    into = run.client.setdefault((target.name, scenario), client.ClientSamples())
    into.latency_us += samples.latency_us
    into.ttfb_us += samples.ttfb_us
    into.gap_us += samples.gap_us
    into.statuses.update(samples.statuses)
    into.errors += samples.errors


def rounds(run: Run, chosen: list[Target], prep: Prepared, bodies: Bodies) -> None:
    """Every cell for every target, round after round, the target order rotating."""
    opts = run.options
    turn = 0
    for round_index in range(opts.rounds):
        progress(f"  round {round_index + 1}/{opts.rounds}")
        for scenario in opts.scenarios:
            for concurrency in opts.concurrency:
                if opts.quick and scenario != SMALL and concurrency == 1:
                    continue  # latency-bound: a 1 s run holds ~20 streams; the client covers it
                for target in rotated(chosen, turn):
                    cell = Cell(target, scenario, concurrency, opts.duration_seconds)
                    measure_cell(run, prep, bodies, cell)
                turn += 1
        for scenario in (s for s in CLIENT_SCENARIOS if s in opts.scenarios):
            for target in rotated(chosen, turn):
                measure_client(run, prep, bodies, target, scenario)
            turn += 1


def record_memory(run: Run, chosen: list[Target]) -> None:
    """Each target's peak and current RSS at the end of the throughput phase."""
    for target in chosen:
        pids = target.child.pids()
        run.target_info[target.name].update(
            processes=len(pids),
            commands=[command_line(pid)[:120] for pid in pids],
            peak_rss_bytes=peak_rss_bytes(pids),
            rss_bytes=rss_bytes(pids),
        )


def execute(run: Run) -> None:
    """Run every phase; cleanup is guaranteed by the stacks."""
    opts = run.options
    tmp = Path(tempfile.mkdtemp(prefix="gateway-bench-"))
    log_dir = opts.keep_logs or tmp / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    try:
        with raised_fd_limit(), contextlib.ExitStack() as stack:
            bodies = write_bodies(tmp)
            prep = prepare(opts, stack, tmp, log_dir)
            if THROUGHPUT in opts.phases:
                with contextlib.ExitStack() as target_stack:
                    started = start_targets(run, target_stack, prep, tmp, log_dir)
                    chosen = warm_up(run, started, prep, bodies)
                    rounds(run, chosen, prep, bodies)
                    record_memory(run, chosen)
            baseline = () if opts.baseline_tree is None else (targets.GATEWAY_BASELINE,)
            if MEMORY in opts.phases and opts.memory_streams > 0:
                progress(f"  memory: {opts.memory_streams} streams held open at once")
                # The floor's footprint is a useful reference, but --quick has no time for it.
                wanted: tuple[str, ...] = (targets.DIRECT, targets.GATEWAY, *baseline)
                wanted += () if opts.quick else (targets.FLOOR,)
                plan = MemoryPlan(
                    opts.memory_streams,
                    opts.memory_seconds,
                    opts.workers,
                    tuple(t for t in wanted if t in opts.targets),
                    opts.baseline_tree,
                )
                run.memory = memory_phase(plan, prep, tmp, log_dir, bodies)
            if SLOW_UPLOADS in opts.phases and opts.slow_uploads > 0:
                progress(f"  slow uploads: {opts.slow_uploads} 10 MB bodies with a bad key")
                upload_plan = UploadPlan(
                    opts.slow_uploads,
                    opts.slow_upload_seconds,
                    opts.workers,
                    tuple(t for t in (targets.GATEWAY, *baseline) if t in opts.targets),
                    opts.baseline_tree,
                )
                run.slow_uploads = slow_uploads_phase(upload_plan, prep, tmp, log_dir, bodies)
            if prep.rotation is not None and prep.rotation.reused_within_ttl:
                run.warnings.append("gateway-cold reused keys within the cache TTL")
    finally:
        stop_leftovers()  # anything an interruption left unregistered
        shutil.rmtree(tmp, ignore_errors=True)
