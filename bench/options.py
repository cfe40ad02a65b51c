"""The command line of ``python -m bench``, parsed once into a frozen :class:`Options`.

``--quick`` changes the defaults of the flags the user did not give (fewer rounds,
shorter runs, concurrency 1 and 8, a smaller memory test, no LiteLLM) so the whole run
takes about a minute; an explicit flag always wins. ``--phases`` picks which of the
throughput rounds, the memory test and the slow-uploads test run.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.load import SCENARIOS
from bench.targets import ALL_TARGETS, DIRECT, GATEWAY_BASELINE, LITELLM

RESULTS_DIR = Path(__file__).resolve().parent / "results"
THROUGHPUT, MEMORY, SLOW_UPLOADS = "throughput", "memory", "slow-uploads"
PHASES = (THROUGHPUT, MEMORY, SLOW_UPLOADS)

# flag: (full run, --quick)
_MODE_DEFAULTS: dict[str, tuple[Any, Any]] = {
    "concurrency": ((1, 8, 64), (1, 8)),
    "rounds": (3, 1),
    "duration": (5, 1),
    "client_seconds": (2.0, 0.3),
    "cold_orgs": (20_000, 5_000),
    "memory_streams": (1000, 200),
    "memory_seconds": (4.0, 1.0),
}


@dataclass(frozen=True)
class Options:
    """Everything the command line decides; see ``python -m bench --help``."""

    quick: bool
    targets: tuple[str, ...]
    scenarios: tuple[str, ...]
    concurrency: tuple[int, ...]
    rounds: int
    duration_seconds: int
    client_seconds: float
    chunks: int
    interval_ms: float
    workers: int
    cold_orgs: int
    memory_streams: int
    memory_seconds: float
    slow_uploads: int
    slow_upload_seconds: float
    phases: tuple[str, ...]
    baseline_tree: Path | None
    database_url: str | None
    litellm_venv: Path | None
    results_dir: Path
    keep_logs: Path | None
    chart: bool


def _names(choices: Sequence[str]) -> Any:
    """An argparse type: a comma-separated list, each item one of ``choices``."""

    def parse(text: str) -> tuple[str, ...]:
        items = tuple(i.strip() for i in text.split(",") if i.strip())
        unknown = [i for i in items if i not in choices]
        if unknown or not items:
            raise argparse.ArgumentTypeError(f"choose from {', '.join(choices)}; got {text!r}")
        return items

    return parse


def _levels(text: str) -> tuple[int, ...]:
    """A comma-separated list of positive integers."""
    try:
        levels = tuple(int(i) for i in text.split(",") if i.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers like 1,8,64; got {text!r}") from None
    if not levels or min(levels) < 1:
        raise argparse.ArgumentTypeError(f"concurrency levels must be at least 1; got {text!r}")
    return levels


_QUICK_HELP = (
    "about a minute: 1 round of 1 s runs at concurrency 1,8 (stream and mix with wrk at 8 "
    "only; the client times them at 1), 5,000 cold organizations, a 200-stream memory test "
    "through direct and the gateway only (and gateway-baseline), no LiteLLM; the "
    "slow-uploads test as in a full run; flags given explicitly still win"
)
# (flag, argparse keywords); every default is spelled out in the help text.
_FLAGS: tuple[tuple[str, dict[str, Any]], ...] = (
    ("--quick", {"action": "store_true", "help": _QUICK_HELP}),
    ("--targets", {"type": _names(ALL_TARGETS), "default": ALL_TARGETS,
                   "help": "comma-separated targets [default: all of "
                   f"{','.join(ALL_TARGETS)}]; direct always runs, it is the reference"}),
    ("--scenarios", {"type": _names(SCENARIOS), "default": SCENARIOS,
                     "help": "comma-separated [default: small,stream,mix]; small: "
                     "non-streaming completion; stream: --chunks chunks --interval-ms "
                     "apart; mix: every 4th request streams"}),
    ("--concurrency", {"type": _levels,
                       "help": "wrk connections, comma-separated [default 1,8,64; quick 1,8]"}),
    ("--rounds", {"type": int, "help": "interleaved rounds of every cell [default 3; quick 1]"}),
    ("--duration", {"type": int,
                    "help": "whole seconds per wrk run [default 5; quick 1]"}),
    ("--client-seconds", {"type": float, "help": "seconds per Python-client timing run at "
                          "concurrency 1 [default 2; quick 0.3]"}),
    ("--chunks", {"type": int, "default": 10,
                  "help": "content chunks per streamed completion [default 10]"}),
    ("--interval-ms", {"type": float, "default": 5.0,
                       "help": "milliseconds between streamed chunks [default 5]"}),
    ("--workers", {"type": int, "default": 1, "help": "gateway processes (serve --workers "
                   "N); also nginx's and LiteLLM's worker count [default 1]"}),
    ("--cold-orgs", {"type": int, "help": "organizations (each with an owner and a key) "
                     "seeded for gateway-cold [default 20000; quick 5000]"}),
    ("--memory-streams", {"type": int, "help": "streams held open at once in the memory "
                          "test; 0 skips it [default 1000; quick 200]"}),
    ("--memory-seconds", {"type": float, "help": "how long each memory-test stream lasts "
                          "[default 4; quick 1]"}),
    ("--slow-uploads", {"type": int, "default": 100, "metavar": "N",
                        "help": "connections in the slow-uploads test: each sends a "
                        "10,000,000-byte body with a bad key, once slowly and once as fast "
                        "as the gateway reads, to a fresh gateway (and gateway-baseline); "
                        "0 skips it [default 100]"}),
    ("--slow-upload-seconds", {"type": float, "default": 20.0, "help": "how long each "
                               "slow-uploads run lasts at most [default 20]"}),
    ("--phases", {"type": _names(PHASES), "default": PHASES, "help": "comma-separated "
                  f"phases to run [default: all of {','.join(PHASES)}]; e.g. slow-uploads "
                  "alone (wrk is then not needed)"}),
    ("--baseline-tree", {"type": Path, "metavar": "PATH",
                         "help": "a checkout of an earlier commit of this repository (git "
                         "worktree add /tmp/gateway-baseline <commit>): adds the target "
                         "gateway-baseline, python -m gateway serve run there with "
                         "PYTHONPATH=PATH, beside gateway in every phase [default: "
                         "gateway-baseline is skipped]"}),
    ("--database-url", {"help": "PostgreSQL server to create a scratch database on (dropped "
                        "after) [default: an embedded PostgreSQL (pgserver) in a temp dir]"}),
    ("--litellm-venv", {"type": Path, "help": "virtual environment with litellm[proxy] "
                        "installed; runs PATH/bin/litellm [default: LiteLLM is skipped]"}),
    ("--results-dir", {"type": Path, "default": RESULTS_DIR, "help": "where the JSON, the "
                       "text tables and the PNG chart go [default: bench/results]"}),
    ("--keep-logs", {"type": Path, "help": "keep every process's stdout and stderr in this "
                     "directory; the gateway then writes its log lines to a file instead of "
                     "/dev/null [default: stdout to /dev/null, stderr in the temp dir]"}),
    ("--no-chart", {"action": "store_true", "help": "do not draw the PNG chart"}),
)  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    """The argument parser; every flag is documented in --help."""
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Measure what the gateway costs against a direct call to the (fake) "
        "upstream, a bare aiohttp proxy and peers, interleaved in one run. Prints tables; "
        "writes JSON, the tables and a PNG chart (with matplotlib) under bench/results/.",
    )
    for flag, keywords in _FLAGS:
        parser.add_argument(flag, **keywords)
    return parser


def parse_options(argv: Sequence[str] | None = None) -> Options:
    """Parse the command line, filling in the full-run or --quick defaults."""
    parser = build_parser()
    args = parser.parse_args(argv)
    mode = 1 if args.quick else 0
    for name, defaults in _MODE_DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, defaults[mode])
    if args.workers < 1 or args.rounds < 1 or args.duration < 1 or args.chunks < 2:
        parser.error("--workers, --rounds and --duration must be at least 1, --chunks 2")
    if args.cold_orgs < 1:
        parser.error("--cold-orgs must be at least 1")
    if args.slow_uploads < 0 or args.slow_upload_seconds <= 0:
        parser.error("--slow-uploads must be at least 0, --slow-upload-seconds above 0")
    chosen = tuple(t for t in args.targets if t != DIRECT)
    if args.quick:
        chosen = tuple(t for t in chosen if t != LITELLM)
    baseline_tree = args.baseline_tree
    if baseline_tree is not None:
        baseline_tree = baseline_tree.expanduser().resolve()
        if not (baseline_tree / "gateway" / "__main__.py").is_file():
            parser.error(f"--baseline-tree {baseline_tree}: no gateway/__main__.py there")
        if GATEWAY_BASELINE not in chosen:
            chosen += (GATEWAY_BASELINE,)
    return Options(
        quick=args.quick,
        targets=(DIRECT, *chosen),
        scenarios=args.scenarios,
        concurrency=args.concurrency,
        rounds=args.rounds,
        duration_seconds=args.duration,
        client_seconds=args.client_seconds,
        chunks=args.chunks,
        interval_ms=args.interval_ms,
        workers=args.workers,
        cold_orgs=args.cold_orgs,
        memory_streams=args.memory_streams,
        memory_seconds=args.memory_seconds,
        slow_uploads=args.slow_uploads,
        slow_upload_seconds=args.slow_upload_seconds,
        phases=args.phases,
        baseline_tree=baseline_tree,
        database_url=args.database_url,
        litellm_venv=None if args.quick else args.litellm_venv,
        results_dir=args.results_dir,
        keep_logs=args.keep_logs,
        chart=not args.no_chart,
    )
